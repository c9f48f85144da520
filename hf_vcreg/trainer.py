"""``VCRegTrainer``: a ``transformers.Trainer`` that adds the VCReg penalty of every block to the task loss.

Step 3 of the data flow (capture -> penalty -> trainer -> publishing). The trainer is the method:

* it finds the blocks (:mod:`hf_vcreg.capture`) and hooks them while ``compute_loss`` runs;
* it resolves unset coefficients to the recommended values of the model's family (:mod:`hf_vcreg.family`,
  :data:`hf_vcreg.config.RECOMMENDED`), for the model it is built with and for each one ``model_init`` builds;
* it adds ``reduce_l(alpha V_l + beta K_l)`` (:mod:`hf_vcreg.penalty`) to the task loss, or with
  ``vcreg_monitor_only`` only logs the statistics (no gradient, nothing added);
* it owns gradient-accumulation scaling: the task loss of a micro-batch is its mean and the Trainer divides
  the total by the number of accumulation steps (``loss_is_scaled_for_ga = False``, and
  ``num_items_in_batch`` is never passed to the model), so equal micro-batches give exactly the large-batch
  update for every architecture, including those that accept but ignore ``num_items_in_batch``;
* it logs the task loss and the VCReg terms through ``log()`` (``eval_`` prefix in evaluation), trl-style;
* it removes its hooks when training or evaluation ends, so the saved model carries no trace of hf_vcreg.

Infrastructure comes from two mixins: :class:`~hf_vcreg.checkpointing.AtomicCheckpointMixin` (atomic
checkpoints, ``resume_from_checkpoint=True``, strict resume; general, not VCReg-specific) and
:class:`~hf_vcreg.publishing.HubPublishingMixin` (checkpoint format, model card, Hub errors).

Private ``Trainer`` methods overridden (what to check on a transformers upgrade), all of them:

* here, ``_set_signature_columns_if_needed``: a bare timm / ``nn.Module`` model's ``forward`` takes a tensor, so
  the Trainer cannot read its columns from the signature; ``pixel_values`` and the label columns are kept;
* here, ``_hp_search_setup``: the one point of ``train()`` after ``model_init`` has built the new model and a
  hyperparameter trial has set its values on ``args``; the VCReg set-up is rebuilt there;
* :mod:`~hf_vcreg.checkpointing`, ``_save_checkpoint``: wraps the Trainer's save with staging, fsync and rename;
* ``_get_output_dir``: points the Trainer's checkpoint folder at the staging folder while it saves;
* ``_push_from_checkpoint``: defers a checkpoint's Hub push until the folder has its final name;
* ``_load_from_checkpoint``: strict (missing / unexpected keys raise), through ``from_pretrained`` for
  transformers models (transformers#43701), with a key check before the FSDP loader;
* :mod:`~hf_vcreg.publishing`, ``_save``: every save (checkpoints too) in timm's format for timm models, with the
  preprocessor config and the VCReg card;
* ``_finish_current_push``: a failed background checkpoint push is logged and dropped instead of lost.

Private attributes read or set: ``_tag_names``, ``_signature_columns``, ``push_in_progress``,
``model_accepts_loss_kwargs``, ``loss_is_scaled_for_ga`` and ``is_fsdp_enabled``; for the logged means (weighted as
the Trainer weighs ``loss`` / ``eval_loss``, :mod:`~hf_vcreg.distributed`), ``current_gradient_accumulation_steps``
and ``gather_function``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_pt_utils import LabelSmoother

from .capture import BlockCapture, CapturedLayer, layer_widths, sample_rows, select_layers, unwrap_model
from .checkpointing import AtomicCheckpointMixin, last_complete_checkpoint
from .config import VCRegConfig
from .distributed import check_equal_batch_counts, kept_copies, metrics_group, resolve_group, weighted_means
from .family import model_family
from .penalty import VCRegSpec, apply_penalty, release_scratch
from .publishing import HubPublishingMixin

__all__ = ["VCRegTrainer", "last_complete_checkpoint"]

logger = logging.getLogger(__name__)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``-sum_c q_c log softmax(logits)_c`` for soft targets ``q`` of shape (B, C).

    ``q`` comes from mixup / cutmix (rows sum to 1); ``label_smoothing`` mixes it with the uniform
    distribution first, ``q' = (1 - s) q + s / C``, as ``F.cross_entropy(label_smoothing=s)`` does for hard
    labels. Computed in float32.
    """
    if targets.shape != logits.shape:
        raise ValueError(f"soft labels of shape {tuple(targets.shape)} do not match the logits {tuple(logits.shape)}: "
                         "give one probability per class (B, num_labels).")
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class ReentrantCheckpointError(RuntimeError):
    """A regularised block ran without autograd during training (reentrant gradient checkpointing)."""


def _keep(t):
    """Identity pack/unpack hook: a saved tensor is kept as it is (see ``_vcreg_transform``)."""
    return t


class VCRegTrainer(AtomicCheckpointMixin, HubPublishingMixin, Trainer):
    """``Trainer`` with the VCReg penalty on the output of every block.

    Example::

        from hf_vcreg import VCRegConfig, VCRegTrainer

        args = VCRegConfig(output_dir="out")  # alpha, beta: recommended for the model's family
        trainer = VCRegTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
        trainer.train()

    ``model_init=`` (a function returning a fresh model) may replace ``model``, as for ``Trainer``; it makes
    ``trainer.hyperparameter_search`` work over the ``vcreg_*`` fields (``docs/tuning.md``).

    ``model`` may be any ``transformers`` model that returns a loss, or a bare ``timm`` / ``nn.Module``
    classifier taking ``pixel_values`` and returning logits (the trainer then computes the cross-entropy).
    """

    _tag_names = ["vcreg"]
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module | PreTrainedModel | None = None, args: VCRegConfig | None = None, *a, **kw):
        if args is None:
            args = VCRegConfig(output_dir="tmp_trainer")
        if not isinstance(args, VCRegConfig):
            raise TypeError(
                f"args must be a VCRegConfig, got {type(args).__name__}. Build one with the same fields, e.g. "
                "VCRegConfig(output_dir=..., vcreg_alpha=..., **other_training_arguments)."
            )
        args._validate_vcreg()  # again: fields may have been changed after the config was built
        # Trainer.__init__ reads model.config for label smoothing, which a bare timm model lacks: the trainer sets
        # the label smoother itself (transformers models), bare models smooth in _task_loss.
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(model, args, *a, **kw)
        finally:
            args.label_smoothing_factor = smoothing
        # The trainer computes per-micro-batch means; never let the model normalise by num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self._vcreg_metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._vcreg_records: list[tuple[CapturedLayer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._vcreg_warned: set[str] = set()
        # (global_step, micro-batch index within it) of the current forward: seeds the row subsets. Counted per
        # mode, so that an evaluation between steps does not shift the training draws (a resumed run, which
        # starts without that evaluation, must draw the same rows), and restarted by every evaluation.
        self._vcreg_micro = (-1, 0)
        self._vcreg_last_micro = {"train": (-1, 0), "eval": (-1, 0)}
        self._vcreg_capture: BlockCapture | None = None
        self._vcreg_in_training_step = False
        self._vcreg_setup()

    def _vcreg_setup(self) -> None:
        """Everything VCReg derives from the model and ``args``: family, coefficients, layers, spec and hooks.

        Runs when the trainer is built, and again in ``train()`` for each model ``model_init`` builds (every
        hyperparameter-search trial, once the trial's values are on ``args``). Sets the public attributes:

        * ``vcreg_family``: ``"cnn"`` or ``"transformer"`` (:func:`~hf_vcreg.family.model_family`);
        * ``vcreg_resolved``: every ``vcreg_*`` value used, the unset coefficients filled with the family's
          :data:`~hf_vcreg.config.RECOMMENDED` values (``args.vcreg_dict(family)``);
        * ``vcreg_recommended``: the fields that took the recommended value (the others were set by the user);
        * ``vcreg_layer_names``: the hooked layers; empty (no hooks, plain training) when both resolved
          coefficients are 0 and ``vcreg_monitor_only`` is off.
        """
        args = self.args
        args._validate_vcreg()  # a trial sets its values on args after the trainer was built
        self._remove_hooks()  # those of the previous model, if any
        base = unwrap_model(self.model)
        self._bare_model = not isinstance(base, PreTrainedModel)
        # transformers models: the Trainer's label smoother; bare models: _task_loss applies the factor itself
        smoothing = args.label_smoothing_factor
        self.label_smoother = LabelSmoother(epsilon=smoothing) if smoothing and not self._bare_model else None
        if self._bare_model and not self.label_names:
            self.label_names = ["labels"]
        if hasattr(base, "add_model_tags"):
            base.add_model_tags(self._tag_names)
        self.vcreg_family = model_family(base)
        self.vcreg_resolved = args.vcreg_dict(self.vcreg_family)
        self.vcreg_recommended = args.vcreg_recommended_fields()
        alpha, beta = self.vcreg_resolved["vcreg_alpha"], self.vcreg_resolved["vcreg_beta"]
        monitor = args.vcreg_monitor_only
        self.vcreg_layer_names: list[str] = []
        self._vcreg_capture = self._vcreg_group = None
        if monitor or alpha > 0 or beta > 0:
            self.vcreg_layer_names = select_layers(base, self.vcreg_resolved["vcreg_layers"])
            self._vcreg_group = self._resolve_group(args)
            world = dist.get_world_size(self._vcreg_group) if self._vcreg_group is not None else 1
            weight = 1.0 / len(self.vcreg_layer_names) if args.vcreg_layer_reduction == "mean" else 1.0
            self._vcreg_spec = VCRegSpec(
                alpha=0.0 if monitor else alpha,
                beta=0.0 if monitor else beta,
                gamma=args.vcreg_gamma,
                eps=args.vcreg_eps,
                delta=args.vcreg_delta,
                weight=weight,
                grad_multiplier=float(world) if args.vcreg_implementation == "gradient" else 1.0,
            )
            widths = layer_widths(base, self.vcreg_layer_names)  # metadata: which tensor of a tuple, which axis
            self._vcreg_capture = BlockCapture(base, self.vcreg_layer_names, self._vcreg_transform, widths=widths)
            if not monitor:  # without a gradient, a block run without autograd loses nothing
                self._check_gradient_checkpointing(args)
        logger.info(self._vcreg_summary())

    def _vcreg_summary(self) -> str:
        """One line: the family, the coefficients and where they came from (logged by :meth:`_vcreg_setup`)."""
        family, resolved, recommended = self.vcreg_family, self.vcreg_resolved, self.vcreg_recommended
        if self.args.vcreg_monitor_only:
            return (f"VCReg monitor-only for a {family} model: logging vcreg/variance and vcreg/covariance of "
                    f"{len(self.vcreg_layer_names)} layers without a penalty (vcreg_alpha / vcreg_beta are not applied).")
        keys = ("vcreg_alpha", "vcreg_beta", "vcreg_layers")

        def show(names, note=lambda k: ""):
            return ", ".join(f"{k.removeprefix('vcreg_')}={resolved[k]!r}{note(k)}" for k in names)

        if not self.vcreg_layer_names:
            return f"VCReg off for a {family} model ({show(keys[:2])}): plain training, no hooks."
        if len(recommended) == len(keys):
            return (f"VCReg defaults for a {family} model: {show(keys)} (recommended; set vcreg_alpha / vcreg_beta / "
                    "vcreg_layers to override).")
        values = show(keys, lambda k: f" (recommended for {family}; set {k} to override)" if k in recommended
                      else " (set by the user)")
        return f"VCReg for a {family} model: {values}."

    # ------------------------------------------------------------------ set-up checks
    @staticmethod
    def _resolve_group(args: VCRegConfig):
        return resolve_group(args.vcreg_distributed_stats)

    @staticmethod
    def _check_gradient_checkpointing(args: VCRegConfig) -> None:
        # transformers 5.x: activation_checkpointing(_kwargs); gradient_checkpointing(_kwargs) is the old alias.
        enabled = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {}
        if enabled and kwargs.get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs={'use_reentrant': True} runs blocks without autograd, which would "
                "silently drop the VCReg gradient. Use gradient_checkpointing_kwargs={'use_reentrant': False}."
            )

    # ------------------------------------------------------------------ the penalty
    def _row_seed(self, layer_index: int) -> int:
        step, micro = self._vcreg_micro
        return (((self.args.seed * 1_000_003 + step) * 1_009 + micro) * 101 + layer_index) % (2**63 - 1)

    def _vcreg_transform(self, layer: CapturedLayer, x: torch.Tensor) -> torch.Tensor:
        monitor = self.args.vcreg_monitor_only
        if not monitor and self.model.training and torch.is_grad_enabled() is False and self._vcreg_in_training_step:
            raise ReentrantCheckpointError(
                f"Block {layer.name!r} ran without autograd during a training step: reentrant gradient checkpointing "
                "(e.g. timm set_grad_checkpointing or torch.utils.checkpoint with use_reentrant=True) would silently "
                "drop the VCReg gradient. Use non-reentrant checkpointing (use_reentrant=False)."
            )
        n_rows = x.numel() // x.shape[layer.axis] if x.shape[layer.axis] else 0
        rows = sample_rows(n_rows, self.args.vcreg_max_rows, self._row_seed(layer.index), x.device)
        if monitor:  # the explicit statistics (alpha = beta = 0 in the spec) on a detached input: no graph, x untouched
            if not self._vcreg_capture.replaying:  # a checkpoint's recomputation: the first forward was recorded
                with torch.no_grad():
                    _, penalty, v, k, valid = apply_penalty(x.detach(), layer.axis, rows, self._vcreg_spec,
                                                            self._vcreg_group, "loss")
                self._vcreg_records.append((layer, penalty, v, k, valid))
            return x
        explicit = self.args.vcreg_implementation == "loss"
        if explicit and self._vcreg_capture.replaying:  # the first forward's penalty graph is the one the backward uses
            return x
        # The explicit penalty is a graph beside the model's: its saved tensors stay out of an enclosing activation
        # checkpoint. Checkpointed, the penalty's backward (which runs before the gradient reaches the block's
        # output) would start the recomputation before FSDP has gathered the block's parameters.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep) if explicit else contextlib.nullcontext():
            out, penalty, v, k, valid = apply_penalty(x, layer.axis, rows, self._vcreg_spec, self._vcreg_group,
                                                      self.args.vcreg_implementation)
        if not self._vcreg_capture.replaying:  # a checkpoint's recomputation: the first forward was recorded
            self._vcreg_records.append((layer, penalty, v, k, valid))
        return out

    def _task_loss(self, model, inputs):
        labels = inputs.get("labels")
        soft = isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.ndim == 2
        if not self._bare_model and not soft:
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if soft and not self._bare_model:
            # Soft targets (mixup / cutmix): transformers' image classifiers would switch to multi-label BCE for
            # float labels, so the model runs without labels and the trainer computes the soft cross-entropy.
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            return soft_target_cross_entropy(logits, labels, self.args.label_smoothing_factor), outputs
        if "pixel_values" not in inputs or "labels" not in inputs:
            raise KeyError(
                f"A bare (non-transformers) model gets inputs['pixel_values'] and inputs['labels']; the batch has "
                f"{sorted(inputs)}. Produce those two columns in your dataset transform or collator."
            )
        logits = model(inputs["pixel_values"])
        if soft:
            return soft_target_cross_entropy(logits, labels, self.args.label_smoothing_factor), {"logits": logits}
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)
        return loss, {"logits": logits}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss (per-micro-batch mean) + VCReg penalty; ``num_items_in_batch`` is deliberately unused."""
        mode = "train" if model.training else "eval"
        capture = self._vcreg_capture
        if capture is None:
            loss, outputs = self._task_loss(model, inputs)
            self._record_metrics(mode, loss, None, [])
            return (loss, outputs) if return_outputs else loss
        step = self.state.global_step
        last_step, last_micro = self._vcreg_last_micro[mode]
        self._vcreg_micro = self._vcreg_last_micro[mode] = (step, last_micro + 1 if last_step == step else 0)
        capture.install()
        self._vcreg_records = []
        self._vcreg_in_training_step = model.training and torch.is_grad_enabled()
        with capture.active():
            task_loss, outputs = self._task_loss(model, inputs)
        records, self._vcreg_records = self._vcreg_records, []
        if not records:
            raise RuntimeError(
                f"No regularised layer ran in this forward pass (layers: {self.vcreg_layer_names}). The model's "
                "forward does not call them, or they returned no floating-point tensor."
            )
        penalty = torch.stack([r[1] for r in records]).sum()
        self._record_metrics(mode, task_loss, penalty, records)
        if self.args.vcreg_monitor_only:  # statistics only: the loss, hence the gradient, is the plain run's
            return (task_loss, outputs) if return_outputs else task_loss
        loss = task_loss + penalty.to(task_loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record_metrics(self, mode, task_loss, penalty, records) -> None:
        """Buffers one forward's values: its weight, the layer names and three small tensors, no arithmetic.

        The weight is the one the Trainer gives this forward's loss in the logged ``loss`` (``1 / g``, ``g`` the
        micro-batches of the optimizer step) or ``eval_loss`` (the copies ``gather_for_metrics`` keeps), see
        :mod:`hf_vcreg.distributed`. The means are computed for all buffered forwards at once when they are logged
        (:meth:`_pop_vcreg_metrics`): small tensor operations between a model's blocks are costly (see
        benchmarks/PERFORMANCE.md, row 13).
        """
        metrics = self._vcreg_metrics[mode]
        metrics["task_loss"].append(task_loss.detach())
        if mode == "train":
            metrics["_weight"].append(1.0 / getattr(self, "current_gradient_accumulation_steps", 1))
        else:
            gather = self.accelerator.gather_for_metrics  # what the Trainer's eval_loss gather does (as tensors)
            metrics["_weight"].append(kept_copies(gather, self.args.eval_batch_size, task_loss.device))
        if records:
            metrics["_forwards"].append(
                (
                    tuple(r[0].name for r in records),
                    penalty.detach(),
                    torch.stack([r[2] for r in records] + [r[3] for r in records]),  # V per layer, then K per layer
                    torch.stack([r[4] for r in records]),
                )
            )

    @staticmethod
    def _forward_means(forwards, weights: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``{key: [(values, weights)]}``: per-forward values of every ``vcreg/*`` key with the forwards' weights.

        Forwards are grouped by the layers that ran (the same every step, unless a model skips blocks), and each
        group is reduced with a few batched operations. Per forward: ``vcreg/variance`` / ``vcreg/covariance`` are
        the means over the layers whose statistics were valid, ``vcreg/skipped_layers`` counts the others; the
        per-layer keys (``vcreg/variance/<layer>``, ``_valid/<layer>``) cover the forwards where that layer ran.
        """
        values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, (names, *_) in enumerate(forwards):
            groups[names].append(i)
        for names, index in groups.items():
            group = [forwards[i] for i in index]
            layers = len(names)
            device = group[0][2].device
            w = weights[index].to(device) if len(index) < len(forwards) else weights.to(device)
            penalty = torch.stack([g[1].float().to(device) for g in group])
            vk = torch.stack([g[2].float().to(device) for g in group])  # (forwards, 2 * layers)
            ok = torch.stack([g[3].to(device) for g in group])  # (forwards, layers) bool
            valid = ok.float()
            n_valid = valid.sum(dim=1)
            terms = vk.nan_to_num().view(len(group), 2, layers) * valid.unsqueeze(1)
            means = terms.sum(dim=2) / n_valid.clamp(min=1).unsqueeze(1)
            values["vcreg/penalty"].append((penalty, w))
            values["vcreg/variance"].append((means[:, 0], w))
            values["vcreg/covariance"].append((means[:, 1], w))
            values["vcreg/skipped_layers"].append((layers - n_valid, w))
            for i, name in enumerate(names):
                values[f"_valid/{name}"].append((valid[:, i], w))
                values[f"vcreg/variance/{name}"].append((terms[:, 0, i], w))
                values[f"vcreg/covariance/{name}"].append((terms[:, 1, i], w))
        return values

    def _vcreg_metric_keys(self) -> list[str]:
        """Every key :meth:`_pop_vcreg_metrics` may log (``_valid/*``: internal), in one order on every rank."""
        keys = ["task_loss"]
        if self._vcreg_capture is not None:
            keys += ["vcreg/penalty", "vcreg/variance", "vcreg/covariance", "vcreg/skipped_layers"]
            for name in self.vcreg_layer_names:
                keys.append(f"_valid/{name}")
                if self.args.vcreg_log_per_layer:
                    keys += [f"vcreg/variance/{name}", f"vcreg/covariance/{name}"]
        return keys

    def _pop_vcreg_metrics(self, mode: str) -> dict[str, float]:
        """Means over all processes of the values recorded since the last call; warns once per skipped layer.

        Each forward counts with the weight the Trainer gives its loss (:meth:`_record_metrics`), so every logged
        line has ``loss == task_loss + vcreg/penalty``. With several processes this is collective (one all-reduce),
        like the Trainer's gather of ``loss`` before it logs: every rank logs at the same steps.
        """
        buffered = self._vcreg_metrics[mode]
        if not buffered["task_loss"]:
            buffered.clear()
            return {}
        device = buffered["task_loss"][0].device
        weight_list = buffered["_weight"]
        if isinstance(weight_list[0], torch.Tensor):
            weights = torch.stack([w.to(device) for w in weight_list]).double()
        else:
            weights = torch.tensor(weight_list, dtype=torch.float64, device=device)
        task = torch.stack([t.float().to(device) for t in buffered["task_loss"]])
        values = {"task_loss": [(task, weights)], **self._forward_means(buffered["_forwards"], weights)}
        keys = self._vcreg_metric_keys()
        sums = {}
        for key, parts in ((k, values[k]) for k in keys if k in values):
            x = torch.cat([v.double().to(device) for v, _ in parts])
            w = torch.cat([w.to(device) for _, w in parts])
            sums[key] = (torch.dot(x, w), w.sum())
        buffered.clear()
        means = weighted_means(sums, keys, self.accelerator.device, metrics_group())
        metrics = {}
        for key, value in means.items():
            if key.startswith("_valid/"):
                name = key[len("_valid/") :]
                if value < 1 and name not in self._vcreg_warned:
                    self._vcreg_warned.add(name)
                    logger.warning(
                        "VCReg skipped layer %r in %.0f%% of %s steps: its statistics were undefined (fewer than 2 "
                        "rows) or not finite. Its penalty and gradient were 0 there (logged once per layer).",
                        name,
                        100 * (1 - value),
                        mode,
                    )
                continue
            metrics[key] = value
        if self.args.vcreg_monitor_only:  # no penalty was applied: loss == task_loss
            metrics.pop("vcreg/penalty", None)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._pop_vcreg_metrics(mode)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Adds the evaluation means of the VCReg terms to the returned metrics (``eval_vcreg/variance``, ...)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._pop_vcreg_metrics("eval").items()})
        return output

    # ------------------------------------------------------------------ lifecycle
    def _remove_hooks(self) -> None:
        if self._vcreg_capture is not None:
            self._vcreg_capture.remove()

    def _finish(self) -> None:
        """After training / a standalone evaluation: no hooks on the model, no CPU scratch buffers held."""
        self._remove_hooks()
        release_scratch()

    def _hp_search_setup(self, trial) -> None:
        """``Trainer._hp_search_setup`` (a trial's values set on ``args``), then :meth:`_vcreg_setup` for the model
        ``model_init`` has just built in ``train()``, with those values."""
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            self._vcreg_setup()

    def train(self, *args, **kwargs):
        """``Trainer.train`` (``resume_from_checkpoint=True``: see :class:`AtomicCheckpointMixin`), then :meth:`_finish`."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._finish()

    def _evaluation_call(self, method, *args, **kwargs):
        """Run ``Trainer.evaluate`` / ``predict``: row seeds restart, hooks go when no training is running."""
        self._vcreg_last_micro["eval"] = (-1, 0)
        try:
            return method(*args, **kwargs)
        finally:
            if not self.is_in_train:
                self._finish()

    def evaluate(self, *args, **kwargs):
        return self._evaluation_call(super().evaluate, *args, **kwargs)

    def predict(self, *args, **kwargs):
        return self._evaluation_call(super().predict, *args, **kwargs)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        self._check_equal_batch_counts(loader, "train")
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        self._check_equal_batch_counts(loader, "eval")
        return loader

    def _check_equal_batch_counts(self, loader, split: str) -> None:
        """Raise, on every rank, when ranks would run different numbers of forward passes (see ``distributed``)."""
        check_equal_batch_counts(loader, split, self.accelerator.device)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and self._bare_model:
            self._signature_columns = ["pixel_values", "labels", "label", "label_ids"]
        super()._set_signature_columns_if_needed()
