"""Neural-collapse measures NC1 (Papyan et al. 2020) and CDNV (Galanti et al. 2022), a local `evaluate` module.

The formulas: :func:`hf_vcreg.metrics.representation.neural_collapse`, which computes them here.
"""

import datasets
import evaluate

from hf_vcreg.metrics.representation import neural_collapse

_DESCRIPTION = """
Neural-collapse measures of a labelled set of feature vectors.
nc1 = trace(Sigma_W @ pinv(Sigma_B)) / K (Papyan et al. 2020), with Sigma_W the within-class covariance
(1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T and Sigma_B the between-class covariance
(1/K) sum_c (mu_c - mu_G)(mu_c - mu_G)^T, mu_G the mean of all N samples.
cdnv = mean over class pairs i < j of (var_i + var_j) / (2 ||mu_i - mu_j||^2) (Galanti et al. 2022), with
var_c = mean squared distance of class-c features to their class mean. Both are 0 for fully collapsed
classes; higher = less collapse.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list` of `list` of `float`, or a 2-D array of shape (N, d)): one feature vector per example.
    labels (`list` of `int`): class of each example; at least 2 distinct values.
Returns:
    nc1 (`float`): trace(Sigma_W pinv(Sigma_B)) / K, >= 0.
    cdnv (`float`): mean pairwise class-distance normalised variance, >= 0 (inf if two class means coincide).
Raises:
    ValueError: if embeddings is not 2-D, if embeddings and labels differ in length, or if fewer than
        2 classes are present.
Examples:
    >>> nc = evaluate.load("hf_vcreg/metrics/neural_collapse")
    >>> nc.compute(embeddings=[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], labels=[0, 0, 1, 1])
    {'nc1': 0.0, 'cdnv': 0.0}
"""

_CITATION = """
@article{papyan2020prevalence,
  title={Prevalence of neural collapse during the terminal phase of deep learning training},
  author={Papyan, Vardan and Han, X. Y. and Donoho, David L.},
  journal={Proceedings of the National Academy of Sciences},
  volume={117}, number={40}, pages={24652--24663}, year={2020}
}
@inproceedings{galanti2022role,
  title={On the Role of Neural Collapse in Transfer Learning},
  author={Galanti, Tomer and Gy{\\"o}rgy, Andr{\\'a}s and Hutter, Marcus},
  booktitle={International Conference on Learning Representations},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NeuralCollapse(evaluate.Metric):
    """NC1 and CDNV of labelled feature vectors (see :func:`neural_collapse`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"embeddings": datasets.Sequence(datasets.Value("float64")), "labels": datasets.Value("int64")}
            ),
            reference_urls=["https://arxiv.org/abs/2008.08186", "https://arxiv.org/abs/2112.15121"],
        )

    def _compute(self, embeddings, labels):
        return neural_collapse(embeddings, labels)
