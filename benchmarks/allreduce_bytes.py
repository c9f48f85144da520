"""What ``vcreg_distributed_stats`` sends: the all-reduce bytes of one training step, counted and on paper.

With global statistics every regularised layer of ``d`` features all-reduces, per micro-batch, its row count and
column sums (``d + 1`` numbers) and its centred ``Z^T Z`` (``d^2`` numbers), in float32 whatever the model dtype:

* ``gradient`` implementation: ``4 (d^2 + d + 1)`` bytes per layer, in the forward pass only;
* ``loss`` implementation: ``4 (d^2 + d + 2)`` bytes in the forward (count and a finiteness flag) and the same
  again in the backward (``torch.distributed.nn``'s all-reduce differentiates to an all-reduce).

The payload does not depend on the batch size or the image size (``n``): only on the widths. The script trains two
steps of real models on 2 CPU processes (gloo) through ``VCRegTrainer`` and counts the bytes of every
``torch.distributed.all_reduce`` issued during the second step; DDP's own gradient all-reduce runs in C++ and is
not counted (it is reported beside, as the model's float32 gradient size). Shapes: timm ``vit_base_patch16_224``
(12 blocks, d = 768; run on 32 x 32 images, which changes no width) and ``resnet50`` (stages of 256, 512, 1024,
2048 channels; or its 16 bottleneck blocks, ``--vcreg_layers 'layer\\d\\.\\d+'``, on 64 x 64 images).

Usage::

    python benchmarks/allreduce_bytes.py      # starts itself on 2 processes; benchmarks/results/allreduce_bytes.*
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"
# name: (timm architecture, image size, vcreg_layers, feature widths of the regularised layers)
MODELS = {
    "vit_b16": ("vit_base_patch16_224", 32, "blocks", [768] * 12),
    "resnet50_stages": ("resnet50", 64, "blocks", [256, 512, 1024, 2048]),
    "resnet50_bottlenecks": ("resnet50", 64, r"layer\d\.\d+", [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3),
}
IMPLEMENTATIONS = ("gradient", "loss")


def paper_bytes(widths: list[int], implementation: str) -> int:
    """All-reduce payload of one micro-batch, in bytes (float32), for layers of the given widths."""
    if implementation == "gradient":
        return sum(4 * (d * d + d + 1) for d in widths)
    return sum(2 * 4 * (d * d + d + 2) for d in widths)


class AllReduceCounter:
    """Counts the bytes passed to ``torch.distributed.all_reduce`` while :attr:`counting` is on."""

    def __init__(self):
        self.counting, self.bytes, self.calls = False, 0, 0
        self.original = dist.all_reduce

    def __enter__(self):
        def all_reduce(tensor, *args, **kwargs):
            if self.counting:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.original
        return False


def measure(name: str, implementation: str) -> dict:
    """Two steps of 2 images per process; the all-reduce bytes of the second step."""
    import numpy as np
    import timm
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_vcreg import VCRegConfig, VCRegTrainer

    arch, size, layers, widths = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, img_size=size) if arch.startswith("vit") else \
        timm.create_model(arch, num_classes=10)
    rng = np.random.default_rng(0)
    data = Dataset.from_dict({"pixel_values": rng.standard_normal((8, 3, size, size)).astype(np.float32),
                              "labels": rng.integers(0, 10, 8)}).with_format("torch")
    counter = AllReduceCounter()

    class CountSecondStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            counter.counting = state.global_step == 1

        def on_step_end(self, args, state, control, **kwargs):
            counter.counting = False

    with tempfile.TemporaryDirectory() as out:
        args = VCRegConfig(
            output_dir=out, per_device_train_batch_size=2, max_steps=2, optim="sgd", learning_rate=1e-3,
            report_to="none", use_cpu=True, ddp_backend="gloo", save_strategy="no", logging_steps=100,
            disable_tqdm=True, vcreg_alpha=1.0, vcreg_beta=1.0, vcreg_layers=layers,
            vcreg_implementation=implementation, vcreg_distributed_stats=True,
        )
        trainer = VCRegTrainer(model=model, args=args, train_dataset=data, callbacks=[CountSecondStep()])
        with counter:
            trainer.train()
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name, "architecture": arch, "implementation": implementation, "layers": len(trainer.vcreg_layer_names),
        "widths": widths, "counted_bytes": counter.bytes, "all_reduce_calls": counter.calls,
        "paper_bytes": paper_bytes(widths, implementation), "gradient_bytes_fp32": 4 * params,
        "layer_names": trainer.vcreg_layer_names,
    }


def markdown(path: Path, result: dict) -> None:
    lines = [
        f"# All-reduce bytes of `vcreg_distributed_stats` per micro-batch ({result['date']})",
        "",
        f"{result['processes']} CPU processes (gloo), torch {result['torch']}, code at commit {result['commit']}. "
        "Counted: bytes passed to `torch.distributed.all_reduce` during one training step. Paper: "
        "`4 (d^2 + d + 1)` per layer (`gradient`), twice `4 (d^2 + d + 2)` (`loss`: forward and backward). "
        "DDP's gradient all-reduce (float32 gradients of every parameter) is shown for scale; it is not counted.",
        "",
        "| model | layers | implementation | calls | counted MB | paper MB | DDP gradients MB | VCReg / gradients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['implementation']} | {r['all_reduce_calls']} | "
            f"{r['counted_bytes'] / 1e6:.2f} | {r['paper_bytes'] / 1e6:.2f} | {r['gradient_bytes_fp32'] / 1e6:.1f} | "
            f"{r['counted_bytes'] / r['gradient_bytes_fp32']:.1%} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    if "RANK" not in os.environ:  # start 2 processes of this script
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               "--master_port=29577", __file__]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.run(cmd, env=env).returncode)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import code_commit, write_results

    runs = [measure(name, impl) for name in MODELS for impl in IMPLEMENTATIONS]
    if dist.get_rank() == 0:
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "processes": dist.get_world_size(), "torch": torch.__version__, "commit": code_commit(), "runs": runs,
        }
        write_results(RESULTS / "allreduce_bytes", result, markdown)
        print(json.dumps([{k: r[k] for k in ("model", "implementation", "counted_bytes", "paper_bytes")}
                          for r in runs], indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
