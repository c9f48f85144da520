"""The evidence protocol (benchmarks/evidence/) end to end at the ``tiny`` profile, and its pure parts.

Real data (Fashion-MNIST from the Debian package, scikit-learn digits, two moons), real models, real
``VCRegTrainer``; only the sizes are tiny (a few hundred images, one epoch, the CNN only). These tests pin the
structure of the results files, the ranges of the metrics, the separation of validation and test, resuming, and
the report; they say nothing about which method wins. The selection rule and the paired intervals are checked
against hand-computed answers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("sklearn")
from benchmarks.evidence import experiments, reporting  # noqa: E402
from benchmarks.evidence.__main__ import main  # noqa: E402
from benchmarks.evidence.data import FASHION_MNIST_ROOT  # noqa: E402
from benchmarks.evidence.experiments import PROFILES, Suite, choose, selection_file, summarise  # noqa: E402
from benchmarks.evidence.features import extract  # noqa: E402
from benchmarks.evidence.models import FAMILIES  # noqa: E402
from benchmarks.evidence.runs import RunCache, spec_key  # noqa: E402
from benchmarks.evidence.stats import paired  # noqa: E402

needs_fashion_mnist = pytest.mark.skipif(
    not any(FASHION_MNIST_ROOT.glob("train-images-idx3-ubyte*")),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)
FRACTIONS = ("source_accuracy", "cross_domain_probe", "few_shot_probe", "hierarchical_probe", "balanced_accuracy",
             "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy")


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    suite = Suite(PROFILES["tiny"], out, families=("cnn",), command="pytest")
    trained = suite.run()
    reporting.build(out, out / "RESULTS.md")
    return out, trained


def _records(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


@needs_fashion_mnist
def test_results_files_hold_every_run_with_its_spec(suite_out):
    out, trained = suite_out
    records = _records(out)
    # tiny: 4 settings x 2 tasks x 1 seed (stage 1) + 2 placements x 2 tasks (stage 2) + 2 arms x 3 tasks x 2 seeds
    # (headline) - 4 shared with the sweep + 2 x 2 two-moons runs
    assert trained == len(records) == 8 + 4 + 12 - 4 + 4
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        assert r["key"] == spec_key(r["spec"]) and r["wall_s"] >= r["info"]["train_s"] > 0
    meta = json.loads((out / "suite.json").read_text())
    assert meta["profile"]["name"] == "tiny" and meta["families"] == ["cnn"]
    assert meta["sessions"][0]["runs_trained"] == trained and meta["machine"]["cores"] >= 1
    assert set(meta["versions"]) >= {"torch", "transformers", "timm", "hf_vcreg"}
    for png in ("sweep_cnn.png", "headline.png", "starvation_boundaries.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fashion_mnist
def test_metrics_are_numbers_in_their_valid_ranges(suite_out):
    out, _ = suite_out
    tasks = set()
    for r in _records(out):
        m, task = r["metrics"], r["spec"]["task"]
        tasks.add(task)
        if task == "starvation":
            assert all(0.0 <= m[k] <= 1.0 for k in m if k.endswith("accuracy")), m
            continue
        for split in ("val", "test"):
            assert 0.0 <= m[f"{split}_source_accuracy"] <= 1.0
        for key, value in m.items():
            if key.endswith(FRACTIONS):
                assert 0.0 <= value <= 1.0, (key, value)
        if task == "fine":
            assert 1.0 <= m["test_effective_rank"] <= 128.0
            assert all(math.isfinite(m[k]) and m[k] > 0 for k in ("test_nc1", "test_cdnv"))
            assert 0.0 <= m["test_variance_term"] <= 1.0 and m["test_covariance_term"] >= 0.0
        if task == "long_tail":
            counts = m["train_class_counts"]
            assert counts[0] == 60 and counts[-1] == 6 and counts == sorted(counts, reverse=True)  # ratio 10
            assert len(m["test_per_class_accuracy"]) == 10
    assert tasks == {"fine", "coarse", "long_tail", "starvation"}


@needs_fashion_mnist
def test_baselines_have_no_hooks_and_placements_regularise_their_modules(suite_out):
    out, _ = suite_out
    by_placement = {}
    for r in _records(out):
        if r["spec"]["task"] in ("fine", "coarse"):
            by_placement.setdefault(r["spec"]["vcreg"]["placement"], []).append(r["info"])
    assert all(i["layers"] == [] and i["penalty"] is None for i in by_placement[None])
    blocks = [f"resnet.encoder.stages.{s}.layers.{b}" for s in range(4) for b in range(2)]
    assert all(i["layers"] == blocks and i["penalty"] > 0 for i in by_placement["blocks"])
    assert all(i["layers"] == [f"resnet.encoder.stages.{s}" for s in range(4)] for i in by_placement["stages"])
    assert all(i["layers"] == ["resnet.encoder.stages.3.layers.1"] for i in by_placement["last"])


@needs_fashion_mnist
def test_selection_file_names_the_chosen_setting_and_its_validation_numbers(suite_out):
    out, _ = suite_out
    sel = json.loads((out / "selection.json").read_text())
    assert "validation splits only" in sel["rule"] and sel["max_source_drop_points"] == 0.5
    cnn = sel["families"]["cnn"]
    assert cnn["placement"] in ("blocks", "stages", "last") and cnn["layers"]
    stage1 = cnn["stage1"]["table"]
    assert set(stage1) == {"alpha=1, beta=0, blocks", "alpha=1, beta=10, blocks", "alpha=0.01, beta=0.1, blocks"}
    stage2 = cnn["stage2"]["table"]
    assert len(stage2) == 3 and cnn["stage1"]["chosen"] in stage2
    chosen = stage2[cnn["stage2"]["chosen"]]
    assert cnn["validation"] == {k: v for k, v in chosen.items() if k != "per_seed"}
    assert (cnn["vcreg_alpha"], cnn["vcreg_beta"]) == tuple(
        float(x.split("=")[1]) for x in cnn["stage1"]["chosen"].split(", ")[:2])
    assert cnn["constraint_met"] == (-chosen["source_delta"] <= 0.5)


@needs_fashion_mnist
def test_selection_reads_validation_metrics_only(suite_out):
    out, _ = suite_out
    plan = reporting.load_plan(out)
    before = selection_file(plan)
    generator = torch.Generator().manual_seed(0)
    for record in plan.cache.records.values():  # scramble every test metric: the selection must not move
        for key, value in record["metrics"].items():
            if key.startswith("test_") and isinstance(value, float):
                record["metrics"][key] = float(torch.rand((), generator=generator))
    assert selection_file(plan) == before
    # ... while a validation metric does move it: make the worst stage-1 setting the best transfer
    table = before["families"]["cnn"]["stage1"]["table"]
    worst = min(table, key=lambda k: table[k]["objective"])
    for record in plan.cache.records.values():
        spec = record["spec"]
        if spec["task"] in ("fine", "coarse") and experiments.label(spec["vcreg"]) == worst:
            for key in ("val_hierarchical_probe", "val_cross_domain_probe"):
                if key in record["metrics"]:
                    record["metrics"][key] += 0.5
            if "val_source_accuracy" in record["metrics"] and spec["task"] == "fine":
                record["metrics"]["val_source_accuracy"] += 0.5
    assert plan.stage1_result("cnn")["label"] == worst != before["families"]["cnn"]["stage1"]["chosen"]


def test_selection_rule_on_a_synthetic_sweep():
    # baseline per seed; three settings: A transfers best but costs 1 point of source accuracy, B is the best
    # eligible one, C the worst.
    runs = {}
    for seed, base in ((0, 0.80), (1, 0.82)):
        runs[("fine", "baseline", seed)] = {"val_source_accuracy": 0.90, "val_cross_domain_probe": base,
                                            "test_source_accuracy": 0.0}
        runs[("coarse", "baseline", seed)] = {"val_hierarchical_probe": 0.70}
        for name, src, cross, hier in (("A", -0.010, 0.10, 0.10), ("B", -0.004, 0.02, 0.04), ("C", 0.0, 0.0, -0.02)):
            runs[("fine", name, seed)] = {"val_source_accuracy": 0.90 + src, "val_cross_domain_probe": base + cross}
            runs[("coarse", name, seed)] = {"val_hierarchical_probe": 0.70 + hier}
    table = summarise(runs, ["A", "B", "C"], [0, 1])
    assert table["A"]["source_delta"] == pytest.approx(-1.0) and table["A"]["objective"] == pytest.approx(10.0)
    assert table["B"]["source_delta"] == pytest.approx(-0.4) and table["B"]["objective"] == pytest.approx(3.0)
    assert table["C"]["hierarchical_delta"] == pytest.approx(-2.0) and table["C"]["objective"] == pytest.approx(-1.0)
    assert table["B"]["per_seed"][1]["cross_domain_delta"] == pytest.approx(2.0)
    assert choose(table, max_drop=0.5) == {"label": "B", "constraint_met": True, "eligible": ["B", "C"]}
    assert choose(table, max_drop=1.01)["label"] == "A"
    assert choose(table, max_drop=-0.1) == {"label": "C", "constraint_met": False, "eligible": []}


def test_paired_delta_and_t_interval_by_hand():
    s = paired({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.83, 1: 0.84, 2: 0.82, 3: 0.99})  # seed 3 has no pair
    # d = (0.03, 0.02, 0.01): mean 0.02, sample std 0.01, t_{0.975, 2} = 4.302652729911275
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert s["seeds"] == [0, 1, 2] and s["n"] == 3 and s["positive"] == 3
    assert s["delta_mean"] == pytest.approx(0.02) and s["delta_std"] == pytest.approx(0.01)
    assert s["ci_low"] == pytest.approx(0.02 - half) and s["ci_high"] == pytest.approx(0.02 + half)
    assert s["baseline_mean"] == pytest.approx(0.81) and s["treated_std"] == pytest.approx(0.01)
    one = paired({0: 0.5}, {0: 0.4})
    assert one["ci_low"] is None and one["delta_std"] == 0.0 and one["positive"] == 0
    with pytest.raises(ValueError, match="no seed in common"):
        paired({0: 0.5}, {1: 0.4})


@needs_fashion_mnist
def test_a_second_invocation_trains_nothing_and_a_lost_run_is_retrained_identically(suite_out, tmp_path):
    out, _ = suite_out
    again = tmp_path / "again"
    shutil.copytree(out, again)
    runs = (again / "runs.jsonl").read_text()
    assert Suite(PROFILES["tiny"], again, families=("cnn",)).run() == 0
    assert (again / "runs.jsonl").read_text() == runs
    assert [s["runs_trained"] for s in json.loads((again / "suite.json").read_text())["sessions"]] == [24, 0]
    # A copy whose last run was cut short by a kill: only that run is trained again, to the same numbers.
    cut = tmp_path / "cut"
    cut.mkdir()
    lines = runs.splitlines()
    (cut / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    (cut / "suite.json").write_text((out / "suite.json").read_text())
    assert Suite(PROFILES["tiny"], cut, families=("cnn",)).run() == 1
    lost = json.loads(lines[-1])
    assert RunCache(cut / "runs.jsonl").records[lost["key"]]["metrics"] == lost["metrics"]


@needs_fashion_mnist
@pytest.mark.slow
def test_two_worker_processes_train_the_same_runs_as_one_process(suite_out, tmp_path):
    out, trained = suite_out
    assert Suite(PROFILES["tiny"], tmp_path, families=("cnn",), jobs=2).run() == trained
    one = {r["key"]: r["metrics"] for r in _records(out)}
    two = {r["key"]: r["metrics"] for r in _records(tmp_path)}
    assert two == one  # same runs, same numbers: a run does not depend on the process or the order it ran in


@needs_fashion_mnist
def test_report_regenerates_byte_identically_and_shows_the_protocol(suite_out):
    out, _ = suite_out
    written = (out / "RESULTS.md").read_bytes()
    (out / "RESULTS.md").unlink()
    assert main(["report", "--results", str(out)]) == 0  # default: RESULTS.md inside a results folder of its own
    assert (out / "RESULTS.md").read_bytes() == written
    text = written.decode()
    for heading in ("## Protocol", "## Baselines", "## Chosen settings (validation)", "## Headline",
                    "## Where VCReg does not help", "## Sweep, stage 1", "## Sweep, stage 2", "## Gradient starvation"):
        assert heading in text
    assert "validation set of 300 images" in text and "95 % CI of Δ" in text
    base = [r["metrics"]["val_source_accuracy"] for r in _records(out)
            if r["spec"]["task"] == "fine" and r["spec"]["vcreg"]["placement"] is None]
    assert len(base) == 2 and f"| cnn | {50 * (base[0] + base[1]):.1f} ± " in text  # the baselines table reads the runs


def test_feature_extraction_records_the_classifier_input():
    x = torch.randn(5, 1, 28, 28)
    cnn = FAMILIES["cnn"].build(10, 0).eval()
    logits, feats = extract(cnn, "resnet.pooler", FAMILIES["cnn"].pool, x, batch=2)
    with torch.no_grad():
        expected = cnn.resnet(x).pooler_output.flatten(1)
        torch.testing.assert_close(feats, expected)
        torch.testing.assert_close(logits, cnn.classifier(expected))
    vit = FAMILIES["vit"].build(4, 0).eval()
    _, feats = extract(vit, FAMILIES["vit"].feature_module, FAMILIES["vit"].pool, x)
    with torch.no_grad():
        torch.testing.assert_close(feats, vit.vit(x).last_hidden_state[:, 0])
    assert not cnn._forward_hooks and not cnn.resnet.pooler._forward_hooks  # hooks removed again


def test_every_family_has_its_placements_and_features():
    expected = {"cnn": {"blocks": 8, "stages": 4, "last": 1}, "vit": {"blocks": 4, "last": 1, "subset": 2},
                "timm_cnn": {"blocks": 4, "last": 1}, "timm_vit": {"blocks": 4, "last": 1, "subset": 2}}
    for name, family in FAMILIES.items():
        model = family.build(10, 0)
        placements = family.placements(model)
        assert {k: len(v) for k, v in placements.items()} == expected[name]
        assert placements["last"] == placements["blocks"][-1:]
        logits, feats = extract(model, family.feature_module, family.pool, torch.randn(3, 1, 28, 28))
        assert logits.shape == (3, 10) and feats.shape[0] == 3 and feats.dim() == 2


def test_unknown_family_or_experiment_is_refused_before_any_training(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model families \['resnet'\]"):
        Suite(PROFILES["tiny"], tmp_path, families=("resnet",))
    with pytest.raises(ValueError, match=r"unknown experiments \['transfer'\]"):
        Suite(PROFILES["tiny"], tmp_path, families=("cnn",), experiments=("sweep", "transfer"))
    assert not list(tmp_path.iterdir())


def test_a_results_folder_of_another_profile_is_refused(tmp_path):
    text = json.dumps({"profile": dataclasses.asdict(PROFILES["quick"]), "sessions": []})
    (tmp_path / "suite.json").write_text(text)
    with pytest.raises(ValueError, match=r"holds the results of another profile \('quick'\)"):
        Suite(PROFILES["tiny"], tmp_path, families=("cnn",)).run()
    assert (tmp_path / "suite.json").read_text() == text and not (tmp_path / "runs.jsonl").exists()
