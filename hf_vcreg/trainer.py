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
* removes its hooks when training or evaluation ends, so the saved model carries no trace of hf_vcreg.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer

from .capture import BlockCapture, CapturedLayer, sample_rows, select_layers, unwrap_model
from .config import VCRegConfig
from .penalty import VCRegSpec, apply_penalty

__all__ = ["VCRegTrainer"]

logger = logging.getLogger(__name__)


class ReentrantCheckpointError(RuntimeError):
    """A regularised block ran without autograd during training (reentrant gradient checkpointing)."""


class VCRegTrainer(Trainer):
    """``Trainer`` with the VCReg penalty on the output of every block.

    Example::

        from hf_vcreg import VCRegConfig, VCRegTrainer

        args = VCRegConfig(output_dir="out", vcreg_alpha=0.1, vcreg_beta=0.1)
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
        self._vcreg_micro = (-1, 0)  # (global_step, micro-batch index within it): seeds the row subsets
        self._vcreg_capture: BlockCapture | None = None
        self._vcreg_in_training_step = False
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
        if not args.vcreg_distributed_stats:
            return None
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "vcreg_distributed_stats=True needs a torch.distributed process group, and none is initialised. "
                "Launch with torchrun / accelerate launch, or set vcreg_distributed_stats=False."
            )
        return dist.group.WORLD

    @staticmethod
    def _check_gradient_checkpointing(args: VCRegConfig) -> None:
        kwargs = args.gradient_checkpointing_kwargs or {}
        if args.gradient_checkpointing and kwargs.get("use_reentrant", False):
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
            self._vcreg_metrics[mode]["task_loss"].append(loss.detach())
            return (loss, outputs) if return_outputs else loss
        step = self.state.global_step
        self._vcreg_micro = (step, self._vcreg_micro[1] + 1 if self._vcreg_micro[0] == step else 0)
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
        metrics = self._vcreg_metrics[mode]
        valid = torch.stack([r[4] for r in records]).float()
        n_valid = valid.sum().clamp(min=1)
        metrics["task_loss"].append(task_loss.detach().float())
        metrics["vcreg/penalty"].append(penalty.detach())
        metrics["vcreg/variance"].append((torch.stack([r[2] for r in records]).nan_to_num() * valid).sum() / n_valid)
        metrics["vcreg/covariance"].append(
            (torch.stack([r[3] for r in records]).nan_to_num() * valid).sum() / n_valid
        )
        metrics["vcreg/skipped_layers"].append(len(records) - valid.sum())
        for layer, _, v, k, ok in records:
            metrics[f"_valid/{layer.name}"].append(ok.float())
            if self.args.vcreg_log_per_layer:
                metrics[f"vcreg/variance/{layer.name}"].append(torch.where(ok, v, 0.0))
                metrics[f"vcreg/covariance/{layer.name}"].append(torch.where(ok, k, 0.0))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {}
        for key, values in self._vcreg_metrics[mode].items():
            value = torch.stack([v.float().to(values[0].device) for v in values]).mean().item()
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
        self._vcreg_metrics[mode].clear()
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        super().log({**logs, **metrics}, start_time)

    # ------------------------------------------------------------------ lifecycle
    def _remove_hooks(self) -> None:
        if self._vcreg_capture is not None:
            self._vcreg_capture.remove()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._remove_hooks()

    def evaluate(self, *args, **kwargs):
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if not self.is_in_train:
                self._remove_hooks()

    def predict(self, *args, **kwargs):
        try:
            return super().predict(*args, **kwargs)
        finally:
            if not self.is_in_train:
                self._remove_hooks()

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and self._bare_model:
            self._signature_columns = ["pixel_values", "labels", "label", "label_ids"]
        super()._set_signature_columns_if_needed()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load through ``from_pretrained`` (which maps saved key names to the live ones), strictly."""
        target = unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if isinstance(target, PreTrainedModel) and os.path.isfile(weights) and not self.is_fsdp_enabled:
            loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
            missing, unexpected = target.load_state_dict(loaded.state_dict(), strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"Checkpoint {resume_from_checkpoint} does not match the model: missing keys {missing[:10]}, "
                    f"unexpected keys {unexpected[:10]}. Resume with the same architecture and config."
                )
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
