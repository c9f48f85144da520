"""The evidence suite (benchmarks/evidence.py) and its report, run end to end at tiny sizes.

Real data (Fashion-MNIST from the Debian package, scikit-learn digits, two moons), real models, real
``VCRegTrainer`` and the shipped ``evaluate`` metric modules; only the sizes are tiny (a few hundred images,
one epoch, the CNN only, one seed). These tests pin the structure of the results files and that every metric
is a number in its valid range; they say nothing about which method wins.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("sklearn")
from benchmarks import evidence, report  # noqa: E402
from benchmarks.data import FASHION_MNIST_ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(
    not any(FASHION_MNIST_ROOT.glob("train-images-idx3-ubyte*")),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)

PROBS = ("source_test_accuracy", "fine_probe_accuracy", "target_probe_accuracy", "many_shot_accuracy",
         "medium_shot_accuracy", "few_shot_accuracy", "penultimate_rank_ratio")


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    profile = evidence.PROFILES["tiny"]
    suite = evidence.Suite(profile, out, seeds=[0], models=["cnn"], command="pytest")
    suite.run(list(evidence.EXPERIMENTS))
    return out, suite


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_every_experiment_writes_json_markdown_and_metadata(suite_out):
    out, _ = suite_out
    for name in evidence.EXPERIMENTS:
        res = _load(out, name)
        assert res["experiment"] == name
        assert res["seeds"] == [0]
        assert res["machine"]["cores"] >= 1 and res["machine"]["cpu"]
        assert set(res["versions"]) >= {"torch", "transformers", "timm", "hf_vcreg"}
        assert res["profile"]["name"] == "tiny"
        assert res["wall_s"] >= 0
        assert res["date"].startswith("20")
        assert (out / f"{name}.md").read_text().startswith(f"# {name}")
        for run in res["runs"]:
            assert run["seed"] == 0
            assert set(run["vcreg"]) >= {"vcreg_alpha", "vcreg_beta", "vcreg_layers", "vcreg_delta"}
            assert run["training"]["seed"] == 0 and run["training"]["learning_rate"] > 0
    for png in ("summary.png", "starvation_boundaries.png", "effective_rank_per_block.png", "sweep_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_has_no_penalty_and_vcreg_runs_regularise_every_block(suite_out):
    out, _ = suite_out
    runs = _load(out, "hierarchical")["runs"]
    assert sorted(r["variant"] for r in runs) == ["baseline", "vcreg"]
    base = next(r for r in runs if r["variant"] == "baseline")
    reg = next(r for r in runs if r["variant"] == "vcreg")
    assert base["vcreg"]["vcreg_alpha"] == 0 and base["vcreg"]["vcreg_beta"] == 0
    assert base["regularised_layers"] == [] and base["final_penalty"] is None
    assert reg["regularised_layers"] == [f"resnet.encoder.stages.{i}" for i in range(4)]
    assert reg["final_penalty"] > 0


def test_metrics_are_numbers_in_their_valid_ranges(suite_out):
    out, _ = suite_out
    for name in ("hierarchical", "cross_dataset", "collapse", "long_tail", "ablations", "sweep"):
        for run in _load(out, name)["runs"]:
            m = run["metrics"]
            for key in PROBS:
                if key in m:
                    assert 0.0 <= m[key] <= 1.0, (name, key, m[key])
            assert 1.0 <= m["penultimate_effective_rank"] <= 128.0
            for block, rank in m["block_effective_rank"].items():
                assert 1.0 <= rank <= m["block_width"][block] + 1e-6, (block, rank)
    for run in _load(out, "collapse")["runs"]:
        for key in ("train_nc1", "train_cdnv", "test_nc1", "test_cdnv"):
            assert math.isfinite(run["metrics"][key]) and run["metrics"][key] > 0
    lt = _load(out, "long_tail")["runs"][0]["metrics"]
    counts = lt["train_class_counts"]
    assert counts[0] == 50 and counts[-1] == 5 and counts == sorted(counts, reverse=True)  # ratio 10 in "tiny"
    assert len(lt["per_class_accuracy"]) == 10


def test_starvation_reports_accuracy_with_the_dominant_feature_removed(suite_out):
    out, _ = suite_out
    res = _load(out, "starvation")
    assert {r["variant"] for r in res["runs"]} == {"baseline", "vcreg alpha=beta=1"}
    for run in res["runs"]:
        m = run["metrics"]
        for key in ("test_accuracy", "dominant_shuffled_accuracy", "dominant_zeroed_accuracy",
                    "minor_shuffled_accuracy", "minor_feature_ceiling_accuracy"):
            assert 0.0 <= m[key] <= 1.0
    reg = next(r for r in res["runs"] if r["variant"] != "baseline")
    assert reg["regularised_layers"] == ["hidden.0", "hidden.1"]


def test_sweep_selection_becomes_the_setting_of_later_comparisons(suite_out):
    out, suite = suite_out
    sel = _load(out, "sweep")["selection"]
    means = sel["mean_by_variant"]
    assert set(means) == {"alpha=0.1, beta=0.01", "alpha=0.1, beta=1"}
    assert means[sel["best_variant"]] == max(means.values())
    later = _load(out, "hierarchical")
    assert later["vcreg_main"] == {"vcreg_alpha": sel["best_alpha"], "vcreg_beta": sel["best_beta"]}
    ablations = {r["variant"]: r["vcreg"] for r in _load(out, "ablations")["runs"]}
    assert ablations["variance only"]["vcreg_beta"] == 0 and ablations["covariance only"]["vcreg_alpha"] == 0
    assert ablations["final block only"]["vcreg_layers"] == "last"
    assert ablations["smooth L1 (delta=0.1)"]["vcreg_delta"] == 0.1


def test_report_tables_show_mean_std_and_paired_difference(suite_out, tmp_path):
    out, _ = suite_out
    text = report.build(out, tmp_path / "RESULTS.md")
    assert "## Key results" in text and "## Where VCReg does not help" in text
    assert "## What this does and does not show" in text
    assert "| cnn | baseline |" in text and "seeds with Δ > 0" in text
    assert (tmp_path / "RESULTS.md").read_text() == text


def test_aggregate_pairs_seeds_and_uses_sample_std():
    runs = [
        {"model": "m", "variant": v, "seed": s, "metrics": {"acc": x}}
        for v, s, x in [("baseline", 0, 0.5), ("baseline", 1, 0.7), ("vcreg", 0, 0.6), ("vcreg", 1, 0.6)]
    ]
    agg = evidence.aggregate(runs, "acc")
    assert agg[("m", "baseline")]["mean"] == pytest.approx(0.6)
    assert agg[("m", "baseline")]["std"] == pytest.approx(math.sqrt(0.02))
    assert agg[("m", "vcreg")]["diff_mean"] == pytest.approx(0.0)
    assert agg[("m", "vcreg")]["diff_std"] == pytest.approx(math.sqrt(0.02))
    assert agg[("m", "vcreg")]["diff_positive"] == 1


def test_unknown_experiment_is_rejected_before_any_training(tmp_path):
    suite = evidence.Suite(evidence.PROFILES["tiny"], tmp_path, seeds=[0], models=["cnn"])
    with pytest.raises(ValueError, match="unknown experiment 'transfer'"):
        suite.run(["hierarchical", "transfer"])
    assert not list(tmp_path.glob("*.json"))
