r"""Representation metrics as plain functions: effective rank and neural collapse (NC1, CDNV).

Both take feature vectors as an ``(N, d)`` array (NumPy, a torch tensor, or nested lists: one row per example)
and return a dict of Python floats, computed in float64 with NumPy. The shipped ``evaluate`` modules
(``load_metric("effective_rank")``, ``load_metric("neural_collapse")``) call these functions.

    >>> from hf_vcreg import effective_rank, neural_collapse
    >>> effective_rank([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    {'effective_rank': 2.0, 'rank_ratio': 1.0}
    >>> neural_collapse([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1, 1])
    {'nc1': 0.0, 'cdnv': 0.0}
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["effective_rank", "neural_collapse"]


def _matrix(features: Any) -> np.ndarray:
    """``features`` as a float64 ``(N, d)`` array; ValueError naming the shape when it is not one."""
    if hasattr(features, "detach"):  # a torch tensor, possibly with a graph or on a device
        features = features.detach().cpu().numpy()
    try:
        h = np.asarray(features, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"embeddings must be N feature vectors of the same length d: {err}") from None
    if h.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) array of feature vectors; got shape {h.shape}")
    return h


def effective_rank(features: Any) -> dict[str, float]:
    r"""Effective rank (Roy & Vetterli 2007) of feature vectors: ``{"effective_rank", "rank_ratio"}``.

    For the ``(N, d)`` matrix ``H`` centred over the rows (``Hc = H - mean_i h_i``), with singular values
    ``s_1, ..., s_m`` of ``Hc`` (``m = min(N, d)``)::

        p_k            = s_k / sum_l s_l            (normalised singular values)
        effective_rank = exp(-sum_k p_k log p_k)    (natural log, 0 log 0 = 0), in [1, min(N - 1, d)]
        rank_ratio     = effective_rank / d         in (0, 1]

    ``d`` for isotropic features, 1 for features on a line: a measure of dimensional collapse. No threshold on
    small singular values: rounding noise of size ``eps * s_1`` changes the result by about ``eps log(1/eps)``.
    Raises ValueError for fewer than 2 rows, or when all rows are identical (the entropy is undefined).
    """
    h = _matrix(features)
    if h.shape[0] < 2 or h.shape[1] < 1:
        raise ValueError(f"effective rank needs at least 2 feature vectors of dimension >= 1; got shape {h.shape}")
    s = np.linalg.svd(h - h.mean(axis=0), compute_uv=False)
    total = s.sum()
    if not total > 0:
        raise ValueError("all feature vectors are identical: the centred matrix is zero, its effective rank undefined")
    p = s[s > 0] / total
    value = float(np.exp(-np.sum(p * np.log(p))))
    return {"effective_rank": value, "rank_ratio": value / h.shape[1]}


def neural_collapse(features: Any, labels: Any) -> dict[str, float]:
    r"""Neural-collapse measures of labelled feature vectors: ``{"nc1", "cdnv"}``; 0 = fully collapsed classes.

    ``features``: ``(N, d)``; ``labels``: ``N`` integer classes, at least 2 distinct (only distinct values
    matter). ``n_c`` samples in class ``c``, class mean ``mu_c``, global mean ``mu_G`` over all samples.

    NC1 (Papyan, Han & Donoho 2020, PNAS), within- relative to between-class variability::

        Sigma_W = (1/N) sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T
        Sigma_B = (1/K) sum_c (mu_c - mu_G) (mu_c - mu_G)^T
        nc1     = trace(Sigma_W @ pinv(Sigma_B)) / K

    computed without ``pinv``: with the thin SVD ``M = U S V^T`` of the ``(K, d)`` rows ``mu_c - mu_G``,
    ``nc1 = sum_k (v_k^T Sigma_W v_k) / s_k^2`` over ``s_k > max(K, d) * eps * max(s)`` (numpy's matrix_rank
    tolerance; the rest is rounding noise of a matrix of rank at most ``K - 1``).

    CDNV (Galanti, Gyorgy & Hutter 2022, ICLR), class-distance normalised variance over the ``K(K-1)/2`` pairs::

        var_c = (1/n_c) sum_{y_i = c} ||h_i - mu_c||^2
        cdnv  = mean_{i < j} (var_i + var_j) / (2 ||mu_i - mu_j||^2)

    ``inf`` when two class means coincide. Raises ValueError when ``labels`` is not one label per row or names
    fewer than 2 classes.
    """
    h = _matrix(features)
    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if y.ndim != 1 or len(y) != len(h):
        raise ValueError(f"embeddings has {len(h)} rows but labels has shape {y.shape}: need one label per row")
    classes, index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        found = f"{len(classes)} distinct label(s): {classes.tolist()}"
        raise ValueError(f"neural collapse needs at least 2 classes; got {found}")
    counts = np.bincount(index).astype(np.float64)
    means = np.zeros((len(classes), h.shape[1]))
    np.add.at(means, index, h)
    means /= counts[:, None]
    residuals = h - means[index]
    return {"nc1": _nc1(h, means, residuals), "cdnv": _cdnv(means, residuals, index, counts)}


def _nc1(h: np.ndarray, means: np.ndarray, residuals: np.ndarray) -> float:
    k, d = means.shape
    _, s, vt = np.linalg.svd(means - h.mean(axis=0), full_matrices=False)
    keep = s > max(k, d) * np.finfo(np.float64).eps * s.max() if s.size and s.max() > 0 else np.zeros_like(s, bool)
    within = ((residuals @ vt[keep].T) ** 2).sum(axis=0) / len(h)  # v_k^T Sigma_W v_k = ||residuals v_k||^2 / N
    return float(np.sum(within / s[keep] ** 2))


def _cdnv(means: np.ndarray, residuals: np.ndarray, index: np.ndarray, counts: np.ndarray) -> float:
    variances = np.bincount(index, weights=(residuals**2).sum(axis=1)) / counts
    i, j = np.triu_indices(len(means), k=1)
    distances = ((means[i] - means[j]) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(distances > 0, (variances[i] + variances[j]) / (2.0 * distances), np.inf)
    return float(terms.mean())
