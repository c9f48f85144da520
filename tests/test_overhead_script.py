"""benchmarks/overhead.py writes a complete results file (structure and invariants only: no timing assertions)."""

import json

import pytest

from benchmarks import overhead


def test_overhead_script_writes_ratios_confidence_intervals_and_the_aa_check(tmp_path):
    stem = tmp_path / "overhead_tiny"
    overhead.main(["--preset", "cpu", "--models", "timm_resnet18", "--rounds", "4", "--warmup", "1",
                   "--batch-size", "4", "--threads", "1", "--out", str(stem)])
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["settings"]["rounds"] == 4 and result["machine"]["torch_threads"] == 1
    assert result["machine"]["commit"] is None or len(result["machine"]["commit"]) >= 7
    (m,) = result["models"]
    assert m["model"] == "timm_resnet18" and m["regularised_layers"] == 4
    assert set(m["step_ms"]) == {"plain", "plain_again", "gradient", "loss"}
    assert all(len(v) == 4 for v in m["step_ms"].values())
    lo, hi = m["aa"]["time_ratio_ci95"]
    assert lo <= m["aa"]["time_ratio"] <= hi
    for impl in ("gradient", "loss"):
        r = m[impl]
        ratios = sorted(a / b for a, b in zip(m["step_ms"][impl], m["step_ms"]["plain"]))
        assert r["time_ratio"] == pytest.approx((ratios[1] + ratios[2]) / 2, rel=1e-2)  # median of 4 (rounded ms)
        assert r["time_ratio_ci95"][0] <= r["time_ratio"] <= r["time_ratio_ci95"][1]
        assert r["memory_ratio"] == pytest.approx(r["peak_bytes"] / m["plain"]["peak_bytes"])
        assert r["peak_bytes"] > 0
    table = stem.with_suffix(".md").read_text()
    assert "| timm_resnet18 | 4 |" in table and "A/A ratio" in table and "95% CI" in table
