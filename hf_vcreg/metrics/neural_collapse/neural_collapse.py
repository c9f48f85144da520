"""Neural-collapse measures NC1 and CDNV, a local `evaluate` module.

Inputs: feature vectors h_i in R^d (an (N, d) matrix, e.g. penultimate-layer embeddings) and their
integer class labels y_i in K >= 2 classes (any integers; only the distinct values matter).
Notation: n_c samples in class c, mu_c = (1/n_c) sum_{y_i = c} h_i (class mean),
mu_G = (1/N) sum_i h_i (global mean over all samples, as in Papyan et al.).

NC1 (Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of deep
learning training", PNAS), within-class variability relative to between-class variability:

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T
    Sigma_B = (1/K) sum_c (mu_c - mu_G) (mu_c - mu_G)^T
    nc1     = trace(Sigma_W @ pinv(Sigma_B)) / K

Computed without forming pinv(Sigma_B): with the thin SVD M = U S V^T of the (K, d) matrix of rows
mu_c - mu_G, Sigma_B = V S^2 V^T / K, so nc1 = sum_k (v_k^T Sigma_W v_k) / s_k^2 over the singular
values s_k > max(K, d) * eps * max(s) (numpy's matrix_rank tolerance; the rest are rounding
noise of a matrix whose rank is at most K - 1). nc1 = 0 when every class has collapsed to its mean.

CDNV (Galanti, Gyorgy & Hutter 2022, "On the role of neural collapse in transfer learning", ICLR),
class-distance normalised variance, averaged over the K(K-1)/2 pairs of classes:

    var_c = (1/n_c) sum_{y_i = c} ||h_i - mu_c||^2
    cdnv  = mean_{i < j} (var_i + var_j) / (2 * ||mu_i - mu_j||^2)

Lower = more collapse (0 for collapsed classes); higher CDNV = less collapse. A pair of classes with
identical means has an infinite term, so cdnv = inf.
"""

import datasets
import evaluate
import numpy as np

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
    """NC1 and CDNV of labelled feature vectors (formulas in the module docstring)."""

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
        h, y = _check_inputs(embeddings, labels)
        return {"nc1": nc1(h, y), "cdnv": cdnv(h, y)}


def _check_inputs(embeddings, labels):
    """Return (h, y) as a float64 (N, d) array and an (N,) array; ValueError naming the problem."""
    try:
        h = np.asarray(embeddings, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"embeddings must be N feature vectors of the same length d: {err}") from None
    y = np.asarray(labels)
    if h.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) array of feature vectors; got shape {h.shape}")
    if y.ndim != 1 or len(y) != len(h):
        raise ValueError(f"embeddings has {len(h)} rows but labels has shape {y.shape}: need one label per row")
    classes = np.unique(y)
    if len(classes) < 2:
        found = f"{len(classes)} distinct label(s): {classes.tolist()}"
        raise ValueError(f"neural collapse needs at least 2 classes; got {found}")
    return h, y


def _class_means(h: np.ndarray, y: np.ndarray):
    """Distinct classes, (K, d) class means mu_c, and the within-class residuals h_i - mu_{y_i}."""
    classes, index = np.unique(y, return_inverse=True)
    counts = np.bincount(index).astype(np.float64)
    means = np.zeros((len(classes), h.shape[1]))
    np.add.at(means, index, h)
    means /= counts[:, None]
    return classes, means, h - means[index], index


def nc1(h: np.ndarray, y: np.ndarray) -> float:
    """NC1 = trace(Sigma_W @ pinv(Sigma_B)) / K = sum_k (v_k^T Sigma_W v_k) / s_k^2 (see module docstring)."""
    classes, means, residuals, _ = _class_means(h, y)
    k, d = means.shape
    centred_means = means - h.mean(axis=0)  # rows mu_c - mu_G
    _, s, vt = np.linalg.svd(centred_means, full_matrices=False)
    keep = s > max(k, d) * np.finfo(np.float64).eps * s.max() if s.size and s.max() > 0 else np.zeros_like(s, bool)
    # v_k^T Sigma_W v_k = ||residuals @ v_k||^2 / N
    projected = residuals @ vt[keep].T
    within = (projected**2).sum(axis=0) / len(h)
    return float(np.sum(within / s[keep] ** 2))


def cdnv(h: np.ndarray, y: np.ndarray) -> float:
    """CDNV = mean_{i<j} (var_i + var_j) / (2 ||mu_i - mu_j||^2), var_c = mean ||h - mu_c||^2 over class c."""
    classes, means, residuals, index = _class_means(h, y)
    counts = np.bincount(index).astype(np.float64)
    variances = np.bincount(index, weights=(residuals**2).sum(axis=1)) / counts
    i, j = np.triu_indices(len(classes), k=1)
    distances = ((means[i] - means[j]) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(distances > 0, (variances[i] + variances[j]) / (2.0 * distances), np.inf)
    return float(terms.mean())
