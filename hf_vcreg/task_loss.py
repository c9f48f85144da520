"""The supervised loss VCReg is added to, for every kind of model the trainer takes.

* ``transformers`` models with hard labels: the model's own loss (``Trainer.compute_loss``, with the Trainer's
  label smoother when ``label_smoothing_factor`` is set);
* bare ``timm`` / ``nn.Module`` classifiers (``forward(pixel_values) -> logits``): cross-entropy on the logits,
  label smoothing applied here;
* soft targets of shape (B, C) (mixup / cutmix), for either kind: :func:`soft_target_cross_entropy`.
  transformers' image classifiers would switch to a multi-label BCE for float labels, so the model runs without
  them.

Each returns a per-micro-batch mean: the trainer owns gradient-accumulation scaling.

:class:`TaskLossMixin` gives a ``Trainer`` all of this; it is not VCReg-specific.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import functools

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.trainer_pt_utils import LabelSmoother

from .capture import unwrap_model

__all__ = ["TaskLossMixin", "soft_target_cross_entropy", "task_loss"]


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


def task_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    *,
    bare: bool,
    label_smoothing: float,
    model_loss: Callable[[], tuple[torch.Tensor, Any]],
) -> tuple[torch.Tensor, Any]:
    """``(loss, outputs)`` of one micro-batch; ``model_loss()`` is the Trainer's own loss of a transformers model."""
    labels = inputs.get("labels")
    soft = isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.ndim == 2
    if not bare and not soft:
        return model_loss()
    if not bare:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return soft_target_cross_entropy(logits, labels, label_smoothing), outputs
    if "pixel_values" not in inputs or "labels" not in inputs:
        raise KeyError(
            f"A bare (non-transformers) model gets inputs['pixel_values'] and inputs['labels']; the batch has "
            f"{sorted(inputs)}. Produce those two columns in your dataset transform or collator."
        )
    logits = model(inputs["pixel_values"])
    if soft:
        return soft_target_cross_entropy(logits, labels, label_smoothing), {"logits": logits}
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), {"logits": logits}


class TaskLossMixin:
    """``Trainer`` mixin: :func:`task_loss` as ``_task_loss(model, inputs)``, for transformers and bare models.

    A bare model (not a ``PreTrainedModel``) gets ``label_names = ["labels"]`` and keeps the ``pixel_values`` and
    label columns (``_set_signature_columns_if_needed``: its ``forward`` takes a tensor, so the Trainer cannot read
    the columns from its signature). ``label_smoothing_factor`` goes to the Trainer's label smoother for
    transformers models and to :func:`task_loss` for bare ones; ``Trainer.__init__``, which would read the bare
    model's missing ``config``, sees 0. Set up again for each model ``model_init`` builds (``_hp_search_setup``).
    """

    def __init__(self, model=None, args=None, *a, **kw):
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(model, args, *a, **kw)
        finally:
            args.label_smoothing_factor = smoothing
        self._setup_task_loss()

    def _setup_task_loss(self) -> None:
        self._bare_model = not isinstance(unwrap_model(self.model), PreTrainedModel)
        smoothing = self.args.label_smoothing_factor
        self.label_smoother = LabelSmoother(epsilon=smoothing) if smoothing and not self._bare_model else None
        if self._bare_model and not self.label_names:
            self.label_names = ["labels"]

    def _hp_search_setup(self, trial) -> None:
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            self._setup_task_loss()

    def _task_loss(self, model, inputs):
        model_loss = functools.partial(super().compute_loss, model, inputs, return_outputs=True, num_items_in_batch=None)
        return task_loss(model, inputs, bare=self._bare_model, label_smoothing=self.args.label_smoothing_factor,
                         model_loss=model_loss)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None and self._bare_model:
            self._signature_columns = ["pixel_values", "labels", "label", "label_ids"]
        super()._set_signature_columns_if_needed()
