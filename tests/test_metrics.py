"""The representation metrics: plain functions and their `evaluate` modules (offline, exact values, clear errors)."""

import socket
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch

import hf_vcreg
from hf_vcreg.metrics import METRICS_DIR, available_metrics, load_metric


@pytest.fixture
def neural_collapse(request):
    return load_metric("neural_collapse", experiment_id=request.node.name)


@pytest.fixture
def effective_rank(request):
    return load_metric("effective_rank", experiment_id=request.node.name)


# NOTE: each test gets its own experiment_id: evaluate keeps the cache-file lock of a compute() that
# raised, and a later module with the same id waits 1 s for it before choosing another file.


def _no_network(*args, **kwargs):
    raise AssertionError(f"metric loading tried to open a network connection: {args}")


def test_shipped_metrics_are_the_two_modules():
    assert available_metrics() == ["effective_rank", "neural_collapse"]
    for name in available_metrics():
        assert (METRICS_DIR / name / f"{name}.py").is_file()


@pytest.mark.parametrize("name", ["effective_rank", "neural_collapse"])
def test_evaluate_load_by_path_works_offline_without_network(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    module = evaluate.load(str(METRICS_DIR / name))
    assert isinstance(module, evaluate.Metric)
    assert module.name == name
    assert module.description.strip() and module.citation.strip() and module.inputs_description.strip()


def test_load_metric_rejects_unknown_name_listing_shipped_metrics():
    with pytest.raises(ValueError, match=r"unknown hf_vcreg metric 'f1'.*effective_rank"):
        load_metric("f1")


def test_neural_collapse_is_zero_for_perfectly_collapsed_classes(neural_collapse):
    result = neural_collapse.compute(embeddings=[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], labels=[0, 0, 1, 1])
    assert result == {"nc1": 0.0, "cdnv": 0.0}


def test_neural_collapse_one_dimensional_hand_example(neural_collapse):
    # classes at -1 +- 0.5 and +1 +- 0.5: Sigma_W = 0.25, Sigma_B = 1, nc1 = 0.25 / 2;
    # var_0 = var_1 = 0.25, ||mu_0 - mu_1||^2 = 4, cdnv = 0.5 / 8.
    result = neural_collapse.compute(embeddings=[[-1.5], [-0.5], [0.5], [1.5]], labels=[0, 0, 1, 1])
    assert result["nc1"] == pytest.approx(0.125, rel=1e-12)
    assert result["cdnv"] == pytest.approx(0.0625, rel=1e-12)


def test_neural_collapse_two_dimensional_hand_example(neural_collapse):
    # class 0: (0,0), (2,0): mu_0 = (1,0), var_0 = 1.  class 1: (0,2), (0,6): mu_1 = (0,4), var_1 = 4.
    # cdnv = (1 + 4) / (2 * 17) = 5/34.  mu_G = (0.5, 2), Sigma_W = diag(0.5, 2),
    # Sigma_B = u u^T with u = (0.5, -2), ||u||^2 = 17/4: nc1 = (u^T Sigma_W u / ||u||^4) / 2 = 65/289.
    embeddings = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 6.0]])
    result = neural_collapse.compute(embeddings=embeddings, labels=np.array([0, 0, 1, 1]))
    assert result["nc1"] == pytest.approx(65 / 289, rel=1e-12)
    assert result["cdnv"] == pytest.approx(5 / 34, rel=1e-12)


def test_neural_collapse_matches_literal_formulas_on_unbalanced_random_data(neural_collapse):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 3, 7], [5, 9, 13])  # unbalanced, non-contiguous label values
    h = rng.normal(size=(len(labels), 4)) + 2.0 * rng.normal(size=(3, 4))[np.searchsorted([0, 3, 7], labels)]
    classes = [0, 3, 7]
    means = np.stack([h[labels == c].mean(axis=0) for c in classes])
    mu_g = h.mean(axis=0)
    residuals = h - means[np.searchsorted(classes, labels)]
    sigma_w = sum(np.outer(r, r) for r in residuals) / len(h)
    sigma_b = sum(np.outer(m - mu_g, m - mu_g) for m in means) / 3
    expected_nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / 3
    variances = [np.mean(np.sum((h[labels == c] - means[i]) ** 2, axis=1)) for i, c in enumerate(classes)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected_cdnv = np.mean([(variances[i] + variances[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
                             for i, j in pairs])
    result = neural_collapse.compute(embeddings=h.tolist(), labels=labels.tolist())
    assert result["nc1"] == pytest.approx(expected_nc1, rel=1e-9)
    assert result["cdnv"] == pytest.approx(expected_cdnv, rel=1e-12)
    scaled = neural_collapse.compute(embeddings=(7.0 * h + 3.0).tolist(), labels=labels.tolist())
    assert scaled["nc1"] == pytest.approx(result["nc1"], rel=1e-9)  # invariant to scale and shift
    assert scaled["cdnv"] == pytest.approx(result["cdnv"], rel=1e-12)


def test_neural_collapse_cdnv_is_infinite_when_two_class_means_coincide(neural_collapse):
    result = neural_collapse.compute(embeddings=[[-1.0], [1.0], [-2.0], [2.0]], labels=[0, 0, 1, 1])
    assert result["cdnv"] == float("inf")


def test_neural_collapse_single_class_raises_value_error(neural_collapse):
    with pytest.raises(ValueError, match=r"at least 2 classes; got 1 distinct label\(s\): \[4\]"):
        neural_collapse.compute(embeddings=[[1.0, 2.0], [3.0, 4.0]], labels=[4, 4])


def test_neural_collapse_mismatched_lengths_raise_value_error(neural_collapse):
    with pytest.raises(ValueError, match=r"Mismatch in the number of embeddings \(2\) and labels \(3\)"):
        neural_collapse.compute(embeddings=[[1.0, 2.0], [3.0, 4.0]], labels=[0, 1, 1])


def test_neural_collapse_ragged_embeddings_raise_value_error(neural_collapse):
    with pytest.raises(ValueError, match="same length d"):
        neural_collapse.compute(embeddings=[[1.0, 2.0], [3.0]], labels=[0, 1])


def test_effective_rank_of_isotropic_features_is_dimension(effective_rank):
    embeddings = np.concatenate([np.eye(5), -np.eye(5)])  # centred, all singular values sqrt(2)
    result = effective_rank.compute(embeddings=embeddings)
    assert result["effective_rank"] == pytest.approx(5.0, rel=1e-12)
    assert result["rank_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_effective_rank_of_rank_one_features_is_one(effective_rank):
    embeddings = np.outer([1.0, 2.0, 3.0, 4.0], [0.3, -1.0, 2.0])
    result = effective_rank.compute(embeddings=embeddings)
    assert result["effective_rank"] == pytest.approx(1.0, abs=1e-12)
    assert result["rank_ratio"] == pytest.approx(1 / 3, abs=1e-12)


def test_effective_rank_hand_example_with_singular_values_three_and_one(effective_rank):
    # centred matrix with singular values (3, 1): p = (3/4, 1/4), erank = (3/4)^(-3/4) * (1/4)^(-1/4).
    a, b = 3 / np.sqrt(2), 1 / np.sqrt(2)
    embeddings = np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]]) + np.array([10.0, -4.0])  # shift is centred out
    result = effective_rank.compute(embeddings=embeddings.tolist())
    expected = 0.75**-0.75 * 0.25**-0.25
    assert result["effective_rank"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.7547654, rel=1e-7)
    assert result["rank_ratio"] == pytest.approx(expected / 2, rel=1e-12)


def test_effective_rank_of_identical_rows_raises_value_error(effective_rank):
    with pytest.raises(ValueError, match="all feature vectors are identical"):
        effective_rank.compute(embeddings=[[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])


def test_effective_rank_of_a_single_row_raises_value_error(effective_rank):
    with pytest.raises(ValueError, match=r"at least 2 feature vectors.*\(1, 2\)"):
        effective_rank.compute(embeddings=[[1.0, 2.0]])


# ------------------------------------------------------------------------------ the plain functions
def test_plain_functions_equal_the_modules_and_take_torch_tensors(effective_rank, neural_collapse):
    rng = np.random.default_rng(1)
    labels = np.repeat([2, 5, 9], [7, 4, 6])
    h = rng.normal(size=(len(labels), 5)) + 3.0 * rng.normal(size=(3, 5))[np.searchsorted([2, 5, 9], labels)]
    assert hf_vcreg.effective_rank(h) == effective_rank.compute(embeddings=h.tolist())
    assert hf_vcreg.neural_collapse(h, labels) == neural_collapse.compute(embeddings=h.tolist(), labels=labels.tolist())
    tensor = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    assert hf_vcreg.effective_rank(tensor) == hf_vcreg.effective_rank(h)
    assert hf_vcreg.neural_collapse(tensor, torch.tensor(labels)) == hf_vcreg.neural_collapse(h, labels)


def test_plain_functions_raise_clear_errors():
    with pytest.raises(ValueError, match=r"2-D \(N, d\) array of feature vectors; got shape \(3,\)"):
        hf_vcreg.effective_rank([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"embeddings has 2 rows but labels has shape \(3,\)"):
        hf_vcreg.neural_collapse([[1.0], [2.0]], [0, 1, 1])


def test_import_hf_vcreg_adds_neither_evaluate_nor_datasets_to_what_transformers_imports():
    code = (
        "import sys; from transformers import Trainer; before = set(sys.modules); import hf_vcreg; "
        "print(sorted(m.split('.')[0] for m in set(sys.modules) - before if m.split('.')[0] in ('evaluate', 'datasets')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, hf_vcreg; print('evaluate' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
