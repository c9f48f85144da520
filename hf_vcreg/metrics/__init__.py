"""Evaluation metrics shipped with hf_vcreg as local `evaluate` modules.

Each metric lives in its own folder, ``METRICS_DIR / <name> / <name>.py``, as a standard
``evaluate.Metric`` script, so it loads by path with no network access:

    >>> import evaluate
    >>> from hf_vcreg.metrics import METRICS_DIR, load_metric
    >>> accuracy = load_metric("accuracy")  # == evaluate.load(str(METRICS_DIR / "accuracy"))
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
    0.666...

Metrics: ``accuracy`` (fraction of predictions equal to the references), ``neural_collapse``
(NC1 of Papyan et al. 2020 and the CDNV of Galanti et al. 2022, from feature vectors and labels),
``effective_rank`` (Roy & Vetterli 2007, from feature vectors). Formulas are in each script.

This module imports nothing else from hf_vcreg: the metric scripts are self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

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
    names = available_metrics()
    if name not in names:
        raise ValueError(f"unknown hf_vcreg metric {name!r}; shipped metrics: {names}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
