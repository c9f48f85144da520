"""``VCRegTrainer``: a ``transformers.Trainer`` that adds the VCReg penalty of every block to the task loss.

Step 3 of the data flow (capture -> penalty -> trainer -> publishing). The trainer is the method: it hooks the
blocks (:mod:`~hf_vcreg.capture`) while ``compute_loss`` runs; fills unset coefficients with the model family's
:data:`~hf_vcreg.config.RECOMMENDED` values (for each model ``model_init`` builds too); adds
``reduce_l(alpha V_l + beta K_l)`` (:mod:`~hf_vcreg.penalty`) to the task loss, or with ``vcreg_monitor_only``
only logs the statistics; logs the task loss and the terms through ``log()`` (``eval_`` prefix in evaluation),
trl-style; and removes its hooks when training or evaluation ends, so the saved model carries no trace of hf_vcreg.
It owns gradient-accumulation scaling: a micro-batch's task loss is its mean and the Trainer divides by the
accumulation steps (``loss_is_scaled_for_ga = False``; ``num_items_in_batch`` never reaches the model), so equal
micro-batches give the large-batch update for every architecture, even those that accept but ignore it.

Infrastructure that is not VCReg-specific comes from mixins. The private ``Trainer`` methods overridden (what to
check on a transformers upgrade), all of them:

* here, ``_hp_search_setup``: the point of ``train()`` after ``model_init`` has built a model and a trial has
  set its values on ``args``; the VCReg set-up is rebuilt there;
* :class:`~hf_vcreg.task_loss.TaskLossMixin` (bare timm models, soft targets): ``_set_signature_columns_if_needed``
  (a bare model's ``forward`` takes a tensor: its columns are named) and ``_hp_search_setup`` (same as here);
* :class:`~hf_vcreg.checkpointing.AtomicCheckpointMixin`: ``_save_checkpoint`` (staging, fsync, rename),
  ``_get_output_dir`` (the staging folder while saving), ``_push_from_checkpoint`` (deferred until the folder has
  its final name), ``_load_from_checkpoint`` (strict; ``from_pretrained`` for transformers models);
* :class:`~hf_vcreg.publishing.HubPublishingMixin`: ``_save`` (timm's format for timm models, preprocessor config,
  VCReg card) and ``_finish_current_push`` (a failed background push is logged instead of lost);
* :class:`~hf_vcreg.distributed.EqualBatchCountsMixin` overrides public methods only.

Private attributes read or set: ``_tag_names``, ``_signature_columns``, ``push_in_progress``,
``model_accepts_loss_kwargs``, ``loss_is_scaled_for_ga``, ``is_fsdp_enabled`` and, to weigh the logged means as the
Trainer weighs ``loss`` / ``eval_loss`` (:mod:`~hf_vcreg.distributed`), ``current_gradient_accumulation_steps``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, Trainer

from .capture import BlockCapture, CapturedLayer, layer_widths, sample_rows, select_layers, unwrap_model
from .checkpointing import AtomicCheckpointMixin, last_complete_checkpoint
from .config import VCRegConfig
from .distributed import EqualBatchCountsMixin, buffered_means, kept_copies, resolve_group
from .family import model_family
from .penalty import apply_penalty, release_scratch
from .publishing import HubPublishingMixin
from .task_loss import TaskLossMixin

__all__ = ["VCRegTrainer", "last_complete_checkpoint"]

logger = logging.getLogger(__name__)


class ReentrantCheckpointError(RuntimeError):
    """A regularised block ran without autograd during training (reentrant gradient checkpointing)."""


class VCRegTrainer(AtomicCheckpointMixin, HubPublishingMixin, EqualBatchCountsMixin, TaskLossMixin, Trainer):
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
        super().__init__(model, args, *a, **kw)
        # The trainer computes per-micro-batch means; never let the model normalise by num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        self._vcreg_metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
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
            self._vcreg_group = resolve_group(args.vcreg_distributed_stats)
            world = dist.get_world_size(self._vcreg_group) if self._vcreg_group is not None else 1
            self._vcreg_spec = args.vcreg_spec(alpha, beta, len(self.vcreg_layer_names), world)
            widths = layer_widths(base, self.vcreg_layer_names)  # metadata: which tensor of a tuple, which axis
            self._vcreg_capture = BlockCapture(base, self.vcreg_layer_names, self._vcreg_transform, widths=widths)
            if not monitor:  # without a gradient, a block run without autograd loses nothing
                args._validate_checkpointing()
        logger.info(args.vcreg_summary(self.vcreg_family, len(self.vcreg_layer_names)))

    # ------------------------------------------------------------------ the penalty
    def _row_seed(self, layer_index: int) -> int:
        step, micro = self._vcreg_micro
        return (((self.args.seed * 1_000_003 + step) * 1_009 + micro) * 101 + layer_index) % (2**63 - 1)

    def _vcreg_transform(self, layer: CapturedLayer, x: torch.Tensor) -> torch.Tensor:
        monitor, implementation = self.args.vcreg_monitor_only, self.args.vcreg_implementation
        if not monitor and self.model.training and not torch.is_grad_enabled() and self._vcreg_in_training_step:
            raise ReentrantCheckpointError(
                f"Block {layer.name!r} ran without autograd during a training step: reentrant gradient checkpointing "
                "(e.g. timm set_grad_checkpointing or torch.utils.checkpoint with use_reentrant=True) would silently "
                "drop the VCReg gradient. Use non-reentrant checkpointing (use_reentrant=False)."
            )
        n_rows = x.numel() // x.shape[layer.axis] if x.shape[layer.axis] else 0
        rows = sample_rows(n_rows, self.args.vcreg_max_rows, self._row_seed(layer.index), x.device)
        replaying = self._vcreg_capture.replaying  # a checkpoint's recomputation: the first forward was recorded
        if replaying and (monitor or implementation == "loss"):  # and its penalty graph is the one the backward uses
            return x
        # monitor-only: the explicit statistics (alpha = beta = 0 in the spec) on a detached input, no graph
        with torch.no_grad() if monitor else contextlib.nullcontext():
            out, penalty, v, k, valid = apply_penalty(x.detach() if monitor else x, layer.axis, rows, self._vcreg_spec,
                                                      self._vcreg_group, "loss" if monitor else implementation)
        if not replaying:
            self._vcreg_records.append((layer, penalty, v, k, valid))
        return x if monitor else out

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
            names, vk = tuple(r[0].name for r in records), [r[2] for r in records] + [r[3] for r in records]
            metrics["_forwards"].append((names, penalty.detach(), torch.stack(vk), torch.stack([r[4] for r in records])))

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
        layers = self.vcreg_layer_names if self._vcreg_capture is not None else None
        means = buffered_means(buffered, layers, self.args.vcreg_log_per_layer, self.accelerator.device)
        buffered.clear()
        metrics = {}
        for key, value in means.items():
            if key.startswith("_valid/"):
                name = key[len("_valid/") :]
                if value < 1 and name not in self._vcreg_warned:
                    self._vcreg_warned.add(name)
                    logger.warning("VCReg skipped layer %r in %.0f%% of %s steps: its statistics were undefined (fewer "
                                   "than 2 rows) or not finite. Its penalty and gradient were 0 there (logged once per "
                                   "layer).", name, 100 * (1 - value), mode)
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
