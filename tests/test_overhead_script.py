"""benchmarks/overhead.py writes a complete results file (structure and invariants only: no timing assertions)."""

import functools
import json
import shutil
import re
import subprocess
from pathlib import Path

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
    # the library's default for a CNN: hf_vcreg.config.RECOMMENDED["cnn"]["vcreg_layers"] ("last": layer4.1)
    assert m["model"] == "timm_resnet18" and m["regularised_layers"] == 1
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
    assert "| timm_resnet18 | 1 |" in table and "A/A ratio" in table and "95% CI" in table


def test_code_commit_marks_changed_code_dirty_but_not_new_results_files(tmp_path):
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    run = functools.partial(subprocess.run, cwd=tmp_path, check=True, capture_output=True)
    run([git, "init", "-q"])
    for rel in ("hf_vcreg/penalty.py", "benchmarks/overhead.py", "benchmarks/results/overhead_cpu.md", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    run([git, "add", "."])
    run([git, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c"])
    sha = run([git, "rev-parse", "--short", "HEAD"], text=True).stdout.strip()
    assert overhead.code_commit(tmp_path) == sha
    # an earlier run's results (new and changed files) and files outside the measured code do not count
    (tmp_path / "benchmarks/results/overhead_cpu_run2.json").write_text("{}\n")
    (tmp_path / "benchmarks/results/overhead_cpu.md").write_text("y\n")
    (tmp_path / "README.md").write_text("y\n")
    assert overhead.code_commit(tmp_path) == sha
    # a change to the library or to a benchmark script does
    (tmp_path / "hf_vcreg/penalty.py").write_text("y\n")
    assert overhead.code_commit(tmp_path) == sha + "+dirty"
    run([git, "checkout", "-q", "--", "hf_vcreg/penalty.py"])
    (tmp_path / "benchmarks/scaling.py").write_text("new\n")
    assert overhead.code_commit(tmp_path) == sha + "+dirty"
    assert overhead.code_commit(tmp_path / "not-a-repo-path") is None


def test_performance_doc_quotes_the_committed_results_files():
    """Every time ratio in docs/performance.md's table is the one its linked results file records."""
    root = Path(__file__).resolve().parent.parent
    readme = root.joinpath("docs/performance.md").read_text()
    block = readme[readme.index("<!-- performance -->") : readme.index("<!-- /performance -->")]
    links = re.findall(r"\[(\d+)\]\(\.\./benchmarks/results/(overhead_cpu[\w]*)\.md\)", block)
    assert [int(n) for n, _ in links] == list(range(1, len(links) + 1)) and len(links) >= 8
    results = [json.loads(root.joinpath("benchmarks/results", f"{stem}.json").read_text()) for _, stem in links]
    rows = {"hf_vit_small": "| small ViT", "timm_resnet18": "| timm ResNet-18"}
    for model, prefix in rows.items():
        (row,) = [line for line in block.splitlines() if line.startswith(prefix)]
        quoted = [float(v.strip("* ")) for v in row.split("|")[3].split("/")]
        recorded = [next(m for m in r["models"] if m["model"] == model)["gradient"]["time_ratio"] for r in results]
        assert quoted == [round(v, 3) for v in recorded], model
        mean = float(re.search(r"mean (\d\.\d+)", row).group(1))
        assert mean == round(sum(recorded) / len(recorded), 3), model
        met = int(re.search(r"met in (\d+) of (\d+) runs", row).group(1))
        assert met == sum(v <= 1.05 for v in recorded) and row.count("**") // 2 == met, model
