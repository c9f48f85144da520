"""Effective rank of a set of feature vectors (Roy & Vetterli 2007), a local `evaluate` module.

The formula and its edge cases: :func:`hf_vcreg.metrics.representation.effective_rank`, which computes it here.
"""

import datasets
import evaluate

from hf_vcreg.metrics.representation import effective_rank

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
    """exp(entropy of normalised singular values) of centred features (see :func:`effective_rank`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://infoscience.epfl.ch/record/110188"],
        )

    def _compute(self, embeddings):
        return effective_rank(embeddings)
