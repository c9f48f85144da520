"""Accuracy, a local `evaluate` module (drop-in for the Hub's ``evaluate.load("accuracy")``).

    accuracy = sum_i w_i * [prediction_i == reference_i] / sum_i w_i      (w_i = 1 by default)

Loads offline by path: ``evaluate.load("path/to/hf_vcreg/metrics/accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy: the (optionally weighted) fraction of predictions equal to their reference label,
accuracy = sum_i w_i * [prediction_i == reference_i] / sum_i w_i. Same inputs and output as the
Hub's `accuracy` metric (single-label classification), computed with numpy, with no network access.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, one per example.
    references (`list` of `int`): true labels, one per example.
    normalize (`bool`, default True): if False, return the (weighted) number of correct
        predictions instead of the fraction.
    sample_weight (`list` of `float`, optional): per-example weights w_i (default all 1).
Returns:
    accuracy (`float`): fraction correct in [0, 1] (or the weighted count if normalize=False).
Examples:
    >>> accuracy = evaluate.load("hf_vcreg/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references (see module docstring for the formula)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references must have the same length; got {predictions.shape} and {references.shape}"
            )
        if predictions.size == 0:
            raise ValueError("accuracy of zero examples is undefined: predictions and references are empty")
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight must have one weight per example; got {weights.shape} for {correct.shape}")
        total = float(np.sum(weights * correct))
        return {"accuracy": total / float(np.sum(weights)) if normalize else total}
