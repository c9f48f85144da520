"""``VCRegTrainer``: a ``transformers.Trainer`` that adds the VCReg penalty of every block to the task loss.

Step 3 of the data flow (capture -> penalty -> trainer -> publishing). The trainer

* finds the blocks (:mod:`hf_vcreg.capture`) and hooks them while ``compute_loss`` runs;
* adds ``reduce_l(alpha V_l + beta K_l)`` (:mod:`hf_vcreg.penalty`) to the task loss;
* owns gradient-accumulation scaling: the task loss of a micro-batch is its mean and the Trainer divides
  the total by the number of accumulation steps (``loss_is_scaled_for_ga = False``, and
  ``num_items_in_batch`` is never passed to the model), so equal micro-batches give exactly the large-batch
  update for every architecture, including those that accept but ignore ``num_items_in_batch``;
* logs the task loss and the VCReg terms through ``log()`` (``eval_`` prefix in evaluation), trl-style;
* resumes transformers 5.x checkpoints through the model's own loader (the Trainer's plain
  ``load_state_dict`` silently misses renamed keys, transformers#43701);
* removes its hooks when training or evaluation ends, so the saved model carries no trace of hf_vcreg;
* writes every checkpoint atomically: into ``_incomplete-checkpoint-N/`` first, renamed to ``checkpoint-N`` once
  complete, so a process killed mid-save never leaves a half-written ``checkpoint-N`` (upstream writes in place,
  and ``get_last_checkpoint`` would pick it up); ``resume_from_checkpoint=True`` takes the newest complete one
  (:func:`last_complete_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import FSDP_MODEL_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from . import publishing
from .capture import BlockCapture, CapturedLayer, sample_rows, select_layers, unwrap_model
from .config import VCRegConfig
from .distributed import check_equal_batch_counts, kept_copies, metrics_group, resolve_group, weighted_means
from .penalty import VCRegSpec, apply_penalty, release_scratch

__all__ = ["VCRegTrainer", "last_complete_checkpoint"]

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"  # written last by Trainer._save_checkpoint
# Checkpoints are staged here, then renamed. The leading "_" keeps Trainer.push_to_hub from uploading one.
STAGING_PREFIX = "_incomplete-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _trainer_state_step(checkpoint: str) -> int | None:
    """``global_step`` of a checkpoint's ``trainer_state.json``, or ``None`` when it is missing or truncated."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose ``trainer_state.json`` parses and says step ``N``.

    ``Trainer._save_checkpoint`` writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint passing this check was written completely. Unlike ``transformers``'
    ``get_last_checkpoint`` it skips a half-written directory (a process killed mid-save by a trainer that writes
    in place). ``None`` when there is no complete checkpoint.
    """
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and _trainer_state_step(path) == int(match.group(1)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _fsdp_checkpoint_mismatch(checkpoint: str, model: nn.Module) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys of an FSDP checkpoint against ``model``; rank 0 reads, every rank gets them.

    Without this, the FSDP loader (``torch.distributed.checkpoint.set_model_state_dict``) raises an opaque
    ``KeyError`` for unexpected keys of a full state dict, and ignores them in a sharded (DCP) one.
    """
    mismatch = [[], []]
    if not dist.is_initialized() or dist.get_rank() == 0:
        full = os.path.join(checkpoint, f"{FSDP_MODEL_NAME}.bin")
        sharded = os.path.join(checkpoint, f"{FSDP_MODEL_NAME}_0")
        if os.path.isfile(full):
            saved = set(torch.load(full, map_location="cpu", mmap=True, weights_only=True))
        elif os.path.isdir(sharded):  # accelerate saves {"model": state_dict}: DCP keys are "model.<name>"
            from torch.distributed.checkpoint import FileSystemReader

            saved = {k.removeprefix("model.") for k in FileSystemReader(sharded).read_metadata().state_dict_metadata}
        else:
            saved = None  # not an FSDP checkpoint: the Trainer's loader says so
        if saved is not None:
            expected = set(model.state_dict())
            mismatch = [sorted(expected - saved), sorted(saved - expected)]
    if dist.is_initialized():
        dist.broadcast_object_list(mismatch, src=0)
    return mismatch[0], mismatch[1]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the directories themselves to disk (so a power cut keeps them too)."""
    for root, _, files in os.walk(path):
        for name in [*files, "."]:
            _fsync(os.path.join(root, name))


class ReentrantCheckpointError(RuntimeError):
    """A regularised block ran without autograd during training (reentrant gradient checkpointing)."""


class VCRegTrainer(Trainer):
    """``Trainer`` with the VCReg penalty on the output of every block.

    Example::

        from hf_vcreg import VCRegConfig, VCRegTrainer

        args = VCRegConfig(output_dir="out", vcreg_alpha=0.01, vcreg_beta=0.1)
        trainer = VCRegTrainer(model=model, args=args, train_dataset=train, eval_dataset=test)
        trainer.train()

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
        if model is None:
            raise ValueError("VCRegTrainer needs a model (model_init is not supported: the hooks need the instance).")
        args._validate_vcreg()  # again: fields may have been changed after the config was built
        super().__init__(model, args, *a, **kw)
        # The trainer computes per-micro-batch means; never let the model normalise by num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        base = unwrap_model(self.model)
        self._bare_model = not isinstance(base, PreTrainedModel)
        if self._bare_model and not self.label_names:
            self.label_names = ["labels"]
        if hasattr(base, "add_model_tags"):
            base.add_model_tags(self._tag_names)
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
        self._vcreg_staging_root: str | None = None  # set while Trainer._save_checkpoint writes a staged checkpoint
        self._vcreg_deferred_push = False
        self.vcreg_layer_names: list[str] = []
        if args.vcreg_enabled:
            self.vcreg_layer_names = select_layers(base, args.vcreg_layers)
            self._vcreg_group = self._resolve_group(args)
            world = dist.get_world_size(self._vcreg_group) if self._vcreg_group is not None else 1
            weight = 1.0 / len(self.vcreg_layer_names) if args.vcreg_layer_reduction == "mean" else 1.0
            self._vcreg_spec = VCRegSpec(
                alpha=args.vcreg_alpha,
                beta=args.vcreg_beta,
                gamma=args.vcreg_gamma,
                eps=args.vcreg_eps,
                delta=args.vcreg_delta,
                weight=weight,
                grad_multiplier=float(world) if args.vcreg_implementation == "gradient" else 1.0,
            )
            self._vcreg_capture = BlockCapture(base, self.vcreg_layer_names, self._vcreg_transform)
            self._check_gradient_checkpointing(args)

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
        if self.model.training and torch.is_grad_enabled() is False and self._vcreg_in_training_step:
            raise ReentrantCheckpointError(
                f"Block {layer.name!r} ran without autograd during a training step: reentrant gradient checkpointing "
                "(e.g. timm set_grad_checkpointing or torch.utils.checkpoint with use_reentrant=True) would silently "
                "drop the VCReg gradient. Use non-reentrant checkpointing (use_reentrant=False)."
            )
        n_rows = x.numel() // x.shape[layer.axis] if x.shape[layer.axis] else 0
        rows = sample_rows(n_rows, self.args.vcreg_max_rows, self._row_seed(layer.index), x.device)
        out, penalty, v, k, valid = apply_penalty(
            x, layer.axis, rows, self._vcreg_spec, self._vcreg_group, self.args.vcreg_implementation
        )
        if not self._vcreg_capture.replaying:  # a checkpoint's recomputation: the first forward was recorded
            self._vcreg_records.append((layer, penalty, v, k, valid))
        return out

    def _task_loss(self, model, inputs):
        if not self._bare_model:
            return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if "pixel_values" not in inputs or "labels" not in inputs:
            raise KeyError(
                f"A bare (non-transformers) model gets inputs['pixel_values'] and inputs['labels']; the batch has "
                f"{sorted(inputs)}. Produce those two columns in your dataset transform or collator."
            )
        logits = model(inputs["pixel_values"])
        loss = F.cross_entropy(logits.float(), inputs["labels"], label_smoothing=self.args.label_smoothing_factor)
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
        loss = task_loss + penalty.to(task_loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ logging
    def _record_metrics(self, mode, task_loss, penalty, records) -> None:
        """Buffers one forward's values: its weight, the layer names and three small tensors, no arithmetic.

        The weight is the one the Trainer gives this forward's loss in the logged ``loss`` (``1 / g``, ``g`` the
        micro-batches of the optimizer step) or ``eval_loss`` (the copies ``gather_for_metrics`` keeps), see
        :mod:`hf_vcreg.distributed`. The means are computed for all buffered forwards at once when they are logged
        (:meth:`_pop_vcreg_metrics`): between a model's blocks every small tensor operation costs 10-25 us, so a
        training step does two stacks here instead of ~20 + 2 per layer operations.
        """
        metrics = self._vcreg_metrics[mode]
        metrics["task_loss"].append(task_loss.detach())
        if mode == "train":
            metrics["_weight"].append(1.0 / getattr(self, "current_gradient_accumulation_steps", 1))
        else:
            metrics["_weight"].append(kept_copies(self.gather_function, self.args.eval_batch_size, task_loss.device))
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
        sums = {}
        for key, parts in values.items():
            x = torch.cat([v.double().to(device) for v, _ in parts])
            w = torch.cat([w.to(device) for _, w in parts])
            sums[key] = (torch.dot(x, w), w.sum())
        buffered.clear()
        means = weighted_means(sums, self._vcreg_metric_keys(), self.accelerator.device, metrics_group())
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

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from :func:`last_complete_checkpoint`."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint-N (with a valid {TRAINER_STATE_NAME}) in "
                    f"output_dir={self.args.output_dir!r}. Start without resume_from_checkpoint, or pass a path."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and _trainer_state_step(resume_from_checkpoint) is None:
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint: its "
                f"{TRAINER_STATE_NAME} is missing or truncated (a save was interrupted?). The newest complete one in "
                f"its folder is {last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))!r}."
            )
        self._remove_staged_checkpoints()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._finish()

    # ------------------------------------------------------------------ atomic checkpoints
    def _remove_staged_checkpoints(self) -> None:
        """Delete ``_incomplete-checkpoint-*`` left by a process killed mid-save (they were never complete)."""
        out = self.args.output_dir
        if self.args.should_save and out and os.path.isdir(out):
            for name in os.listdir(out):
                if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
                    shutil.rmtree(os.path.join(out, name), ignore_errors=True)

    def _get_output_dir(self, trial) -> str:
        if self._vcreg_staging_root is not None:
            return self._vcreg_staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._vcreg_staging_root is not None:  # push the renamed folder, not the staged one
            self._vcreg_deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` into ``_incomplete-checkpoint-N/checkpoint-N``, then one rename to ``checkpoint-N``.

        The Trainer computes the checkpoint folder from ``_get_output_dir``, which points at the staging folder while
        it saves; every rank writes there (RNG states), all wait, and the saving process renames. Rotation
        (``save_total_limit``) and the Hub push run after the rename, on the final folder.
        """
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        self._vcreg_staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._vcreg_staging_root = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save and os.path.isdir(staged):  # absent: another node on a shared disk renamed it
            _fsync_tree(staged)
            if os.path.exists(final):  # a checkpoint of the same step from an earlier run: replace it
                os.replace(final, os.path.join(staging_root, name + ".replaced"))
            os.replace(staged, final)
            _fsync(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
        if self._vcreg_deferred_push:
            self._vcreg_deferred_push = False
            super()._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load strictly: a checkpoint whose keys do not match the model raises (the Trainer's loader only warns).

        transformers models load through ``from_pretrained`` (which maps saved key names to the live ones); under
        FSDP the engine's checkpoint keys are compared first (rank 0 reads them, every rank raises), then the
        Trainer's FSDP loader runs.
        """
        target = unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        loaded = None
        if self.is_fsdp_enabled:
            missing, unexpected = _fsdp_checkpoint_mismatch(resume_from_checkpoint, target)
        elif isinstance(target, PreTrainedModel) and os.path.isfile(weights):
            loaded, info = type(target).from_pretrained(
                resume_from_checkpoint, config=target.config, output_loading_info=True
            )
            missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
            loaded = loaded.state_dict()
        elif os.path.isfile(weights):  # a bare model (timm, nn.Module): its state dict as saved
            loaded = safetensors.torch.load_file(weights)
            expected = target.state_dict().keys()
            missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
        else:
            missing = unexpected = []
        if missing or unexpected:
            raise RuntimeError(
                f"Checkpoint {resume_from_checkpoint} does not match the model: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}. Resume with the same architecture and config."
            )
        if loaded is not None:
            target.load_state_dict(loaded)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ------------------------------------------------------------------ publishing (see hf_vcreg.publishing)
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save in the library's standard format (timm models: timm's hub format) + preprocessor config + card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        timm_model = publishing.timm_module(self.model)
        if timm_model is None:
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            labels = publishing.label_names(self.model, self.train_dataset)
            data_config = publishing.timm_data_config(self.processing_class)
            publishing.save_timm_checkpoint(timm_model, output_dir, state_dict, labels, data_config)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if not self.args.should_save:
            return
        if timm_model is None:
            publishing.save_image_processor(self.model, self.processing_class, output_dir)
        self.model_card().save(os.path.join(output_dir, "README.md"))
        if publishing.pushes_checkpoint(self, output_dir):  # the Trainer copies only config + weights over
            publishing.stage_published_files(output_dir, self.args.output_dir, ("README.md", "preprocessor_config.json"))

    def model_card(self, **kwargs):
        """This run's VCReg model card (a ``huggingface_hub.ModelCard``), see ``publishing.model_card_from_trainer``."""
        return publishing.model_card_from_trainer(self, **{**getattr(self, "_vcreg_card_kwargs", {}), **kwargs})

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:
        """Write the VCReg card to ``output_dir/README.md``; the arguments are remembered for later saves."""
        given = dict(license=license, tags=tags, finetuned_from=finetuned_from, dataset_tags=dataset_tags,
                     dataset=dataset)
        self._vcreg_card_kwargs = {**getattr(self, "_vcreg_card_kwargs", {}),
                                   **{k: v for k, v in given.items() if v is not None}}
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.model_card().save(os.path.join(self.args.output_dir, "README.md"))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token, private)
        except publishing.HUB_ERRORS as err:
            raise publishing.push_error(err, self.args.output_dir, self.args.hub_model_id, creating=True) from err

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """``Trainer.push_to_hub``; a failed upload raises ``publishing.HubPushError`` and a retry resumes it."""
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except publishing.HUB_ERRORS as err:
            repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
            raise publishing.push_error(err, self.args.output_dir, repo_id) from err

    def _finish_current_push(self) -> None:
        super()._finish_current_push()
        running = getattr(self, "push_in_progress", None)
        failed = [job for job in getattr(running, "jobs", None) or [] if job.done() and job.exception() is not None]
        for job in failed:
            logger.warning("A checkpoint push to the Hub failed (%s); the next push_to_hub() uploads the whole "
                           "output_dir again.", job.exception())
        if failed:
            running.jobs = [job for job in running.jobs if job not in failed]
