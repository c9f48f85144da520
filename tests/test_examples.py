"""examples/pretrain.py: the README's main job, at tiny size (same code path, two runs, printed table)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_pretrain_trains_baseline_and_vcreg_on_digits_and_prints_both(tmp_path, capsys):
    pretrain = _load("pretrain")
    results = pretrain.main(
        ["--output_dir", str(tmp_path), "--max_steps", "3", "--max_train_samples", "64",
         "--per_device_train_batch_size", "16", "--eval_strategy", "no", "--use_cpu", "true"]
    )
    assert set(results) == {"baseline", "vcreg"}
    for run in ("baseline", "vcreg"):
        assert 0.0 <= results[run]["eval_accuracy"] <= 1.0
        assert results[run]["eval_task_loss"] > 0
    assert "eval_vcreg/variance" not in results["baseline"]  # alpha = beta = 0: no hooks, no VCReg terms
    assert results["vcreg"]["eval_vcreg/variance"] >= 0 and results["vcreg"]["eval_vcreg/covariance"] >= 0
    out = capsys.readouterr().out
    assert "model=vit data=digits seed=0" in out
    assert [line.split()[0] for line in out.splitlines()[-2:]] == ["baseline", "vcreg"]
    assert (tmp_path / "vcreg" / "eval_results.json").is_file()


def test_pretrain_rejects_unknown_run_name(tmp_path):
    pretrain = _load("pretrain")
    with pytest.raises(ValueError, match=r"--runs 'baseline,fancy': unknown run\(s\) \['fancy'\]"):
        pretrain.main(["--output_dir", str(tmp_path), "--runs", "baseline,fancy"])
