"""Generate ``benchmarks/RESULTS.md`` from the evidence suite's results files.

    python -m benchmarks.report [--results benchmarks/results/evidence] [--out benchmarks/RESULTS.md]

Everything in the report is computed from ``<results>/<experiment>.json`` (written by
``python -m benchmarks.evidence``): means and sample standard deviations over seeds, paired differences
VCReg - baseline per (model, seed), the number of seeds where VCReg is ahead, and a verdict per
experiment and model. Nothing is typed in by hand except the fixed prose of the caveats section.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .evidence import (
    HEADLINES, aggregate, fmt, is_fraction, load_results, markdown_table, plot_summary, select_defaults,
)

# The comparison shown in the key table: (experiment, metric, label, what "+" means).
KEY_ROWS = [
    ("hierarchical", "fine_probe_accuracy", "Hierarchical: 4 superclasses -> 10-class linear probe (acc. %)", "better"),
    ("cross_dataset", "target_probe_accuracy", "Cross-dataset: Fashion-MNIST -> digits linear probe (acc. %)", "better"),
    ("cross_dataset", "source_test_accuracy", "Source task: Fashion-MNIST 10-class test acc. (%)", "better"),
    ("long_tail", "source_test_accuracy", "Long tail (ratio 100): balanced test acc. (%)", "better"),
    ("long_tail", "few_shot_accuracy", "Long tail: few-shot (3 tail classes) acc. (%)", "better"),
    ("collapse", "test_cdnv", "Neural collapse: CDNV of test features", "less collapse"),
    ("collapse", "test_nc1", "Neural collapse: NC1 of test features", "less collapse"),
    ("collapse", "penultimate_effective_rank", "Effective rank of penultimate features", "more diverse"),
    ("starvation", "dominant_shuffled_accuracy", "Gradient starvation: acc. with dominant feature shuffled (%)", "less starvation"),
    ("starvation", "minor_feature_reliance", "Gradient starvation: acc. lost when minor feature x1 is shuffled (pts)",
     "more use of x1"),
]


def verdict(a: dict) -> str:
    """'+' / '−' when every seed moves the same way (and >= 3 seeds), else 'no consistent effect'."""
    if a["diff_mean"] is None:
        return ""
    n, pos = a["n"], a["diff_positive"]
    if n >= 3 and pos == n:
        return "**+** (all seeds)"
    if n >= 3 and pos == 0 and a["diff_mean"] < 0:
        return "**−** (all seeds)"
    return "no consistent effect"


def load(results: Path, extra_sweeps: list[Path] = ()) -> dict[str, dict]:
    """Results files of ``results``; the sweep runs of ``extra_sweeps`` (supplementary grids run later with
    ``--sweep-alphas/--sweep-betas``) are merged into the sweep (first run of each (model, variant, seed) kept)
    and the selection is recomputed over the merged grid."""
    out = load_results(results)
    if "starvation" in out:
        for run in out["starvation"]["runs"]:  # derived: accuracy lost when the minor coordinate x1 is shuffled
            m = run["metrics"]
            m["minor_feature_reliance"] = m["test_accuracy"] - m["minor_shuffled_accuracy"]
    for extra in extra_sweeps:
        more = load_results(extra).get("sweep")
        if more is None:
            raise FileNotFoundError(f"no sweep.json in {extra}")
        if "sweep" not in out:
            out["sweep"] = more
            continue
        sweep = out["sweep"]
        seen = {(r["model"], r["variant"], r["seed"]) for r in sweep["runs"]}
        added = [r for r in more["runs"] if (r["model"], r["variant"], r["seed"]) not in seen]
        sweep["runs"] = sweep["runs"] + added
        sweep["wall_s"] = sweep.get("wall_s", 0) + more.get("wall_s", 0)
        sweep.setdefault("merged_from", []).append({"dir": str(extra), "date": more["date"], "runs_added": len(added),
                                                    "command": more.get("command")})
        sweep["selection"] = select_defaults(sweep["runs"])
    return out


def key_table(res: dict[str, dict], variant_of: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The README table: one row per (comparison, model). Returns (markdown, list of 'does not help' lines)."""
    lines = [
        "| comparison | model | baseline | VCReg | Δ (paired) | seeds with Δ > 0 | verdict (+ = " "direction in brackets) |",
        "|---|---|---|---|---|---|---|",
    ]
    not_helping = []
    for exp, metric, label, meaning in KEY_ROWS:
        if exp not in res:
            continue
        agg = aggregate(res[exp]["runs"], metric)
        pct = is_fraction(metric)
        models = sorted({m for m, _ in agg})
        for model in models:
            base = agg.get((model, "baseline"))
            variants = [v for (m, v) in agg if m == model and v != "baseline"]
            for v in variants:
                a = agg[(model, v)]
                if base is None or a["diff_mean"] is None:
                    continue
                ver = verdict(a)
                d = a["diff_mean"]
                sd = f" ± {fmt(a['diff_std'], pct)}" if a["diff_std"] is not None else ""
                name = label if v == "vcreg" else f"{label} [{v}]"
                lines.append(
                    f"| {name} | {model} | {fmt(base['mean'], pct)} ± {fmt(base['std'], pct)} | "
                    f"{fmt(a['mean'], pct)} ± {fmt(a['std'], pct)} | {'+' if d >= 0 else '−'}{fmt(abs(d), pct)}{sd} | "
                    f"{a['diff_positive']}/{a['n']} | {ver} ({meaning}) |"
                )
                if not ver.startswith("**+**"):
                    not_helping.append(f"- {label}, {model} ({v}): Δ = {'+' if d >= 0 else '−'}{fmt(abs(d), pct)}{sd}, "
                                       f"{a['diff_positive']}/{a['n']} seeds ahead: {ver}.")
    return "\n".join(lines) + "\n", not_helping


def meta_block(res: dict[str, dict]) -> str:
    any_res = next(iter(res.values()))
    main = next((res[k] for k in ("hierarchical", "cross_dataset", "long_tail", "ablations") if k in res), any_res)
    m, v, p = any_res["machine"], any_res["versions"], any_res["profile"]
    walls = {k: r.get("wall_s", 0) for k, r in res.items()}
    dates = sorted(r["date"] for r in res.values())
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), torch threads {m['torch_threads']}, "
        f"{m['platform']}, Python {m['python']}.",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- Dates (UTC): {dates[0]} to {dates[-1]}. Seeds: {any_res['seeds']}. Profile `{p['name']}`: "
        f"{p['train_size']} Fashion-MNIST training images (stratified subset), {p['test_size']} test images, "
        f"{p['epochs']} epochs, batch {p['batch_size']}, AdamW lr {p['learning_rate']} cosine, weight decay "
        f"{p['weight_decay']}; long tail: head class {p['long_tail_n_max']} images, imbalance ratio "
        f"{p.get('imbalance_ratio', 100)}.",
        "- Wall time per experiment (s, runs shared between experiments are counted once, where first trained): "
        + ", ".join(f"{k} {w:.0f}" for k, w in walls.items()) + f"; total {sum(walls.values()) / 60:.1f} min.",
        f"- VCReg setting of the baseline-vs-VCReg comparisons ('vcreg' rows): {main.get('vcreg_main')} "
        f"({main.get('vcreg_main_source')}), every block, mean over layers; library defaults at run time "
        f"{main['vcreg_defaults_at_run_time']}.",
        f"- Command: `{any_res['command']}`.",
    ]
    return "\n".join(lines)


def build(results: Path, out: Path, extra_sweeps: list[Path] = (), supplementary: list[Path] = ()) -> str:
    res = load(results, extra_sweeps)
    if not res:
        raise FileNotFoundError(f"no results files (*.json) in {results}: run `python -m benchmarks.evidence` first")
    plot_summary(results, res)  # the plots always match the results (also after an interrupted suite)
    rel = os.path.relpath(results, out.parent)
    table, not_helping = key_table(res)
    parts = [
        "# hf_vcreg evidence: baseline vs VCReg at laptop scale",
        "",
        "Generated by `python -m benchmarks.report` from the results files in "
        f"[`{rel}/`]({rel}/) (JSON with every run and its exact config, plus Markdown and PNG). "
        "Every comparison trains the same model from the same initialisation, on the same data with the same "
        "schedule, through `VCRegTrainer`; the baseline is `vcreg_alpha = vcreg_beta = 0` (no hooks). "
        "Numbers are mean ± sample std over seeds; Δ is the paired difference VCReg − baseline per seed.",
        "",
        meta_block(res),
        "",
        "## Key results",
        "",
        table,
        "A verdict of **+** or **−** needs every one of at least 3 seeds to move the same way; anything else is "
        "reported as no consistent effect. For CDNV, NC1 and effective rank, + means the direction the paper "
        "claims (less collapse, more diverse features), not better accuracy.",
        "",
    ]
    if (results / "summary.png").exists():
        parts += [f"![summary]({rel}/summary.png)", ""]
    parts += ["## Where VCReg does not help (in these runs)", ""]
    parts += (not_helping or ["- Every key comparison moved in VCReg's favour on every seed."]) + [""]
    if "sweep" in res:
        for model, entries in sweep_entries(res["sweep"]).items():
            below = [v for v, a in entries.items() if a["diff_mean"] < 0]
            worst = min(entries, key=lambda v: entries[v]["diff_mean"])
            parts.append(f"- Sweep (hierarchical probe), {model}: {len(below)}/{len(entries)} (alpha, beta) entries below "
                         f"the baseline on the mean over seeds; worst {worst} "
                         f"({100 * entries[worst]['diff_mean']:+.1f} pts).")
        parts.append("")

    titles = {
        "hierarchical": "Hierarchical transfer (pretrain on 4 superclasses, linear-probe 10 fine classes)",
        "cross_dataset": "Cross-dataset transfer (pretrain on Fashion-MNIST, linear-probe digits)",
        "long_tail": "Long tail (imbalance ratio 100, balanced test set)",
        "collapse": "Neural collapse and feature diversity",
        "starvation": "Gradient starvation (linearly separable two moons, 3-layer MLP)",
        "sweep": "Alpha / beta sweep (hierarchical task)",
        "ablations": "Ablations (hierarchical task)",
    }
    for exp in ("hierarchical", "cross_dataset", "long_tail", "collapse", "starvation", "sweep", "ablations"):
        if exp not in res:
            continue
        r = res[exp]
        parts += [f"## {titles[exp]}", "", f"Results file: [`{exp}.json`]({rel}/{exp}.json); wall time {r['wall_s']:.0f} s.", ""]
        if exp == "long_tail":
            counts = next((x["metrics"].get("train_class_counts") for x in r["runs"]), None)
            parts += [f"Training images per class (class 0 .. 9): {counts}. Many-shot = classes 0-2, few-shot = "
                      "classes 7-9.", ""]
        if exp == "collapse":
            parts += ["Penultimate features of the 10-class Fashion-MNIST models of the cross-dataset experiment "
                      "(same runs). CDNV (Galanti et al.) and NC1 (Papyan et al.) from the shipped `neural_collapse` "
                      "metric, effective rank (Roy & Vetterli) from `effective_rank`; higher = less collapse.", ""]
            if (results / "effective_rank_per_block.png").exists():
                parts += [f"![effective rank per block]({rel}/effective_rank_per_block.png)", ""]
            parts += [block_rank_table(r), ""]
        if exp == "starvation":
            ceiling = next((x["metrics"].get("minor_feature_ceiling_accuracy") for x in r["runs"]), None)
            parts += ["x0 alone separates the classes linearly (the dominant feature); x1 carries the moon shape. "
                      "Accuracy with x0 shuffled across the test set measures how much the network learned from x1 "
                      f"(chance 50%; a 15-NN classifier on x1 alone reaches {100 * ceiling:.1f}%)."
                      if ceiling is not None else "", ""]
            if (results / "starvation_boundaries.png").exists():
                parts += [f"![decision boundaries]({rel}/starvation_boundaries.png)", ""]
        for metric, label in HEADLINES[exp]:
            t = markdown_table(r, metric, label)
            if t:
                parts += [t]
        if exp == "sweep":
            s = r.get("selection") or {}
            if (results / "sweep_heatmap.png").exists():
                parts += [f"![sweep]({rel}/sweep_heatmap.png)", ""]
            if s:
                parts += [
                    f"**Selection**: best mean `{s['metric']}` over {s['averaged_over']} "
                    f"({len(r['seeds'][: r['profile']['sweep_seeds']])} seeds): **alpha = {s['best_alpha']:g}, "
                    f"beta = {s['best_beta']:g}** ({100 * s['mean_by_variant'][s['best_variant']]:.2f}% vs baseline "
                    f"{100 * s['baseline_mean']:.2f}%).",
                    "",
                    "| variant | mean over models and seeds (%) |",
                    "|---|---|",
                    *[f"| {k} | {100 * v:.2f} |" for k, v in sorted(s["mean_by_variant"].items(), key=lambda kv: -kv[1])],
                    "",
                ]
                parts += [per_model_best(r), ""]
    for extra in supplementary:
        sup = load(extra)
        if not sup:
            raise FileNotFoundError(f"no results files in {extra}")
        first = next(iter(sup.values()))
        rel_sup = os.path.relpath(extra, out.parent)
        sup_table, _ = key_table(sup)
        parts += [
            f"## Supplementary: {', '.join(sorted({r['model'] for x in sup.values() for r in x['runs']}))} with "
            f"{first.get('vcreg_main')}",
            "",
            f"Same protocol, seeds {first['seeds']}, profile `{first['profile']['name']}`; results in "
            f"[`{rel_sup}/`]({rel_sup}/) (`{first.get('command')}`). This setting was chosen from the sweep for this "
            "architecture (on the hierarchical task, seeds 0-1, same test split), so the hierarchical row is "
            "optimistically biased; the other rows are not used by the selection.",
            "",
            sup_table,
        ]
    parts += [caveats(res)]
    text = "\n".join(parts)
    out.write_text(text)
    return text


def sweep_entries(sweep: dict, metric: str = "fine_probe_accuracy") -> dict[str, dict[str, dict]]:
    """``{model: {variant: aggregate}}`` of the sweep's VCReg entries that have a paired difference to the baseline."""
    agg = aggregate(sweep["runs"], metric)
    by_model = {}
    for model in sorted({m for m, _ in agg}):
        entries = {v: a for (m, v), a in agg.items() if m == model and v != "baseline" and a["diff_mean"] is not None}
        if entries:
            by_model[model] = entries
    return by_model


def per_model_best(sweep: dict, metric: str = "fine_probe_accuracy") -> str:
    """Per model: the best sweep entry and how many entries beat that model's baseline on the mean over seeds."""
    lines = ["| model | best entry | its Δ vs baseline (pts, paired) | entries with mean Δ > 0 | worst entry (Δ) |",
             "|---|---|---|---|---|"]
    for model, entries in sweep_entries(sweep, metric).items():
        best = max(entries, key=lambda v: entries[v]["mean"])
        worst = min(entries, key=lambda v: entries[v]["mean"])
        ahead = sum(a["diff_mean"] > 0 for a in entries.values())
        lines.append(f"| {model} | {best} | {100 * entries[best]['diff_mean']:+.1f} | {ahead}/{len(entries)} | "
                     f"{worst} ({100 * entries[worst]['diff_mean']:+.1f}) |")
    return "\n".join(lines) + "\n"


def block_rank_table(r: dict) -> str:
    import numpy as np

    rows = ["| model | variant | effective rank per block (mean over seeds; block width) |", "|---|---|---|"]
    keys = []
    for x in r["runs"]:
        if (x["model"], x["variant"]) not in keys:
            keys.append((x["model"], x["variant"]))
    for model, variant in keys:
        runs = [x["metrics"] for x in r["runs"] if x["model"] == model and x["variant"] == variant]
        names = list(runs[0]["block_effective_rank"])
        cells = [f"{np.mean([m['block_effective_rank'][n] for m in runs]):.1f} ({runs[0]['block_width'][n]})"
                 for n in names]
        rows.append(f"| {model} | {variant} | {', '.join(cells)} |")
    return "\n".join(rows) + "\n"


CAVEATS = """## What this does and does not show

- **Scale.** Tiny randomly initialised models (a 4-layer ViT with hidden size 64 and 16 patches of 7x7; a
  4-stage ResNet with widths 16-128), a few thousand 28x28 grey images, a few epochs, on a shared 2-core CPU.
  The paper's claims are about ImageNet-scale supervised pretraining of ResNet-50 / ConvNeXt / ViT-B; nothing
  here confirms or refutes them at that scale. It shows what the library's VCReg does on small models that a
  user can rerun in under an hour.
- **Budget.** The issue allows 2 hours for the full suite; this one was sized for at most about 45 minutes
  (took {total_min:.0f} min) on a 2-core CPU shared with other jobs, because of the session's time limit:
  small subsets, {epochs} epochs. Models are under-trained relative to convergence; a regulariser's effect can
  differ after longer training.
- **Seeds.** {n_seeds} seeds for the main comparisons and ablations, {sweep_seeds} for the alpha/beta sweep.
  With so few seeds a difference smaller than its paired std is not evidence either way; the verdict column
  only calls a sign when all seeds agree. Data subsets are fixed (seed 0); seeds vary the initialisation and
  the batch order. Runs are deterministic: the same seed gives the same numbers in a new process.
- **Hyper-parameters.** Baseline and VCReg share every training hyper-parameter, which were not tuned for
  either. The sweep picks among {n_sweep} (alpha, beta) pairs on the hierarchical probe accuracy and that
  pick is the setting of the main comparisons, so the hierarchical row is optimistically biased for VCReg
  (selected and measured on the same test split); the other comparisons do not enter the selection.
- **Metrics.** Linear probes are scikit-learn logistic regressions (C = 1) on standardised frozen penultimate
  features; NC1 / CDNV / effective rank are computed on at most `collapse_rows` test (and train) feature
  vectors. Timings are not benchmarks (shared CPU); see the performance benchmarks for speed.
"""


def caveats(res: dict[str, dict]) -> str:
    any_res = next(iter(res.values()))
    p = any_res["profile"]
    sweep = res.get("sweep")
    n_sweep = len({r["variant"] for r in sweep["runs"] if r["variant"] != "baseline"}) if sweep else 0
    return CAVEATS.format(
        total_min=sum(r.get("wall_s", 0) for r in res.values()) / 60,
        epochs=p["epochs"],
        n_seeds=len(any_res["seeds"]),
        sweep_seeds=min(p["sweep_seeds"], len(any_res["seeds"])),
        n_sweep=n_sweep,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results/evidence")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--extra-sweep", nargs="*", default=[],
                        help="Results folders of supplementary sweeps to merge into the sweep table and selection.")
    parser.add_argument("--supplementary", nargs="*", default=[],
                        help="Results folders of supplementary comparisons (e.g. a per-architecture VCReg setting).")
    ns = parser.parse_args(argv)
    build(Path(ns.results), Path(ns.out), [Path(p) for p in ns.extra_sweep], [Path(p) for p in ns.supplementary])
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
