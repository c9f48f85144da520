"""Paired comparisons over seeds: mean, sample std and a Student-t confidence interval of the differences."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["paired"]


def paired(baseline: dict[int, float], treated: dict[int, float], confidence: float = 0.95) -> dict:
    """Compare two arms run with the same seeds.

    With ``d_s = treated[s] - baseline[s]`` over the ``n`` seeds present in both::

        delta_mean = mean_s d_s
        delta_std  = sqrt(sum_s (d_s - delta_mean)^2 / (n - 1))                 (sample std)
        ci         = delta_mean -/+ t_{(1 + confidence) / 2, n - 1} * delta_std / sqrt(n)

    ``ci_low`` / ``ci_high`` are None for fewer than 2 seeds. Also: each arm's mean and sample std over those
    seeds (std 0 for one seed), ``positive`` = seeds with ``d_s > 0``, ``n`` and ``seeds``.
    """
    from scipy import stats

    seeds = sorted(set(baseline) & set(treated))
    if not seeds:
        raise ValueError(f"no seed in common: baseline seeds {sorted(baseline)}, treated seeds {sorted(treated)}")
    b = np.array([baseline[s] for s in seeds], dtype=np.float64)
    t = np.array([treated[s] for s in seeds], dtype=np.float64)
    d = t - b
    n = len(seeds)

    def std(x: np.ndarray) -> float:
        return float(x.std(ddof=1)) if n > 1 else 0.0

    out = {
        "n": n,
        "seeds": seeds,
        "baseline_mean": float(b.mean()),
        "baseline_std": std(b),
        "treated_mean": float(t.mean()),
        "treated_std": std(t),
        "delta_mean": float(d.mean()),
        "delta_std": std(d),
        "positive": int((d > 0).sum()),
        "ci_low": None,
        "ci_high": None,
    }
    if n > 1:
        half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * out["delta_std"] / math.sqrt(n)
        out["ci_low"], out["ci_high"] = out["delta_mean"] - half, out["delta_mean"] + half
    return out
