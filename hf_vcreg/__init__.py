"""hf_vcreg: Variance-Covariance Regularization (VCReg, arXiv 2306.13292) for Hugging Face ``Trainer``.

The package follows the data flow: :mod:`~hf_vcreg.capture` (blocks and sample matrices) ->
:mod:`~hf_vcreg.penalty` (statistics, penalty, autograd function) -> :mod:`~hf_vcreg.trainer`
(``VCRegTrainer``, with :mod:`~hf_vcreg.config`'s ``VCRegConfig``) -> :mod:`~hf_vcreg.publishing`
(checkpoint format, model card, Hub push errors). General ``Trainer`` infrastructure sits beside the trainer:
:mod:`~hf_vcreg.checkpointing` (atomic checkpoints, strict resume), :mod:`~hf_vcreg.task_loss` (bare timm models,
soft targets), :mod:`~hf_vcreg.distributed` (equal batch counts, true logged means). :mod:`~hf_vcreg.metrics`
holds representation metrics.

The names below are the public API; internals (``BlockCapture``, ``find_blocks``, ``VCRegFunction``, ...) are
imported from their modules.
"""

from .config import VCRegConfig
from .metrics.representation import effective_rank, neural_collapse
from .penalty import covariance_loss, covariance_matrix, variance_loss, vcreg_loss
from .publishing import HubPushError
from .trainer import VCRegTrainer

__version__ = "0.1.0"

__all__ = [
    "HubPushError",
    "VCRegConfig",
    "VCRegTrainer",
    "covariance_loss",
    "covariance_matrix",
    "effective_rank",
    "neural_collapse",
    "variance_loss",
    "vcreg_loss",
]
