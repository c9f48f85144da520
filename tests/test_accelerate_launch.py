"""``examples/accelerate/*.yaml``: the configs users launch with, run as 2 CPU processes by ``accelerate launch``.

The configs are written for GPUs; the test overrides what a CPU machine needs on the command line, as a user would
(``--num_processes 2 --mixed_precision no``, and ``--use_cpu true`` for the script so that the processes form a gloo
group). accelerate runs FSDP only on accelerators (see ``tests/_cpu_engines.py``): the FSDP2 run goes through that
file, which turns accelerate's FSDP path on and then runs the script. The script is the README's
``examples/pretrain.py`` (digits, a small ViT) with global statistics.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import WORLD, assert_loss_is_task_loss_plus_penalty, free_port, run_launcher

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _accelerate_launch(config: str, output_dir: Path, tmp_path: Path) -> Path:
    """Train the VCReg run of examples/pretrain.py for 4 steps (checkpoint at step 4); return the run's folder."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    via = [str(ROOT / "tests" / "_cpu_engines.py")] if config == "fsdp2" else []
    cmd = [
        accelerate, "launch", "--config_file", str(ROOT / "examples" / "accelerate" / f"{config}.yaml"),
        "--num_processes", str(WORLD), "--mixed_precision", "no", "--main_process_port", str(free_port()),
        *via, str(ROOT / "examples" / "pretrain.py"),
        "--output_dir", str(output_dir), "--runs", "vcreg", "--seeds", "0", "--model_name", "vit",
        "--dataset_name", "digits", "--transfer", "none", "--max_steps", str(STEPS), "--max_train_samples", "64",
        "--per_device_train_batch_size", "8", "--logging_steps", "2", "--eval_strategy", "no",
        "--save_strategy", "steps", "--save_steps", str(STEPS), "--vcreg_distributed_stats", "true",
        "--use_cpu", "true",
    ]
    run_launcher(cmd, tmp_path / f"{config}.log", timeout=600)
    return output_dir / "vcreg-seed0"


@pytest.mark.slow  # two launches of the example script: about 1-2 minutes
def test_accelerate_ddp_and_fsdp2_configs_train_on_two_processes_with_finite_logs_and_loadable_checkpoints(tmp_path):
    from transformers import AutoModelForImageClassification

    runs = {config: _accelerate_launch(config, tmp_path / config, tmp_path) for config in ("ddp", "fsdp2")}
    histories = {}
    for config, run in runs.items():
        checkpoint = run / f"checkpoint-{STEPS}"
        files = {p.name for p in checkpoint.iterdir()}
        assert {f"rng_state_{r}.pth" for r in range(WORLD)} <= files  # one per process: 2 processes ran
        assert ("pytorch_model_fsdp.bin" in files) == (config == "fsdp2")  # the FSDP engine wrote it
        history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        lines = [h for h in history if "loss" in h]
        assert [h["step"] for h in lines] == [2, 4]
        assert all(math.isfinite(v) for h in lines for v in h.values() if isinstance(v, float))
        assert assert_loss_is_task_loss_plus_penalty(lines) == 2 and all(h["vcreg/penalty"] > 0 for h in lines)
        histories[config] = lines
        # The checkpoint and the final model load with plain from_pretrained and hold the same finite weights.
        model = AutoModelForImageClassification.from_pretrained(checkpoint)
        final = AutoModelForImageClassification.from_pretrained(run).state_dict()
        assert all(torch.isfinite(v).all() for v in final.values())
        assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
        assert load_file(run / "model.safetensors").keys() == load_file(checkpoint / "model.safetensors").keys()
    # Same data, seed and global statistics: sharding changes nothing in the logged numbers.
    for a, b in zip(histories["ddp"], histories["fsdp2"]):
        for k in ("loss", "task_loss", "vcreg/penalty", "vcreg/variance", "vcreg/covariance"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k
