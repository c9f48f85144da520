"""The README's generated blocks, rendered from committed results files.

Each block sits between ``<!-- name -->`` and ``<!-- /name -->`` in ``README.md``. ``tests/test_readme.py`` checks
that the README holds exactly what `render` returns for every block, so a number the README quotes cannot drift
from the file it comes from. ``python -m benchmarks.readme`` rewrites the blocks in place after new results land.

- ``expect``: what the defaults do, per family, from the evidence suite (``benchmarks/results/evidence``);
- ``demo``: the main command's output, from the summary files it wrote (``benchmarks/results/demo``);
- ``performance``: the cost per training step, from the overhead runs (``benchmarks/results/overhead_cpu*.json``);
- ``allreduce``: what global statistics add to a distributed step (``benchmarks/results/allreduce_bytes.json``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = Path("benchmarks/results/evidence")
DEMO = Path("benchmarks/results/demo")
FAMILY_NAMES = {"cnn": "CNN (ResNet-style, transformers)", "vit": "ViT (transformers)",
                "timm_cnn": "CNN (timm ResNet)", "timm_vit": "ViT (timm)"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render_expect(root: Path = ROOT) -> str:
    """Per family: the defaults the sweep chose and their paired test deltas (the evidence summary rows)."""
    from benchmarks.evidence.reporting import (
        SUMMARY_METRICS, _headline_seeds_text, _table, baseline_mean, load_plan, summary_rows,
    )

    results = root / EVIDENCE
    plan = load_plan(results)
    selection = json.loads((results / "selection.json").read_text())["families"]
    p = plan.profile
    rows = []
    for family, _setting, *cells in summary_rows(plan):
        chosen = selection[family]
        source = baseline_mean(plan, family, "fine", "test_source_accuracy")
        rows.append([FAMILY_NAMES.get(family, family),
                     f"alpha {chosen['vcreg_alpha']:g}, beta {chosen['vcreg_beta']:g}, {chosen['placement']}",
                     _pct(source), *cells])
    epochs = sorted({p.epochs[f] for f in plan.families})
    return "\n".join([
        f"Pretraining on Fashion-MNIST ({p.train_size:,} training images, {'/'.join(map(str, epochs))} epochs, "
        f"{_headline_seeds_text(plan)}; settings chosen on a held-out validation split, these numbers on the test "
        "splits). Paired Δ VCReg − baseline in points, 95 % interval in brackets, (seeds with Δ > 0 / seeds):",
        "",
        _table(["family", "default setting", "baseline source acc.", *[t for _, _, t in SUMMARY_METRICS]],
               rows).rstrip("\n"),
        "",
        "Cross-domain: a linear probe of handwritten digits on the frozen Fashion-MNIST features; hierarchical: the "
        "10 classes probed on a model pretrained on 4 superclasses; few-shot: the digits probe from "
        f"{p.few_shot_shots} images per class; long tail: balanced accuracy after pretraining on classes "
        f"imbalanced {p.imbalance_ratio:g} to 1.",
    ])


def render_demo(root: Path = ROOT) -> str:
    """The main command's summary table, verbatim from each committed run folder, with how it was run."""
    out = []
    runs = [(json.loads((folder / "summary.json").read_text()), folder) for folder in (root / DEMO).iterdir()]
    for summary, folder in sorted(runs, key=lambda r: (-r[0]["run"]["threads"], r[1].name)):  # the default first
        run = summary["run"]
        out += [f"`{run['command']}` with {run['threads']} torch thread(s), {run['wall_s']:.0f} s "
                f"({run['date'][:10]}, commit {run['commit']}):", "", "```text",
                (folder / "summary.md").read_text().rstrip("\n"), "```", ""]
    return "\n".join(out).rstrip("\n")


def render_performance(root: Path = ROOT) -> str:
    """Time and memory ratios VCRegTrainer / Trainer over every committed CPU overhead run."""
    runs = [json.loads(f.read_text()) for f in sorted((root / "benchmarks/results").glob("overhead_cpu*.json"))]
    names = {"hf_vit_small": "small ViT", "timm_resnet18": "timm ResNet-18"}
    parts = []
    for model, name in names.items():
        rows = [next(m for m in r["models"] if m["model"] == model) for r in runs]
        ratios = [m["gradient"]["time_ratio"] for m in rows]
        memory = [m["gradient"]["memory_ratio"] for m in rows]
        layers = sorted({m["regularised_layers"] for m in rows})
        parts.append(f"{name} ({'/'.join(map(str, layers))} regularised layers) {sum(ratios) / len(ratios):.3f}x "
                     f"time ({min(ratios):.3f}-{max(ratios):.3f}), {max(memory):.3f}x memory at most")
    return (f"A training step with VCReg against the plain `Trainer` step ({len(runs)} runs, CPU, 32x32 images, "
            f"batch 64, fp32): {'; '.join(parts)}.")


def render_allreduce(root: Path = ROOT) -> str:
    """Bytes all-reduced per micro-batch by ``vcreg_distributed_stats=True`` (default implementation), from
    ``benchmarks/results/allreduce_bytes.json``, beside the model's own fp32 gradient all-reduce."""
    data = json.loads((root / "benchmarks/results/allreduce_bytes.json").read_text())
    names = {"vit_b16": "ViT-B/16, 12 blocks", "resnet50_stages": "ResNet-50, 4 stages",
             "resnet50_bottlenecks": "ResNet-50, 16 bottleneck blocks"}
    parts = [f"{names[r['model']]}: {r['counted_bytes'] / 1e6:.1f} MB ({r['all_reduce_calls']} calls) against "
             f"{r['gradient_bytes_fp32'] / 1e6:.1f} MB of fp32 gradients"
             for r in data["runs"] if r["implementation"] == "gradient"]
    return ("With `vcreg_distributed_stats=True` each regularised layer of width d all-reduces 4(d² + d + 1) bytes "
            "per micro-batch (count, sum and the centred d x d matrix, fp32; twice that with "
            "`vcreg_implementation=\"loss\"`), measured on "
            f"{data['processes']} processes: " + "; ".join(parts) + ".")


BLOCKS = {"expect": render_expect, "demo": render_demo, "performance": render_performance,
          "allreduce": render_allreduce}


def _pattern(name: str) -> str:
    return rf"^<!-- {name} -->\n(?:(.*?)\n)?<!-- /{name} -->$"


def blocks(text: str) -> dict[str, str]:
    """``{name: content}`` of the generated blocks in a README text (content without the marker lines)."""
    out = {}
    for name in BLOCKS:
        m = re.search(_pattern(name), text, re.S | re.M)
        if m:
            out[name] = m.group(1) or ""
    return out


def render(root: Path = ROOT) -> dict[str, str]:
    return {name: fn(root) for name, fn in BLOCKS.items()}


def update(path: Path = ROOT / "README.md", names: list[str] | None = None) -> list[str]:
    """Rewrite the blocks present in ``path`` (or only ``names``); returns the names of those that changed."""
    text = path.read_text()
    changed = []
    for name, content in blocks(text).items():
        if names and name not in names:
            continue
        new = BLOCKS[name](path.parent)
        if new != content:
            text = re.sub(_pattern(name), lambda m: f"<!-- {name} -->\n{new}\n<!-- /{name} -->", text,
                          flags=re.S | re.M)
            changed.append(name)
    path.write_text(text)
    return changed


if __name__ == "__main__":
    # python -m benchmarks.readme [BLOCK ...]: rewrite those blocks (default: all) of README.md
    print("updated:", update(ROOT / "README.md", sys.argv[1:] or None) or "nothing")
