"""Cost of VCReg on every block: step time and peak memory of ``VCRegTrainer`` against a plain ``Trainer``.

One process, one model, one batch, one AdamW optimizer. Every round runs one training step of every variant
(plain, then VCReg with each implementation), in an order that rotates from round to round, so that a change
of machine load hits all variants alike. A step is ``trainer.training_step`` (forward, loss, backward) plus
``optimizer.step()`` and ``zero_grad``. Warm-up rounds are excluded; the reported time is the median over
rounds, and the ratio is the median over rounds of the paired ratio ``t_vcreg / t_plain`` (the ratio of the
two medians is reported beside it). Peak memory is measured on separate steps after the timed ones: on CUDA
with ``torch.cuda.max_memory_allocated``, on CPU from the profiler's allocation events (bytes live at the
peak of a step, plus the bytes alive before it: parameters, optimizer state, batch).

VCReg runs with the library's defaults (``VCRegConfig()``: every block, alpha/beta recommended for the model's family,
all rows unless ``vcreg_max_rows`` defaults otherwise), once per implementation (``gradient``, ``loss``).

Since issue 13 "every block" of a CNN means the residual blocks inside its stages (ResNet-18: 8 layers,
``layer1.0`` ... ``layer4.1``), not the 4 stages that the results measured before it regularised
(``vcreg_layers="stages"``).

Usage::

    python benchmarks/overhead.py --preset cpu            # small ViT + ResNet-18, 32x32, batch 64, fp32
    python benchmarks/overhead.py --preset gpu            # ViT-B/16 (transformers, timm), ResNet-50,
                                                           # ConvNeXt-T, 224x224, batch 128, bf16 autocast

Writes ``benchmarks/results/overhead_<device>.json`` and ``.md`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.capture import select_layers
from hf_vcreg.family import model_family
from hf_vcreg.penalty import scratch_bytes

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "cpu": dict(
        device="cpu", models=["hf_vit_small", "timm_resnet18"], image_size=32, batch_size=64, dtype="fp32",
        rounds=60, warmup=3, memory_steps=1, threads=2,
    ),
    "gpu": dict(
        device="cuda", models=["hf_vit_b16", "timm_vit_b16", "timm_resnet50", "timm_convnext_t"], image_size=224,
        batch_size=128, dtype="bf16", rounds=30, warmup=5, memory_steps=3, threads=None,
    ),
}


# ---------------------------------------------------------------------------------------------- models
def build_model(name: str, image_size: int, num_classes: int = 10) -> torch.nn.Module:
    """Randomly initialised models (nothing is downloaded)."""
    if name.startswith("hf_vit"):
        from transformers import ViTConfig, ViTForImageClassification

        if name == "hf_vit_small":  # hidden 192, 12 blocks, patch 4 (the CPU goal's small ViT)
            cfg = ViTConfig(
                hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                image_size=image_size, patch_size=4, num_labels=num_classes,
            )
        elif name == "hf_vit_b16":
            cfg = ViTConfig(image_size=image_size, patch_size=16, num_labels=num_classes)
        else:
            raise ValueError(f"unknown model {name!r}")
        return ViTForImageClassification(cfg)
    if name.startswith("timm_"):
        import timm

        arch = {
            "timm_resnet18": "resnet18",
            "timm_resnet50": "resnet50",
            "timm_vit_b16": "vit_base_patch16_224",
            "timm_vit_small": "vit_tiny_patch16_224",
            "timm_convnext_t": "convnext_tiny",
        }.get(name)
        if arch is None:
            raise ValueError(f"unknown model {name!r}")
        kwargs = {"img_size": image_size} if "vit" in arch else {}
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}: use hf_vit_small, hf_vit_b16 or timm_<arch>")


class PlainTrainer(Trainer):
    """A plain ``Trainer``; for a bare timm classifier the same cross-entropy ``VCRegTrainer`` computes."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if hasattr(model, "config") and hasattr(model.config, "model_type"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        logits = model(inputs["pixel_values"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def _static_cpu_bytes(model, optimizer, batch) -> int:
    state = [v for s in optimizer.state.values() for v in s.values()]
    return _tensor_bytes([*model.parameters(), *model.buffers(), *state, *batch.values()])


def _cpu_peak_increment(fn) -> int:
    """Bytes live at the peak of ``fn()`` beyond those live before it, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _median_ci(values: list[float], seed: int, resamples: int = 2000) -> list[float]:
    """95% bootstrap confidence interval of the median of ``values`` (percentile method)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


# Steps between two computations of the logged VCReg means in a timed VCReg variant (see Variant.step).
LOG_EVERY = 10


class Variant:
    def __init__(self, name: str, trainer: Trainer, optimizer, batch, device: str, dtype: str):
        self.name, self.trainer, self.optimizer, self.batch = name, trainer, optimizer, batch
        self.steps = 0
        self.device, self.dtype = device, dtype
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly

    def step(self) -> None:
        model = self.trainer.model
        with _autocast(self.device, self.dtype):
            self.trainer.training_step(model, dict(self.batch))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.trainer, VCRegTrainer):
            # No trace between steps: the next plain step must run without hooks (the trainer re-installs them).
            self.trainer._remove_hooks()
            # The logged means are computed when they are logged: time that too, as if logging every LOG_EVERY steps
            # (Trainer's default is 500: this counts its cost 50 times over).
            self.steps += 1
            if self.steps % LOG_EVERY == 0:
                self.trainer._pop_vcreg_metrics("train")

    def timed_step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0, time.process_time() - c0

    def peak_bytes(self, static: int) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        # the gradient path's reused CPU scratch buffers (hf_vcreg.penalty._scratch) are alive before the step, so
        # the profiler's increment misses them: count them as held memory of that variant
        held = scratch_bytes() if self.name == "gradient" else 0
        return static + held + _cpu_peak_increment(self.step)


def measure_model(name: str, opts: dict, implementations: list[str], seed: int, tmp: str) -> dict:
    device, dtype = opts["device"], opts["dtype"]
    torch.manual_seed(seed)
    model = build_model(name, opts["image_size"]).to(device)
    gen = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.randn(opts["batch_size"], 3, opts["image_size"], opts["image_size"], generator=gen),
        "labels": torch.randint(0, 10, (opts["batch_size"],), generator=gen),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    common = dict(output_dir=tmp, report_to=[], use_cpu=device == "cpu", seed=seed, disable_tqdm=True)

    # "plain_again", a second plain trainer timed like the others, is the A/A check: its ratio to "plain" shows
    # how far from 1.000 the measurement strays when nothing differs (the resolution of this run)
    variants = [Variant(name, PlainTrainer(model, TrainingArguments(**common), optimizers=(optimizer, None)),
                        optimizer, batch, device, dtype) for name in ("plain", "plain_again")]
    for impl in implementations:
        args = VCRegConfig(**common, vcreg_implementation=impl)
        trainer = VCRegTrainer(model, args, optimizers=(optimizer, None))
        variants.append(Variant(impl, trainer, optimizer, batch, device, dtype))
    vc_args = variants[-1].trainer.args if implementations else VCRegConfig(**common)

    rounds, warmup = opts["rounds"], opts["warmup"]
    per_round: list[dict[str, float]] = []
    cpu_round: list[dict[str, float]] = []
    for r in range(warmup + rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        times = {v.name: v.timed_step() for v in order}
        if r >= warmup:
            per_round.append({k: t[0] for k, t in times.items()})
            cpu_round.append({k: t[1] for k, t in times.items()})
    static = _static_cpu_bytes(model, optimizer, batch) if device == "cpu" else 0
    peaks = {v.name: max(v.peak_bytes(static) for _ in range(opts["memory_steps"])) for v in variants
             if v.name != "plain_again"}

    plain_ms = statistics.median(t["plain"] for t in per_round) * 1e3
    out = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "regularised_layers": len(select_layers(model, vc_args.vcreg_dict(model_family(model))["vcreg_layers"])),
        "plain": {"median_ms": plain_ms, "peak_bytes": peaks["plain"]},
    }
    aa = sorted(t["plain_again"] / t["plain"] for t in per_round)
    out["aa"] = {"time_ratio": statistics.median(aa), "time_ratio_ci95": _median_ci(aa, seed)}
    for impl in implementations:
        ratios = sorted(t[impl] / t["plain"] for t in per_round)
        med = statistics.median(t[impl] for t in per_round) * 1e3
        q = statistics.quantiles(ratios, n=4)
        out[impl] = {
            "median_ms": med,
            "time_ratio": statistics.median(ratios),
            "time_ratio_iqr": [q[0], q[2]],
            "time_ratio_ci95": _median_ci(ratios, seed),
            "ratio_of_medians": med / plain_ms,
            # CPU seconds used by this process: less sensitive to other jobs on a shared machine than wall time
            "cpu_time_ratio": statistics.median(t[impl] / t["plain"] for t in cpu_round),
            "peak_bytes": peaks[impl],
            "memory_ratio": peaks[impl] / peaks["plain"],
        }
    out["step_ms"] = {v.name: [round(t[v.name] * 1e3, 2) for t in per_round] for v in variants}
    out["step_cpu_ms"] = {v.name: [round(t[v.name] * 1e3, 2) for t in cpu_round] for v in variants}
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_commit(root: str | Path | None = None) -> str | None:
    """The commit of the measured code (``+dirty`` with uncommitted changes to it), or None outside a git checkout.

    The measured code is ``hf_vcreg/`` and ``benchmarks/`` except ``benchmarks/results/``: a results file written by
    an earlier run is not a change to what the next run measures.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        git = ["git", "-C", str(root)]
        sha = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        paths = ["hf_vcreg", "benchmarks", ":(exclude)benchmarks/results"]
        dirty = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(device: str) -> dict:
    import timm
    import transformers

    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": code_commit(),
    }
    info["cpu"] = cpu_name()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"# VCReg overhead on {result['device']} ({result['date']})",
        "",
        f"Preset `{result['preset']}`: {result['settings']['image_size']}x{result['settings']['image_size']} input, "
        f"batch {result['settings']['batch_size']}, {result['settings']['dtype']}, AdamW, "
        f"{result['settings']['rounds']} timed rounds after {result['settings']['warmup']} warm-up rounds "
        f"(plain and VCReg steps alternate in one process; a VCReg step's time includes computing its logged means, "
        f"done every {result['settings'].get('log_every', 'no')} steps), seed {result['seed']}.",
        f"VCReg settings (library defaults): `{json.dumps(result['vcreg_settings'])}`.",
        f"Machine: {result['machine'].get('gpu') or result['machine']['cpu']}, torch {result['machine']['torch']}, "
        f"transformers {result['machine']['transformers']}, timm {result['machine']['timm']}, "
        f"{result['machine']['torch_threads']} torch threads; code at commit {result['machine'].get('commit')}.",
        f"Load average (1, 5, 15 min) before: {result['loadavg_before']}, after: {result['loadavg_after']}.",
        "",
        "Time ratio: median over rounds of the wall-clock t_vcreg / t_plain of one round (IQR and a 95% bootstrap "
        "confidence interval of that median beside it; A/A: the same ratio for a second, identical plain step, the "
        "run's resolution); ratio of "
        "medians: median VCReg step / median plain step; CPU-time ratio: the same paired median of the CPU time this "
        "process used (less sensitive to other jobs on a shared machine); memory ratio: peak bytes of a VCReg step / "
        "of a plain step. Goal met: time ratio and memory ratio both within the goal.",
        "",
        "| model | layers | plain ms | impl | VCReg ms | time ratio | IQR | 95% CI | A/A ratio | ratio of medians | "
        "CPU-time ratio | peak plain MiB | peak VCReg MiB | memory ratio | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goal = result["goal"]
    for m in result["models"]:
        for impl in result["implementations"]:
            r = m[impl]
            met = r["time_ratio"] <= goal and r["memory_ratio"] <= goal
            lines.append(
                f"| {m['model']} | {m['regularised_layers']} | {m['plain']['median_ms']:.1f} | {impl} | "
                f"{r['median_ms']:.1f} | {r['time_ratio']:.3f} | {r['time_ratio_iqr'][0]:.3f}-"
                f"{r['time_ratio_iqr'][1]:.3f} | {r['time_ratio_ci95'][0]:.3f}-{r['time_ratio_ci95'][1]:.3f} | "
                f"{m['aa']['time_ratio']:.3f} | {r['ratio_of_medians']:.3f} | {r['cpu_time_ratio']:.3f} | "
                f"{m['plain']['peak_bytes'] / 2**20:.1f} | "
                f"{r['peak_bytes'] / 2**20:.1f} | {r['memory_ratio']:.3f} | {'yes' if met else 'no'} |"
            )
    if result.get("note"):
        lines += ["", result["note"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--models", help="comma-separated model names (default: the preset's)")
    p.add_argument("--implementations", default="gradient,loss")
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: the preset's; cpu preset 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=1.05, help="target ratio for time and memory")
    p.add_argument("--out", help="output stem (default benchmarks/results/overhead_<device>)")
    p.add_argument("--note", default="", help="free text added to the results (e.g. what the load was)")
    a = p.parse_args(argv)

    opts = dict(PRESETS[a.preset])
    for key in ("rounds", "warmup", "batch_size", "threads"):
        if getattr(a, key) is not None:
            opts[key] = getattr(a, key)
    models = a.models.split(",") if a.models else opts["models"]
    impls = [i for i in a.implementations.split(",") if i]
    for impl in impls:
        if impl not in ("gradient", "loss"):
            raise SystemExit(f"--implementations: {impl!r} is not 'gradient' or 'loss'")
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; none is visible. Use --preset cpu on this machine.")
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])

    result = {
        "preset": a.preset,
        "device": opts["device"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": a.seed,
        "settings": {
            **{k: opts[k] for k in ("image_size", "batch_size", "dtype", "rounds", "warmup")},
            "log_every": LOG_EVERY,
        },
        "goal": a.goal,
        "implementations": impls,
        "machine": machine_info(opts["device"]),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "note": a.note,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["vcreg_settings"] = {
            k: v for k, v in VCRegConfig(output_dir=tmp, report_to=[]).vcreg_dict().items()
            if k not in ("vcreg_log_per_layer",)
        }
        result["models"] = []
        for name in models:
            m = measure_model(name, opts, impls, a.seed, tmp)
            result["models"].append(m)
            summary = ", ".join(
                f"{i}: time x{m[i]['time_ratio']:.3f} (cpu x{m[i]['cpu_time_ratio']:.3f}) mem x{m[i]['memory_ratio']:.3f}"
                for i in impls
            )
            print(f"{name}: plain {m['plain']['median_ms']:.1f} ms (A/A x{m['aa']['time_ratio']:.3f}); {summary}",
                  flush=True)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_results(Path(a.out) if a.out else RESULTS / f"overhead_{opts['device']}", result, write_markdown)
    return result


def write_results(stem: Path, result: dict, markdown) -> None:
    """``stem.json`` (everything) and ``stem.md`` (``markdown(path, result)``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    markdown(stem.with_suffix(".md"), result)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
