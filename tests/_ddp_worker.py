"""Worker for the multi-process tests of ``tests/test_distributed.py``, launched by ``torch.distributed.run``.

Usage (what the tests run)::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 --master_port=PORT \
        tests/_ddp_worker.py SCENARIOS.json OUT_DIR

``SCENARIOS.json`` is a list of scenario dicts (see :func:`run_scenario` and :func:`run_load`). Every rank
trains a ``VCRegTrainer`` (gloo, CPU) and writes what it saw to ``OUT_DIR/<name>.rank<r>.pt``: the batches it
received (so the single-process reference can rebuild the global batch exactly), the row counts that entered
the statistics (local and all-reduced), the log history, the final weights, and any exception raised, as
text. An exception in one scenario is recorded and the worker goes on with the next one.

The module is also imported by the tests for the model builders and the dataset, so both sides build the
same models from the same seeds.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
from torch import nn

MODEL_SEED = 1234
DATA_SEED = 99
NUM_LABELS = 3


# ---------------------------------------------------------------------------------------------- models and data
class TinyCNN(nn.Module):
    """A BatchNorm-free residual CNN taking ``pixel_values`` and returning logits.

    Blocks (found structurally): ``blocks.0``, ``blocks.1`` with ``(B, C, H, W)`` outputs (``B*H*W`` rows);
    ``embed`` is a pooled ``(B, width)`` layer (``B`` rows), the layer that runs out of rows first.
    """

    def __init__(self, channels: int = 6, width: int = 8, image_channels: int = 3, num_labels: int = NUM_LABELS,
                 depth: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 1))
            for _ in range(depth)
        )
        self.embed = nn.Sequential(nn.Linear(channels, width), nn.GELU(), nn.Linear(width, width))
        self.head = nn.Linear(width, num_labels)

    def forward(self, pixel_values):
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.embed(x.mean(dim=(2, 3))))


def build_model(kind: str, image_size: int = 8, seed: int = MODEL_SEED, depth: int = 2, **cnn_kwargs) -> nn.Module:
    """The same randomly initialised model on every rank and in the reference (seeded here); ``depth`` blocks."""
    torch.manual_seed(seed)
    if kind == "cnn":
        return TinyCNN(depth=depth, **cnn_kwargs)
    if kind == "timm_vit":  # saved in timm's format, loaded with timm.create_model("local-dir:...")
        import timm

        return timm.create_model("vit_tiny_patch16_224", img_size=image_size, patch_size=4, depth=depth, embed_dim=8,
                                 num_heads=2, mlp_ratio=2.0, num_classes=NUM_LABELS)
    if kind == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=image_size,
            patch_size=4,
            num_channels=3,
            hidden_size=8,
            num_hidden_layers=depth,
            num_attention_heads=2,
            intermediate_size=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=NUM_LABELS,
        )
        return ViTForImageClassification(config)
    raise ValueError(f"unknown model kind {kind!r}: use 'vit', 'timm_vit' or 'cnn'")


def make_dataset(n: int, image_size: int = 8, seed: int = DATA_SEED):
    """A ``datasets.Dataset`` of ``n`` random images (``pixel_values`` float32 ``(3, s, s)``) and labels."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n, 3, image_size, image_size)).astype(np.float32)
    labels = rng.integers(0, NUM_LABELS, size=n).astype(np.int64)
    return Dataset.from_dict({"pixel_values": pixels, "labels": labels}).with_format("torch")


def count_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def make_config(output_dir: str, scenario: dict, **overrides):
    """The ``VCRegConfig`` of a scenario: plain SGD, constant lr, no clipping, no decay, sequential data."""
    from hf_vcreg import VCRegConfig

    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=scenario["batch"],
        per_device_eval_batch_size=scenario.get("eval_batch", scenario["batch"]),
        learning_rate=scenario.get("lr", 0.5),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=7,
        disable_tqdm=True,
        gradient_accumulation_steps=scenario.get("ga", 1),
        dataloader_drop_last=scenario.get("drop_last", False),
        train_sampling_strategy="sequential",
        vcreg_alpha=scenario.get("alpha", 1.0),
        vcreg_beta=scenario.get("beta", 4.0),
        vcreg_implementation=scenario.get("impl", "gradient"),
        vcreg_distributed_stats=scenario.get("dist", True),
        vcreg_layers=scenario.get("layers", "blocks"),
        vcreg_log_per_layer=True,
        accelerator_config={"even_batches": scenario.get("even_batches", True)},
    )
    if scenario.get("steps") is not None:
        kwargs["max_steps"] = scenario["steps"]
    else:
        kwargs["num_train_epochs"] = scenario.get("epochs", 1)
    kwargs.update(overrides)
    return VCRegConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- recording
def recording_trainer_class():
    """``VCRegTrainer`` that records every batch it computes a loss on (and whether it was training)."""
    from hf_vcreg import VCRegTrainer

    class RecordingTrainer(VCRegTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[dict] = []
            self.local: list[dict] = []  # this rank's own values of every forward, before any averaging

        def _record_metrics(self, mode, task_loss, penalty, records):
            self.local.append({"mode": mode, "step": self.state.global_step, "task_loss": task_loss.item(),
                               "penalty": None if penalty is None else penalty.item(),
                               "layers": {r[0].name: (r[2].item(), r[3].item(), bool(r[4])) for r in records}})
            super()._record_metrics(mode, task_loss, penalty, records)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen.append(
                {
                    "training": bool(model.training),
                    "step": self.state.global_step,
                    "pixel_values": inputs["pixel_values"].detach().clone(),
                    "labels": inputs["labels"].detach().clone(),
                }
            )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return RecordingTrainer


class CountRecorder:
    """Wraps ``hf_vcreg.penalty._moments`` to record (local rows, global count) of every statistic computed."""

    def __init__(self):
        import hf_vcreg.penalty as penalty

        self.penalty = penalty
        self.original = penalty._moments
        self.calls: list[tuple[int, float]] = []

    def __enter__(self):
        original = self.original

        def moments(*args, **kwargs):
            n, mu, zc = original(*args, **kwargs)
            self.calls.append((zc.shape[0], float(n)))
            return n, mu, zc

        self.penalty._moments = moments
        return self

    def __exit__(self, *exc):
        self.penalty._moments = self.original
        return False


# ---------------------------------------------------------------------------------------------- scenarios
def run_scenario(scenario: dict, out_dir: str, rank: int) -> dict:
    """Train (and optionally evaluate) one scenario; return what this rank saw.

    Optional keys for resume runs: ``model_seed`` (initialisation), ``overrides`` (more ``VCRegConfig`` fields),
    ``output_dir`` (instead of ``OUT_DIR/<name>``), ``stop_at`` (stop after that step, ``test_resume.StopAt``) and
    ``resume`` (passed to ``train(resume_from_checkpoint=...)``).
    """
    result: dict = {"name": scenario["name"], "rank": rank, "error": None}
    # accelerate turns FSDP on for the rest of the process once a plugin was given (it sets this variable)
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    Trainer = recording_trainer_class()
    model = build_model(scenario["model"], seed=scenario.get("model_seed", MODEL_SEED), depth=scenario.get("depth", 2))
    train = make_dataset(scenario["n_train"])
    evalset = make_dataset(scenario["n_eval"], seed=DATA_SEED + 1) if scenario.get("n_eval") else None
    callbacks = []
    if scenario.get("stop_at") is not None:  # an interrupted job: stops after that step (its checkpoint is written)
        from test_resume import StopAt

        callbacks.append(StopAt(scenario["stop_at"]))
    trainer = None
    with CountRecorder() as counts:
        try:
            output_dir = scenario.get("output_dir") or os.path.join(out_dir, scenario["name"])
            args = make_config(output_dir, scenario, **scenario.get("overrides", {}))
            trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evalset, callbacks=callbacks)
            if scenario.get("train", True):
                trainer.train(resume_from_checkpoint=scenario.get("resume"))
                result["hooks_after_train"] = count_forward_hooks(model)
            if evalset is not None:
                result["eval_metrics"] = trainer.evaluate()
                result["hooks_after_eval"] = count_forward_hooks(model)
            if scenario.get("save_final"):
                result["saved_to"] = os.path.join(output_dir, "final")
                trainer.save_model(result["saved_to"])
        except Exception as err:  # recorded for the test to assert on; the other scenarios still run
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc()
    result["counts"] = counts.calls
    if trainer is not None:
        result["seen"] = trainer.seen
        result["local"] = trainer.local
        result["log_history"] = trainer.state.log_history
        result["global_step"] = trainer.state.global_step
        result["output_dir"] = trainer.args.output_dir
        result["records_after"] = len(trainer._vcreg_records)
        result["engine"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    result["sharded_params"] = sharded_parameters(model)
    result["state_dict"] = full_state_dict(model)
    return result


def sharded_parameters(model: nn.Module) -> int:
    """How many parameters this rank holds only a part of (FSDP2's DTensor shards, ZeRO-3's partitions)."""
    count = 0
    for p in model.parameters():
        if hasattr(p, "to_local"):
            count += p.to_local().numel() < p.numel()
        elif hasattr(p, "ds_tensor"):
            count += p.ds_tensor.numel() < p.ds_numel
    return count


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's copy of the whole state dict: FSDP2's DTensors gathered (``full_tensor``), ZeRO-3's partitioned
    parameters gathered (``GatheredParameters``); a collective on every rank under those engines."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_load(scenario: dict, out_dir: str, rank: int) -> dict:
    """Train for ``duration_s`` seconds (and at least ``min_steps`` steps) with checkpoints every few steps.

    Every ``sample_every`` steps each rank records its RSS, the live ``torch.Tensor`` objects (gc), the forward
    hooks on the model, ``trainer._vcreg_records`` and the buffered log values. The stop decision is
    all-reduced (MAX) so that every rank stops at the same step.
    """
    import torch.distributed as dist
    from transformers import TrainerCallback

    from hf_vcreg import VCRegTrainer

    duration = float(scenario["duration_s"])
    sample_every = int(scenario.get("sample_every", 10))
    min_steps = int(scenario.get("min_steps", 0))
    samples: list[dict] = []
    model = build_model("cnn", channels=scenario.get("channels", 32))
    train = make_dataset(scenario["n_train"], image_size=scenario.get("image_size", 32))
    holder: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            holder["t0"] = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            trainer = holder["trainer"]
            if state.global_step % sample_every == 0:
                gc.collect()
                samples.append(
                    {
                        "step": state.global_step,
                        "time": time.monotonic() - holder["t0"],
                        "rss": rss_bytes(),
                        "hooks": count_forward_hooks(model),
                        "records": len(trainer._vcreg_records),
                        "buffered": sum(len(v) for v in trainer._vcreg_metrics["train"].values()),
                        "tensors": sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)),
                    }
                )
            done = time.monotonic() - holder["t0"] >= duration and state.global_step >= min_steps
            stop = torch.tensor([1.0 if done else 0.0])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item() > 0:
                control.should_training_stop = True

    args = make_config(
        os.path.join(out_dir, scenario["name"]),
        scenario,
        max_steps=10**7,
        logging_steps=scenario.get("logging_steps", 5),
        save_strategy="steps",
        save_steps=scenario.get("save_steps", 5),
        save_total_limit=2,
        train_sampling_strategy="random",
    )
    trainer = VCRegTrainer(model=model, args=args, train_dataset=train, callbacks=[Probe()])
    holder["trainer"] = trainer
    trainer.train()
    return {
        "name": scenario["name"],
        "train_seconds": time.monotonic() - holder["t0"],
        "rank": rank,
        "error": None,
        "samples": samples,
        "global_step": trainer.state.global_step,
        "hooks_after_train": count_forward_hooks(model),
        "records_after": len(trainer._vcreg_records),
        "checkpoints": sorted(d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")),
        "log_history": trainer.state.log_history,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def main(argv: list[str]) -> int:
    import _cpu_engines

    _cpu_engines.enable()  # FSDP / DeepSpeed scenarios: accelerate's real engine code on CPU (see _cpu_engines)
    scenarios_path, out_dir = argv[1], argv[2]
    with open(scenarios_path) as f:
        scenarios = json.load(f)
    rank = int(os.environ["RANK"])
    for scenario in scenarios:
        runner = run_load if scenario.get("kind") == "load" else run_scenario
        result = runner(scenario, out_dir, rank)
        torch.save(result, os.path.join(out_dir, f"{scenario['name']}.rank{rank}.pt"))
    shutdown_process_group()
    return 0


def shutdown_process_group() -> None:
    """Tear the gloo group down explicitly: both ranks meet, then destroy it.

    Leaving it to interpreter shutdown let gloo's worker threads be destroyed while joinable on one rank
    ("terminate called without an active exception", SIGABRT, seen once in CI after a run had finished).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
