"""Frozen features of a trained model and what the protocol measures on them.

- `extract`: logits and penultimate features in one pass, recorded by ``hf_vcreg.capture.BlockCapture`` (the
  library's own hooks) with a transform that returns the tensor unchanged;
- `linear_probe` / `few_shot_probe`: scikit-learn logistic regression on standardised frozen features;
- `representation_stats`: effective rank, NC1 / CDNV (``hf_vcreg.metrics``) and the VCReg variance / covariance
  terms (``hf_vcreg.penalty``) of a feature matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from hf_vcreg.capture import BlockCapture
from hf_vcreg.metrics import effective_rank, neural_collapse
from hf_vcreg.penalty import covariance_loss, variance_loss

from .models import Family

__all__ = ["accuracy", "extract", "few_shot_probe", "linear_probe", "representation_stats"]


@torch.no_grad()
def extract(model: nn.Module, feature_module: str, pool, x: torch.Tensor, batch: int = 1000):
    """``(logits, features)`` of ``x`` in eval mode: float32 ``(N, classes)`` and ``(N, d)``.

    ``features`` is ``pool(output of feature_module)``, i.e. the input of the classifier (see `Family`).
    """
    model.eval()
    recorded: list[torch.Tensor] = []

    def record(layer, tensor):
        recorded.append(pool(tensor).float())
        return tensor

    capture = BlockCapture(model, [feature_module], record)
    capture.install()
    logits = []
    try:
        with capture.active():
            for i in range(0, len(x), batch):
                out = model(x[i : i + batch])
                logits.append((out.logits if hasattr(out, "logits") else out).float())
    finally:
        capture.remove()
    return torch.cat(logits), torch.cat(recorded)


def extract_family(model: nn.Module, family: Family, x: torch.Tensor, batch: int = 1000):
    """`extract` with the family's feature module and pooling."""
    return extract(model, family.feature_module, family.pool, x, batch)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float((logits.argmax(1) == labels).double().mean())


def _probe(train_x: np.ndarray, train_y: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence warnings: max_iter is part of the protocol
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(train_x, train_y)


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], evals: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Accuracy on each of ``evals`` of a logistic regression (L2, C = 1, lbfgs, 1000 iterations) fitted on
    standardised ``train`` features: ``{name: accuracy}``."""
    clf = _probe(train[0].numpy(), train[1].numpy())
    return {name: float(clf.score(x.numpy(), y.numpy())) for name, (x, y) in evals.items()}


def few_shot_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
    shots: int,
    draws: int,
    seed: int = 0,
):
    """Mean accuracy over ``draws`` linear probes, each fitted on ``shots`` rows per class drawn from ``train``
    without replacement (``numpy.random.default_rng(seed)``, the same draws for every model): ``{name: mean}``."""
    x, y = train[0].numpy(), train[1].numpy()
    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {name: [] for name in evals}
    for _ in range(draws):
        rows = np.concatenate([rng.choice(np.flatnonzero(y == c), size=shots, replace=False) for c in np.unique(y)])
        clf = _probe(x[rows], y[rows])
        for name, (ex, ey) in evals.items():
            scores[name].append(float(clf.score(ex.numpy(), ey.numpy())))
    return {name: float(np.mean(v)) for name, v in scores.items()}


def representation_stats(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Statistics of a ``(N, d)`` feature matrix with its labels.

    ``effective_rank`` (Roy & Vetterli; higher = less dimensional collapse), ``nc1`` and ``cdnv`` (Papyan et al.;
    Galanti et al.; higher = less neural collapse), and the VCReg terms the penalty would see on these features:
    ``variance_term`` = V (``hf_vcreg.penalty.variance_loss``, gamma 1) and ``covariance_term`` = K
    (``covariance_loss``), both lower = closer to VCReg's target.
    """
    h = features.double()
    nc, rank = neural_collapse(h, labels), effective_rank(h)
    return {
        "effective_rank": float(rank["effective_rank"]),
        "nc1": float(nc["nc1"]),
        "cdnv": float(nc["cdnv"]),
        "variance_term": float(variance_loss(h)),
        "covariance_term": float(covariance_loss(h)),
    }
