"""hf_vcreg: Variance-Covariance Regularization (VCReg, arXiv 2306.13292) for Hugging Face ``Trainer``.

The package follows the data flow: :mod:`~hf_vcreg.capture` (blocks and sample matrices) ->
:mod:`~hf_vcreg.penalty` (statistics, penalty, autograd function) -> :mod:`~hf_vcreg.trainer`
(``VCRegTrainer``, with :mod:`~hf_vcreg.config`'s ``VCRegConfig``) -> :mod:`~hf_vcreg.publishing`
(checkpoint format, model card, Hub push errors).
"""

from .capture import BlockCapture, feature_axis, find_blocks, select_layers
from .config import VCRegConfig
from .publishing import HubPushError
from .penalty import VCRegFunction, VCRegSpec, covariance_loss, covariance_matrix, variance_loss, vcreg_loss
from .trainer import VCRegTrainer

__version__ = "0.1.0"

__all__ = [
    "BlockCapture",
    "HubPushError",
    "VCRegConfig",
    "VCRegFunction",
    "VCRegSpec",
    "VCRegTrainer",
    "covariance_loss",
    "covariance_matrix",
    "feature_axis",
    "find_blocks",
    "select_layers",
    "variance_loss",
    "vcreg_loss",
]
