"""Representation metrics: plain functions, and the same as local `evaluate` modules.

The functions (:mod:`~hf_vcreg.metrics.representation`, formulas in their docstrings): ``effective_rank``
(Roy & Vetterli 2007) and ``neural_collapse`` (NC1 of Papyan et al. 2020, CDNV of Galanti et al. 2022).

The `evaluate` modules call them. Each lives in its own folder, ``METRICS_DIR / <name> / <name>.py``, as a
standard ``evaluate.Metric`` script, so it loads by path with no network access:

    >>> from hf_vcreg.metrics import load_metric
    >>> rank = load_metric("effective_rank")  # == evaluate.load(str(METRICS_DIR / "effective_rank"))
    >>> rank.compute(embeddings=[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])["effective_rank"]
    2.0

``evaluate`` is imported by :func:`load_metric` only, not by ``import hf_vcreg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .representation import effective_rank, neural_collapse

if TYPE_CHECKING:
    import evaluate

__all__ = ["METRICS_DIR", "available_metrics", "effective_rank", "load_metric", "neural_collapse"]

METRICS_DIR: Path = Path(__file__).resolve().parent
"""Folder that holds one sub-folder per metric module."""


def available_metrics() -> list[str]:
    """Names of the metric modules in `METRICS_DIR` (folders that contain ``<name>/<name>.py``)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load the shipped metric ``name`` offline: ``evaluate.load(str(METRICS_DIR / name), **kwargs)``.

    ``kwargs`` go to `evaluate.load` unchanged (e.g. ``experiment_id``, ``keep_in_memory``).
    Raises ValueError, listing the shipped metrics, if ``name`` is not one of them (instead of
    letting `evaluate.load` fall back to the Hub).
    """
    import evaluate

    names = available_metrics()
    if name not in names:
        raise ValueError(f"unknown hf_vcreg metric {name!r}; shipped metrics: {names}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
