"""How the cost of one regularised layer grows with batch size, token count and width (n and d).

For a token tensor ``(B, T, d)`` (``n = B * T`` rows) the script times, per implementation:

* ``gradient``: :class:`hf_vcreg.penalty.VCRegFunction` forward + backward (the extra work over the identity);
* ``loss``: the explicit penalty differentiated by autograd;
* ``block``: a transformers ``ViTLayer`` of width ``d`` (``d / 64`` heads, MLP ``4 d``) forward + backward on the
  same tensor, the work one regularised block does anyway; ``gradient / block`` is the overhead of VCReg on
  every block of a ViT of that shape.

Beside each time stands the floor this machine allows: the multiply-adds the ``gradient`` path must do
(forward ``Z^T Z`` with each off-diagonal block once where ``hf_vcreg`` blocks it, backward ``Z G``) at the
measured matmul rate, and the bytes it must move (read ``Z`` in the forward; read ``Z`` and the incoming
gradient and write the outgoing one in the backward) at the measured copy bandwidth. The FLOPs of the
statistics grow as ``n d^2``, those of a transformer block as ``n d^2`` plus ``n T d``: the ratio stays near a
constant, a few percent, whatever the batch size.

Usage::

    python benchmarks/scaling.py                 # CPU, 1 thread, its CPU time; benchmarks/results/scaling_cpu.*
    python benchmarks/scaling.py --device cuda --dtype bf16 --clock wall
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from hf_vcreg.penalty import VCRegFunction, VCRegSpec, explicit_penalty, gram_blocks

try:
    from benchmarks.overhead import code_commit, cpu_name, write_results
except ImportError:  # run as a script (python benchmarks/scaling.py): benchmarks/ itself is on sys.path
    from overhead import code_commit, cpu_name, write_results

RESULTS = Path(__file__).resolve().parent / "results"

# (B, T, d) per device: around the CPU goal's small ViT (64, 65, 192) and the GPU goal's ViT-B/16 (128, 197, 768)
SWEEPS = {
    "cpu": {
        "batch": [(b, 65, 192) for b in (8, 16, 32, 64, 128)],
        "tokens": [(64, t, 192) for t in (5, 17, 65, 257)],
        "width": [(64, 65, d) for d in (64, 128, 192, 384, 768)],
        # pooled features (T = 1) of a batch of 64: fewer rows than features, the n x n Gram path
        "pooled": [(64, 1, d) for d in (128, 256, 512, 1024)],
    },
    "cuda": {
        "batch": [(b, 197, 768) for b in (16, 32, 64, 128, 256)],
        "tokens": [(128, t, 768) for t in (50, 197, 785)],
        "width": [(128, 197, d) for d in (192, 384, 768, 1024, 1536)],
        "pooled": [(128, 1, d) for d in (512, 1024, 2048)],
    },
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _time(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-up runs (wall clock, or this thread's CPU
    time: with one torch thread all the work runs on it, and other jobs on a shared machine do not count)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = _clock()
        fn()
        _sync(device)
        times.append(_clock() - t0)
    return statistics.median(times)


def machine_rates(device, dtype, reps: int) -> dict:
    """Measured matmul rate (FLOP/s) and copy bandwidth (bytes/s) of this machine: the floors' units."""
    m = 2048 if device.type == "cpu" else 8192
    a = torch.randn(m, m, device=device, dtype=dtype)
    t_mm = _time(lambda: a @ a, device, reps)
    big = torch.randn(64 * 2**20 // 4, device=device)
    out = torch.empty_like(big)
    t_copy = _time(lambda: out.copy_(big), device, reps)
    return {"matmul_flops_per_s": 2 * m**3 / t_mm, "copy_bytes_per_s": 2 * big.numel() * 4 / t_copy}


def gradient_flops(n: int, d: int, device, dtype=torch.float32) -> float:
    """Multiply-adds x 2 of the ``gradient`` path: the (blocked) forward Gram plus the backward product.

    With fewer rows than features (and float32 matmuls: not under CUDA autocast) the ``n x n`` Gram ``Zc Zc^T``
    and the backward's ``A Zc`` replace them: ``4 n^2 d``.
    """
    if n < d and (device.type == "cpu" or dtype == torch.float32):
        return 4 * n * n * d
    k = gram_blocks(n, d, device)
    gram = 2 * n * d * d * ((k + 1) / (2 * k) if k >= 2 else 1.0)
    return gram + 2 * n * d * d


def measure(shape, device, dtype, reps, rates) -> dict:
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    b, t, d = shape
    n = b * t
    torch.manual_seed(0)
    x = torch.randn(b, t, d, device=device, requires_grad=True)
    gy = torch.randn(b, t, d, device=device)
    spec = VCRegSpec(alpha=0.1, beta=0.1, weight=1 / 12)
    cast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    one = torch.ones((), device=device)

    def run(fn):
        def step():
            with cast:
                y, pen, *_ = fn(x, 2, None, spec, None)
            torch.autograd.backward([y, pen], [gy, one])
            x.grad = None

        return step

    def identity():
        with cast:
            y = x.view_as(x)
        torch.autograd.backward([y], [gy])
        x.grad = None

    heads = max(1, d // 64)
    cfg = ViTConfig(hidden_size=d, num_attention_heads=heads, intermediate_size=4 * d, attn_implementation="sdpa")
    layer = ViTLayer(cfg).to(device)

    def block():
        with cast:
            y = layer(x)
            y = y[0] if isinstance(y, tuple) else y
        torch.autograd.backward([y], [gy.to(y.dtype)])
        x.grad = None
        layer.zero_grad(set_to_none=True)

    t_id = _time(identity, device, reps)
    t_grad = _time(run(VCRegFunction.apply), device, reps) - t_id
    t_loss = _time(run(explicit_penalty), device, reps) - t_id
    t_block = _time(block, device, reps)
    flops = gradient_flops(n, d, device, dtype)
    elem = x.element_size()
    moved = (1 + 3) * n * d * elem  # forward: read Z; backward: read Z and dY, write dX
    floor_flop = flops / rates["matmul_flops_per_s"]
    floor_byte = moved / rates["copy_bytes_per_s"]
    return {
        "B": b, "T": t, "d": d, "n": n,
        "gradient_ms": t_grad * 1e3,
        "loss_ms": t_loss * 1e3,
        "block_ms": t_block * 1e3,
        "gradient_over_block": t_grad / t_block,
        "loss_over_block": t_loss / t_block,
        "gflop": flops / 1e9,
        "floor_ms": max(floor_flop, floor_byte) * 1e3,
        "floor_flop_ms": floor_flop * 1e3,
        "floor_byte_ms": floor_byte * 1e3,
        "gradient_over_floor": t_grad / max(floor_flop, floor_byte),
    }


def write_markdown(path: Path, result: dict) -> None:
    rates = result["rates"]
    lines = [
        f"# Cost of one VCReg layer against n and d ({result['device']}, {result['date']})",
        "",
        f"{result['machine']['cpu']}, torch {result['machine']['torch']}, code at commit "
        f"{result['machine'].get('commit')}, {result['threads']} threads, "
        f"{result['clock']} clock, "
        f"{result['dtype']}; load average before {result['loadavg_before']}, after {result['loadavg_after']}. "
        f"Measured matmul rate {rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, copy bandwidth "
        f"{rates['copy_bytes_per_s'] / 1e9:.1f} GB/s (the floor's units). Times: median of {result['reps']} runs, "
        "forward + backward, the identity's cost subtracted; `block` is a ViT block of width d on the same tensor.",
        "",
        "| sweep | B | T | d | n | gradient ms | floor ms (FLOP / byte) | gradient / floor | loss ms | block ms | "
        "gradient / block | loss / block |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sweep, rows in result["sweeps"].items():
        for r in rows:
            lines.append(
                f"| {sweep} | {r['B']} | {r['T']} | {r['d']} | {r['n']} | {r['gradient_ms']:.2f} | "
                f"{r['floor_ms']:.2f} ({r['floor_flop_ms']:.2f} / {r['floor_byte_ms']:.2f}) | "
                f"{r['gradient_over_floor']:.2f} | {r['loss_ms']:.2f} | {r['block_ms']:.2f} | "
                f"{100 * r['gradient_over_block']:.1f}% | {100 * r['loss_over_block']:.1f}% |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--clock", choices=sorted(CLOCK), default="cpu",
        help="cpu: this thread's CPU time (needs --threads 1 on the CPU; robust on a shared machine); wall: wall clock",
    )
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", help="output stem (default benchmarks/results/scaling_<device>)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.clock == "cpu" and (device.type != "cpu" or a.threads != 1):
        raise SystemExit("--clock cpu measures one thread's CPU time: use it with --device cpu --threads 1, else --clock wall")
    global _clock
    _clock = CLOCK[a.clock]
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    result = {
        "device": a.device,
        "dtype": a.dtype,
        "threads": a.threads,
        "clock": a.clock,
        "reps": a.reps,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(), "torch": torch.__version__,
                    "commit": code_commit()},
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
    }
    rates = machine_rates(device, dtype, a.reps)
    result["rates"] = rates
    result["sweeps"] = {}
    for sweep, shapes in SWEEPS["cuda" if device.type == "cuda" else "cpu"].items():
        rows = []
        for shape in shapes:
            r = measure(shape, device, dtype, a.reps, rates)
            rows.append(r)
            print(
                f"{sweep:6s} B={r['B']:4d} T={r['T']:4d} d={r['d']:4d}: gradient {r['gradient_ms']:.2f} ms "
                f"(floor {r['floor_ms']:.2f}), loss {r['loss_ms']:.2f}, block {r['block_ms']:.2f} "
                f"-> {100 * r['gradient_over_block']:.1f}% of a block",
                flush=True,
            )
        result["sweeps"][sweep] = rows
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    write_results(Path(a.out) if a.out else RESULTS / f"scaling_{a.device}", result, write_markdown)
    return result


if __name__ == "__main__":
    main()
