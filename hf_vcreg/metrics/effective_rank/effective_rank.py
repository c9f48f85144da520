"""Effective rank of a set of feature vectors (Roy & Vetterli 2007), a local `evaluate` module.

For N feature vectors h_i in R^d stacked as rows of H (N, d), centred over the rows
(Hc = H - mean_i h_i), with singular values s_1, ..., s_m of Hc (m = min(N, d)):

    p_k            = s_k / sum_l s_l                       (normalised singular values, an L1 simplex)
    entropy        = -sum_k p_k log p_k                    (natural log; 0 log 0 = 0)
    effective_rank = exp(entropy)                          in [1, min(N - 1, d)]
    rank_ratio     = effective_rank / d                    in (0, 1]

effective_rank = d when all d singular values are equal (isotropic features) and 1 when the centred
features lie on a line (rank 1). No threshold is applied to small singular values: rounding noise of
size eps * s_1 changes the result by about eps * log(1/eps).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Effective rank (Roy & Vetterli 2007) of feature vectors: exp of the Shannon entropy of the normalised
singular values p_k = s_k / sum_l s_l of the row-centred (N, d) feature matrix, and rank_ratio =
effective_rank / d. A measure of dimensional collapse: 1 for rank-1 features, d for isotropic ones.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list` of `list` of `float`, or a 2-D array of shape (N, d)): one feature vector per
        example; N >= 2 and not all identical.
Returns:
    effective_rank (`float`): exp(-sum_k p_k log p_k), in [1, min(N - 1, d)].
    rank_ratio (`float`): effective_rank / d.
Raises:
    ValueError: if embeddings is not 2-D, has fewer than 2 rows, or all rows are identical (the centred
        matrix is zero and the entropy undefined).
Examples:
    >>> erank = evaluate.load("hf_vcreg/metrics/effective_rank")
    >>> erank.compute(embeddings=[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    {'effective_rank': 2.0, 'rank_ratio': 1.0}
"""

_CITATION = """
@inproceedings{roy2007effective,
  title={The effective rank: A measure of effective dimensionality},
  author={Roy, Olivier and Vetterli, Martin},
  booktitle={15th European Signal Processing Conference (EUSIPCO)},
  pages={606--610},
  year={2007}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EffectiveRank(evaluate.Metric):
    """exp(entropy of normalised singular values) of centred features (formula in the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://infoscience.epfl.ch/record/110188"],
        )

    def _compute(self, embeddings):
        h = _check_embeddings(embeddings)
        value = effective_rank(h)
        return {"effective_rank": value, "rank_ratio": value / h.shape[1]}


def _check_embeddings(embeddings) -> np.ndarray:
    """Return embeddings as a float64 (N, d) array with N >= 2; ValueError naming the problem."""
    try:
        h = np.asarray(embeddings, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"embeddings must be N feature vectors of the same length d: {err}") from None
    if h.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) array of feature vectors; got shape {h.shape}")
    if h.shape[0] < 2 or h.shape[1] < 1:
        raise ValueError(f"effective rank needs at least 2 feature vectors of dimension >= 1; got shape {h.shape}")
    return h


def effective_rank(h: np.ndarray) -> float:
    """exp(-sum_k p_k log p_k), p_k = s_k / sum_l s_l, s = singular values of the row-centred h."""
    s = np.linalg.svd(h - h.mean(axis=0), compute_uv=False)
    total = s.sum()
    if not total > 0:
        raise ValueError("all feature vectors are identical: the centred matrix is zero, its effective rank undefined")
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
