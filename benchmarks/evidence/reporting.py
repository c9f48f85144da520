"""Results files -> ``RESULTS.md`` and PNG plots.

Everything is computed from the results folder: ``suite.json`` (profile, machine, sessions), ``runs.jsonl``
(every run with its spec and metrics). The plan of `experiments.Plan` says which runs each table uses, so the
report rebuilds the selection from the runs and regenerates byte for byte from the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from .experiments import (
    BASE, BASELINE, SELECTION_RULE, Plan, Profile, label, make_spec, moons_spec, setting,
)
from .models import FAMILIES
from .runs import RunCache
from .stats import paired

__all__ = ["HEADLINE_METRICS", "SUMMARY_METRICS", "baseline_mean", "build", "load_plan", "summary_rows"]

# (task, metric, label, percent?, direction): direction +1 = higher is better (or, for the collapse measures,
# the direction the paper claims: less collapse), 0 = descriptive (no "better").
HEADLINE_METRICS = [
    ("fine", "test_source_accuracy", "Source: Fashion-MNIST 10-class test acc. (%)", True, 1),
    ("fine", "test_cross_domain_probe", "Cross-domain: digits linear probe, test (%)", True, 1),
    ("fine", "test_few_shot_probe", "Few-shot: digits 5-shot linear probe, test (%)", True, 1),
    ("coarse", "test_source_accuracy", "Source: 4-superclass test acc. (%)", True, 1),
    ("coarse", "test_hierarchical_probe", "Hierarchical: 10-class probe of the 4-superclass model, test (%)", True, 1),
    ("long_tail", "test_balanced_accuracy", "Long tail (ratio {ratio:g}): balanced test acc. (%)", True, 1),
    ("long_tail", "test_many_shot_accuracy", "Long tail: many-shot classes 0-2, test acc. (%)", True, 1),
    ("long_tail", "test_medium_shot_accuracy", "Long tail: medium-shot classes 3-6, test acc. (%)", True, 1),
    ("long_tail", "test_few_shot_accuracy", "Long tail: few-shot classes 7-9, test acc. (%)", True, 1),
    ("fine", "test_effective_rank", "Effective rank of penultimate test features", False, 1),
    ("fine", "test_nc1", "NC1 of penultimate test features (higher = less collapse)", False, 1),
    ("fine", "test_cdnv", "CDNV of penultimate test features (higher = less collapse)", False, 1),
    ("fine", "test_variance_term", "VCReg variance term V of penultimate test features", False, 0),
    ("fine", "test_covariance_term", "VCReg covariance term K of penultimate test features", False, 0),
]
STARVATION_METRICS = [
    ("test_accuracy", "test acc. (%)", True),
    ("dominant_shuffled_accuracy", "acc. with x0 shuffled (%)", True),
    ("minor_shuffled_accuracy", "acc. with x1 shuffled (%)", True),
    ("minor_feature_reliance", "acc. lost when x1 is shuffled (pts)", True),
]


def load_plan(results: Path) -> Plan:
    """The `Plan` of the suite whose results are in ``results`` (profile and families from ``suite.json``)."""
    meta = json.loads((Path(results) / "suite.json").read_text())
    raw = meta["profile"]
    kw = {f.name: tuple(raw[f.name]) if isinstance(raw[f.name], list) else raw[f.name] for f in fields(Profile)}
    profile = Profile(**kw)
    return Plan(profile, tuple(meta["families"]), tuple(meta["experiments"]), RunCache(Path(results) / "runs.jsonl"))


# ---------------------------------------------------------------------------------------------- formatting
def _num(x: float | None, pct: bool, digits: int | None = None, sign: bool = False) -> str:
    """Percent (``100 x``, ``digits`` decimals, default 1) or a plain number (4 significant digits)."""
    if x is None:
        return "n/a"
    if pct:
        v, fmt = 100.0 * x, f".{1 if digits is None else digits}f"
    else:
        v, fmt = x, ".4g"
    text = format(v, ("+" if sign else "") + fmt)
    return text.replace("-", "−")


def _pts(x: float, digits: int = 2) -> str:
    """A value already in points, signed."""
    return f"{x:+.{digits}f}".replace("-", "−")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- collecting
def _values(plan: Plan, family: str, task: str, vcreg: dict, seeds: list[int], metric: str) -> dict[int, float]:
    out = {}
    for seed in seeds:
        record = plan.cache.get(make_spec(plan.profile, family, task, seed, vcreg))
        if record is not None and metric in record["metrics"]:
            out[seed] = record["metrics"][metric]
    return out


def baseline_values(plan: Plan, family: str, task: str, metric: str) -> list[float]:
    """The baseline's values of ``metric`` over the headline seeds that ran."""
    seeds = plan.seeds(plan.profile.headline_seeds_of(family))
    return list(_values(plan, family, task, BASE, seeds, metric).values())


def baseline_mean(plan: Plan, family: str, task: str, metric: str) -> float | None:
    """The baseline's mean of ``metric`` over the headline seeds (None without runs)."""
    values = baseline_values(plan, family, task, metric)
    return float(np.mean(values)) if values else None


def _headline_seeds_text(plan: Plan) -> str:
    """``seeds 0-4`` or, where families differ, ``seeds 0-4 (vit: 0-2)``."""
    p = plan.profile
    text = f"seeds 0-{p.headline_seeds - 1}"
    other = {f: p.headline_seeds_of(f) for f in plan.families if p.headline_seeds_of(f) != p.headline_seeds}
    if other:
        text += " (" + ", ".join(f"{f}: 0-{n - 1}" for f, n in other.items()) + ")"
    return text


def _grids_text(plan: Plan) -> str:
    """What each family's sweep covered: its alpha x beta grid (plus the old default) and placements."""
    parts = []
    for family in plan.families:
        alphas, betas = plan.profile.grid(family)
        parts.append(f"{family}: alpha {{{', '.join(f'{a:g}' for a in alphas)}}} x beta "
                     f"{{{', '.join(f'{b:g}' for b in betas)}}} and the old default "
                     f"({', '.join(f'{v:g}' for v in plan.profile.reference)}), placements "
                     f"{', '.join(plan.placements(family))}")
    return "; ".join(parts) + ". A setting outside these was not tried."


def _comparison(plan: Plan, family: str, vcreg: dict, seeds: int) -> list[tuple[tuple, dict]]:
    """``[(metric row of HEADLINE_METRICS, paired stats)]`` of ``vcreg`` against the baseline, test metrics."""
    out = []
    for row in HEADLINE_METRICS:
        task, metric = row[0], row[1]
        base = _values(plan, family, task, BASE, plan.seeds(seeds), metric)
        treated = _values(plan, family, task, vcreg, plan.seeds(seeds), metric)
        if set(base) & set(treated):
            out.append((row, paired(base, treated)))
    return out


# ---------------------------------------------------------------------------------------------- sections
def _protocol(plan: Plan, meta: dict, selection_rule: str) -> list[str]:
    p = plan.profile
    lt_counts = None
    for family in plan.families:
        record = plan.cache.get(make_spec(p, family, "long_tail", 0, BASE))
        if record is not None:
            lt_counts = record["metrics"]["train_class_counts"]
            break
    sessions = meta["sessions"]
    wall = sum(s["wall_s"] for s in sessions)
    runs = sum(s["runs_trained"] for s in sessions)
    m, v = meta["machine"], meta["versions"]
    test = "the whole 10,000-image test split" if p.test_size is None else f"a stratified {p.test_size}-image subset"
    lines = [
        "## Protocol",
        "",
        f"- **Source data**: Fashion-MNIST from the Debian IDX files. The 60,000 training images are split once "
        f"(stratified, seed 0) into a **validation set of {p.val_size:,} images** and a pretraining pool of "
        f"{60000 - p.val_size:,}; the `fine` (10 classes) and `coarse` (4 superclasses) tasks pretrain on "
        f"{min(p.train_size, 60000 - p.val_size):,} pool images (stratified subset, seed 0). The **test split** "
        f"({test}) is used only in the headline tables, for the chosen settings; no choice reads it.",
        "- **Target data**: scikit-learn digits (1,797 8x8 images upsampled to 28x28, bilinear, same "
        "normalisation), split once (stratified, seed 0) into 50 % probe-train, 25 % validation, 25 % test.",
        "- **Measures**: source accuracy; cross-domain: logistic-regression probe (standardised frozen penultimate "
        "features, C = 1) of digits trained on the probe-train split; few-shot: the same probe fitted on "
        f"{p.few_shot_shots} images per class, mean of {p.few_shot_draws} seeded draws; hierarchical: the "
        f"4-superclass model's features, probe of the 10 fine classes trained on {p.probe_pool_size:,} "
        f"pretraining images; long tail: pretraining on an imbalanced subset of the pool (ratio "
        f"{p.imbalance_ratio:g}, class counts {lt_counts}), balanced accuracy and class-group accuracies; "
        "effective rank, NC1 and CDNV of the penultimate test features (`hf_vcreg.metrics`) and the VCReg "
        "variance / covariance terms of those features (`hf_vcreg.penalty`).",
        f"- **Seeds**: sweep {plan.seeds(p.sweep_seeds)}, headline {_headline_seeds_text(plan)}. A seed sets "
        "the initialisation and the batch order; data splits are fixed. Baseline and VCReg runs of a seed start "
        "from the same weights; Δ is the paired difference VCReg − baseline per seed, its interval the 95 % "
        "Student-t interval over seeds. Numbers are mean ± sample std over seeds.",
        f"- **Selection rule** (`selection.json`): {selection_rule}",
        f"- **Training**: AdamW, cosine schedule with {100 * p.warmup:g} % warm-up, weight decay {p.weight_decay:g}, "
        "through `VCRegTrainer`; the baseline is alpha = beta = 0 (no hooks). Profile "
        f"`{p.name}`.",
        "",
        _table(["family", "library", "model", "parameters", "batch", "learning rate", "epochs"], [
            [f, meta["models"][f]["source"], _model_text(f, meta["models"][f]["config"]),
             _params(f), str(meta["models"][f]["batch_size"]), f"{meta['models'][f]['learning_rate']:g}",
             f"{p.epochs[f]:g}"]
            for f in plan.families
        ]),
        f"- **Machine**: {m['cpu']}, {m['cores']} cores shared with other jobs, {m['threads_per_job']} thread(s) per "
        f"job; {m['platform']}, Python {m['python']}. Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"- **Runs**: {runs} trained in {len(sessions)} session(s), {wall / 3600:.2f} h wall time in all; "
        f"first started {sessions[0]['started']}, last finished {sessions[-1]['finished']}. Command: "
        f"`{sessions[-1]['command']}`.",
        *[f"  Session {i} ({s['runs_trained']} runs): {s['note']}" for i, s in enumerate(sessions, 1) if s.get("note")],
        "",
    ]
    return lines


def _model_text(family: str, config: dict) -> str:
    c = config
    if family == "cnn":
        return (f"ResNet, basic blocks, depths {c['depths']}, widths {c['hidden_sizes']}, embedding "
                f"{c['embedding_size']}")
    if family == "vit":
        return (f"ViT, patch {c['patch_size']}, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
                f"{c['num_attention_heads']} heads, MLP {c['intermediate_size']}")
    if family == "timm_cnn":
        return f"timm ResNet, BasicBlock, layers {c['layers']}, widths {c['channels']}"
    return f"timm ViT, patch {c['patch_size']}, width {c['embed_dim']}, depth {c['depth']}, {c['num_heads']} heads"


def _params(family: str) -> str:
    model = FAMILIES[family].build(10, 0)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def _baselines(plan: Plan) -> list[str]:
    rows = []
    for family in plan.families:
        cells = [family]
        for task, metric in (("fine", "val_source_accuracy"), ("fine", "test_source_accuracy"),
                             ("coarse", "test_source_accuracy"), ("long_tail", "test_balanced_accuracy")):
            vals = baseline_values(plan, family, task, metric)
            cells.append(f"{_num(np.mean(vals), True)} ± {_num(np.std(vals, ddof=1) if len(vals) > 1 else 0.0, True)}"
                         f" ({len(vals)})" if vals else "—")
        rows.append(cells)
    return [
        "## Baselines: what the models learn without VCReg",
        "",
        "Source accuracy of the baselines (alpha = beta = 0), mean ± std over seeds (number of seeds).",
        "",
        _table(["family", "10-class val acc. (%)", "10-class test acc. (%)", "4-superclass test acc. (%)",
                "long-tail balanced test acc. (%)"], rows),
    ]


def _selection_section(plan: Plan, rel: str) -> list[str]:
    rows = []
    for family in plan.families:
        final = plan.stage2_result(family)
        if final is None:
            rows.append([family, "sweep not finished", "", "", "", "", ""])
            continue
        t = final["table"][final["label"]]
        met = final["constraint_met"] and plan.stage1_result(family)["constraint_met"]
        rows.append([family, f"**{final['label']}**", _pts(t["source_delta"]), _pts(t["hierarchical_delta"]),
                     _pts(t["cross_domain_delta"]), _pts(t["objective"]), "yes" if met else "**no**"])
    return [
        "## Chosen settings (validation)",
        "",
        f"From [`selection.json`]({rel}/selection.json): the setting each family's rule picked, with its "
        "validation deltas (points, paired, mean over the sweep seeds).",
        "",
        _table(["family", "chosen setting", "source Δ", "hierarchical probe Δ", "cross-domain probe Δ",
                "objective", f"source drop ≤ {plan.profile.max_source_drop:g}"], rows),
    ]


def _grid(table: dict, alphas, betas, key: str, ref_label: str) -> str:
    rows = []
    for a in alphas:
        cells = [f"**{a:g}**"]
        for b in betas:
            name = label(setting(a, b))
            cells.append("—" if name == BASELINE else _pts(table[name][key]))
        rows.append(cells)
    ref = table.get(ref_label)
    text = _table(["alpha \\ beta", *[f"{b:g}" for b in betas]], rows)
    if ref is not None and ref_label not in [label(setting(a, b)) for a in alphas for b in betas]:
        text += f"\nOld default ({ref_label}): {_pts(ref[key])}.\n"
    return text


def _sweep_section(plan: Plan, rel: str, results: Path) -> list[str]:
    p = plan.profile
    out = ["## Sweep, stage 1: coefficients with the penalty on every block (validation)", "",
           "Paired validation deltas VCReg − baseline in points, mean over the sweep seeds. The objective is the "
           "mean of the hierarchical and cross-domain probe deltas; settings whose source Δ is below "
           f"−{p.max_source_drop:g} are not eligible. Alpha = 0 is the covariance term alone and beta = 0 the "
           "variance term alone (the ablations).", ""]
    ref_label = label(setting(*p.reference))
    for family in plan.families:
        first = plan.stage1_result(family)
        if first is None:
            out += [f"### {family}", "", "Stage 1 not finished.", ""]
            continue
        table = first["table"]
        out += [f"### {family}", ""]
        if (results / f"sweep_{family}.png").exists():
            out += [f"![{family} sweep]({rel}/sweep_{family}.png)", ""]
        for key, title in (("objective", "Objective (mean of the two transfer deltas)"),
                           ("source_delta", "Source accuracy Δ (fine task)"),
                           ("hierarchical_delta", "Hierarchical probe Δ"),
                           ("cross_domain_delta", "Cross-domain probe Δ")):
            out += [f"**{title}**", "", _grid(table, *p.grid(family), key, ref_label)]
        ranked = sorted(first["eligible"], key=lambda k: -table[k]["objective"])[:5]
        out += [f"Top eligible settings (stage-1 choice **{first['label']}**"
                + ("" if first["constraint_met"] else ", no setting met the source constraint") + "):", "",
                _table(["setting", "objective", "source Δ", "hierarchical Δ", "cross-domain Δ",
                        "objective per seed"],
                       [[k, _pts(table[k]["objective"]), _pts(table[k]["source_delta"]),
                         _pts(table[k]["hierarchical_delta"]), _pts(table[k]["cross_domain_delta"]),
                         ", ".join(_pts(v["objective"]) for _, v in sorted(table[k]["per_seed"].items()))]
                        for k in ranked])]
        out += _ablation(first, table)
    return out


def _ablation(first: dict, table: dict) -> list[str]:
    """One coefficient at a time around the stage-1 choice, read from the grid: its row (alpha fixed, every beta,
    beta = 0 being the variance term alone) and its column (beta fixed, alpha = 0 being the covariance term alone)."""
    s = first["setting"]
    names = []
    for name in table:
        a, b = (float(x.split("=")[1]) for x in name.split(", ")[:2])
        if (a == s["alpha"] or b == s["beta"]) and name.endswith(f", {s['placement']}"):
            names.append(name)
    if len(names) < 2:
        return []
    rows = [[f"**{n}**" if n == first["label"] else n, "variance only" if n.split(", ")[1] == "beta=0" else
             "covariance only" if n.startswith("alpha=0,") else "both terms", _pts(table[n]["source_delta"]),
             _pts(table[n]["hierarchical_delta"]), _pts(table[n]["cross_domain_delta"]), _pts(table[n]["objective"])]
            for n in names]
    return ["Ablation, one coefficient at a time around the stage-1 choice (read from the grid, validation):", "",
            _table(["setting", "terms", "source Δ", "hierarchical Δ", "cross-domain Δ", "objective"], rows)]


def _placement_section(plan: Plan) -> list[str]:
    out = ["## Sweep, stage 2: where the penalty goes (validation)", "",
           "The stage-1 coefficients at each placement of the family (paired validation deltas, points).", ""]
    rows = []
    for family in plan.families:
        final = plan.stage2_result(family)
        if final is None:
            rows.append([family, "stage 2 not finished", "", "", "", "", ""])
            continue
        for s in final["settings"]:
            name = label(s)
            t = final["table"][name]
            record = plan.cache.get(make_spec(plan.profile, family, "fine", 0, s))
            layers = record["info"]["layers"]
            chosen = " (chosen)" if name == final["label"] else ""
            rows.append([family, f"{s['placement']}{chosen}", f"{len(layers)}: `{layers[0]}` … `{layers[-1]}`"
                         if len(layers) > 1 else f"1: `{layers[0]}`", _pts(t["source_delta"]),
                         _pts(t["hierarchical_delta"]), _pts(t["cross_domain_delta"]), _pts(t["objective"])])
    out += [_table(["family", "placement", "regularised modules", "source Δ", "hierarchical Δ", "cross-domain Δ",
                    "objective"], rows)]
    return out


def _comparison_table(plan: Plan, comparison: list[tuple[tuple, dict]]) -> str:
    rows = []
    for (task, metric, text, pct, _), s in comparison:
        ci = ("n/a" if s["ci_low"] is None else
              f"[{_num(s['ci_low'], pct, 2, True)}, {_num(s['ci_high'], pct, 2, True)}]")
        rows.append([text.format(ratio=plan.profile.imbalance_ratio),
                     f"{_num(s['baseline_mean'], pct)} ± {_num(s['baseline_std'], pct)}",
                     f"{_num(s['treated_mean'], pct)} ± {_num(s['treated_std'], pct)}",
                     _num(s["delta_mean"], pct, 2, True), ci, f"{s['positive']}/{s['n']}"])
    return _table(["metric", "baseline", "VCReg", "Δ (paired)", "95 % CI of Δ", "seeds with Δ > 0"], rows)


def _headline_section(plan: Plan, rel: str, results: Path) -> tuple[list[str], list[str]]:
    p = plan.profile
    out = ["## Headline: chosen setting vs baseline (test)", "",
           f"Test splits, {_headline_seeds_text(plan)}; accuracies in %, Δ in points. Each family uses its own chosen "
           f"setting. Seeds {plan.seeds(min(p.sweep_seeds, p.headline_seeds))} of the `fine` and `coarse` rows are the "
           "sweep's runs of the same configuration (measured once, on both splits).",
           ""]
    if (results / "headline.png").exists():
        out += [f"![headline]({rel}/headline.png)", ""]
    not_helping = []
    for family in plan.families:
        chosen = plan.chosen(family)
        if chosen is None:
            out += [f"### {family}", "", "Sweep not finished: no chosen setting yet.", ""]
            continue
        comparison = _comparison(plan, family, chosen, p.headline_seeds_of(family))
        out += [f"### {family}: {label(chosen)}", "", _comparison_table(plan, comparison)]
        not_helping += _not_helping(plan, family, label(chosen), comparison)
        ref = setting(*p.reference)
        if family in p.reference_families and ref != chosen:
            comparison = _comparison(plan, family, ref, p.reference_seeds)
            out += [f"Old default ({label(ref)}), {p.reference_seeds} seeds, for comparison:", "",
                    _comparison_table(plan, comparison)]
            not_helping += _not_helping(plan, family, f"old default {label(ref)}", comparison)
    return out, not_helping


def _not_helping(plan: Plan, family: str, name: str, comparison) -> list[str]:
    lines = []
    for (task, metric, text, pct, direction), s in comparison:
        if direction == 0 or (s["ci_low"] is not None and s["ci_low"] > 0):
            continue
        why = ("the interval includes 0" if s["ci_low"] is not None and s["ci_high"] >= 0 else
               "VCReg is worse: the interval lies below 0" if s["ci_low"] is not None else "one seed only")
        ci = "" if s["ci_low"] is None else f", 95 % CI [{_num(s['ci_low'], pct, 2, True)}, " \
                                             f"{_num(s['ci_high'], pct, 2, True)}]"
        lines.append(f"- {family}, {name}: {text.format(ratio=plan.profile.imbalance_ratio)}: Δ = "
                     f"{_num(s['delta_mean'], pct, 2, True)}{ci}, {s['positive']}/{s['n']} seeds ahead ({why}).")
    return lines


SUMMARY_METRICS = [("fine", "test_source_accuracy", "source acc."), ("fine", "test_cross_domain_probe", "cross-domain"),
                   ("coarse", "test_hierarchical_probe", "hierarchical"), ("fine", "test_few_shot_probe", "few-shot"),
                   ("long_tail", "test_balanced_accuracy", "long tail")]


def summary_rows(plan: Plan, digits: int = 1) -> list[list[str]]:
    """Per family with a chosen setting: ``[family, setting, *cells]``, one cell per `SUMMARY_METRICS` entry: the
    paired test Δ (points), its 95 % interval and (seeds with Δ > 0 / seeds); ``—`` where runs are missing."""
    rows = []
    for family in plan.families:
        chosen = plan.chosen(family)
        if chosen is None:
            continue
        cells = [family, label(chosen)]
        for task, metric, _ in SUMMARY_METRICS:
            seeds = plan.seeds(plan.profile.headline_seeds_of(family))
            base = _values(plan, family, task, BASE, seeds, metric)
            treated = _values(plan, family, task, chosen, seeds, metric)
            if not set(base) & set(treated):
                cells.append("—")
                continue
            st = paired(base, treated)
            ci = "" if st["ci_low"] is None else \
                f" [{_num(st['ci_low'], True, digits, True)}, {_num(st['ci_high'], True, digits, True)}]"
            cells.append(f"{_num(st['delta_mean'], True, digits, True)}{ci} ({st['positive']}/{st['n']})")
        rows.append(cells)
    return rows


def _summary_section(plan: Plan) -> list[str]:
    """One row per family: the chosen setting and the paired test Δ (points) with its 95 % interval."""
    rows = summary_rows(plan)
    if not rows:
        return []
    return ["## Summary", "",
            "Paired test Δ VCReg − baseline in points at each family's chosen setting, 95 % interval in brackets, "
            "(seeds with Δ > 0 / seeds). Details and the settings' validation numbers below.", "",
            _table(["family", "chosen setting", *[t for _, _, t in SUMMARY_METRICS]], rows)]


def _cost_section(plan: Plan) -> list[str]:
    """Median wall and CPU seconds per run, per family and task, over the runs the report uses."""
    used = {r["key"]: r for r in map(plan.cache.get, plan.ready()) if r is not None}
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in used.values():
        groups.setdefault((record["spec"]["family"], record["spec"]["task"]), []).append(record)
    rows = [[family, task, str(len(rs)), f"{np.median([r['wall_s'] for r in rs]):.0f}",
             f"{np.median([r['cpu_s'] for r in rs]):.0f}", f"{sum(r['wall_s'] for r in rs) / 3600:.2f}"]
            for (family, task), rs in sorted(groups.items())]
    return ["## Cost of the runs", "",
            "Per family and task: runs used by this report, median wall and CPU (process) seconds per run, total "
            "wall hours (runs execute in parallel, so the suite's wall time is lower).", "",
            _table(["family", "task", "runs", "median wall s", "median CPU s", "wall h"], rows)]


def _starvation_section(plan: Plan, rel: str, results: Path) -> list[str]:
    p = plan.profile
    seeds = plan.seeds(p.moons_seeds)
    base = {s: plan.cache.get(moons_spec(p, s, 0.0)) for s in seeds}
    if not any(base.values()):
        return []
    ceiling = next(r["metrics"]["minor_feature_ceiling_accuracy"] for r in base.values() if r)
    out = ["## Gradient starvation (two moons, 3-layer MLP)", "",
           f"x0 alone separates the classes linearly (the dominant feature); x1 carries the moon shape. {p.moons_train} "
           f"training points, {p.moons_steps} full-batch steps, hidden width {p.moons_hidden}, VCReg on both hidden "
           f"layers with alpha = beta; {len(seeds)} seeds. A 15-NN classifier on x1 alone reaches "
           f"{_num(ceiling, True)} %.", ""]
    if (results / "starvation_boundaries.png").exists():
        out += [f"![decision boundaries]({rel}/starvation_boundaries.png)", ""]
    rows = []
    for strength in p.moons_strengths:
        for metric, text, pct in STARVATION_METRICS:
            b = {s: r["metrics"][metric] for s, r in base.items() if r}
            t = {s: r["metrics"][metric] for s in seeds if (r := plan.cache.get(moons_spec(p, s, strength)))}
            if not set(b) & set(t):
                continue
            st = paired(b, t)
            ci = "n/a" if st["ci_low"] is None else f"[{_num(st['ci_low'], pct, 2, True)}, {_num(st['ci_high'], pct, 2, True)}]"
            rows.append([f"{strength:g}", text, f"{_num(st['baseline_mean'], pct)} ± {_num(st['baseline_std'], pct)}",
                         f"{_num(st['treated_mean'], pct)} ± {_num(st['treated_std'], pct)}",
                         _num(st["delta_mean"], pct, 2, True), ci, f"{st['positive']}/{st['n']}"])
    out += [_table(["alpha = beta", "metric", "baseline", "VCReg", "Δ (paired)", "95 % CI of Δ", "seeds with Δ > 0"],
                   rows)]
    return out


CAVEATS = """## What this does and does not show

- **Scale.** Small randomly initialised models on 28x28 grey images, trained for a few epochs on a 2-core CPU.
  The paper's claims concern ImageNet-scale pretraining of ResNet-50 / ConvNeXt / ViT-B; nothing here confirms
  or refutes them at that scale.
- **Choice and report are separate.** Every coefficient and placement was chosen on validation splits (a
  held-out part of the Fashion-MNIST training split, the digits validation split); the test splits appear only
  in the headline tables. Two sweep seeds make the choice itself noisy: the top settings of the grid are listed
  with their per-seed objectives.
- **Seeds.** {headline_seeds} for the headline, {sweep_seeds} for the sweep. A 95 % interval from
  so few seeds is wide; an interval that includes 0 is reported as no evidence either way.
- **Sweep size.** {grids}
- **Hyper-parameters.** Baseline and VCReg share every training hyper-parameter; none was tuned for either.
- **Timing.** Wall times were measured on a machine shared with other jobs: they are upper bounds, not
  benchmarks (see `benchmarks/PERFORMANCE.md` for the penalty's cost).
"""


# ---------------------------------------------------------------------------------------------- plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _figure()
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def plot_sweep(plan: Plan, family: str, path: Path) -> bool:
    first = plan.stage1_result(family)
    if first is None:
        return False
    p = plan.profile
    plt = _figure()
    keys = (("objective", "objective (pts)"), ("source_delta", "source acc. Δ (pts)"),
            ("hierarchical_delta", "hierarchical probe Δ"), ("cross_domain_delta", "cross-domain probe Δ"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        alphas, betas = p.grid(family)
        grid = np.full((len(alphas), len(betas)), np.nan)
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                name = label(setting(a, b))
                if name != BASELINE:
                    grid[i, j] = first["table"][name][key]
        lim = max(float(np.nanmax(np.abs(grid))), 1e-6)
        ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("beta")
        ax.set_ylabel("alpha")
        ax.set_title(f"{family}: {title}", fontsize=9)
    _save(fig, path)
    return True


def plot_headline(plan: Plan, path: Path) -> bool:
    panels = []
    for family in plan.families:
        chosen = plan.chosen(family)
        if chosen is not None:
            rows = [(row, s) for row, s in _comparison(plan, family, chosen, plan.profile.headline_seeds_of(family))
                    if row[3] and s["ci_low"] is not None]
            if rows:
                panels.append((family, label(chosen), rows))
    if not panels:
        return False
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, (family, name, rows) in zip(axes[0], panels):
        y = np.arange(len(rows))[::-1]
        means = np.array([100 * s["delta_mean"] for _, s in rows])
        lo = means - np.array([100 * s["ci_low"] for _, s in rows])
        hi = np.array([100 * s["ci_high"] for _, s in rows]) - means
        ax.errorbar(means, y, xerr=[lo, hi], fmt="o", color="tab:blue", capsize=3)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_yticks(y, [f"{row[0]}: {row[1].removeprefix('test_')}" for row, _ in rows], fontsize=7)
        ax.set_xlabel("Δ VCReg − baseline (points), 95 % CI")
        ax.set_title(f"{family}: {name}", fontsize=9)
    _save(fig, path)
    return True


def plot_starvation(plan: Plan, path: Path) -> bool:
    p = plan.profile
    grids = {"baseline": plan.cache.get(moons_spec(p, 0, 0.0))}
    grids.update({f"alpha = beta = {s:g}": plan.cache.get(moons_spec(p, 0, s)) for s in p.moons_strengths})
    grids = {k: r["boundary"] for k, r in grids.items() if r is not None}
    if not grids:
        return False
    from .data import two_moons_separable

    train = two_moons_separable(n=p.moons_train, seed=0)
    x, y = np.asarray(train["x"]), np.asarray(train["label"])
    plt = _figure()
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (name, prob) in zip(axes[0], grids.items()):
        prob = np.asarray(prob)
        xs = np.linspace(-2.0, 2.0, prob.shape[0])
        ax.contourf(xs, xs, prob, levels=20, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
        ax.contour(xs, xs, prob, levels=[0.5], colors="k")
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", edgecolors="w", linewidths=0.4, s=14, vmin=0, vmax=1)
        ax.set_title(f"{name} (seed 0)")
        ax.set_xlabel("x0 (dominant, linearly separable)")
        ax.set_ylabel("x1 (moon coordinate)")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------- RESULTS.md
def build(results: Path, out: Path, plots: bool = True) -> str:
    """Write ``out`` (RESULTS.md) from the results folder ``results`` (and, with ``plots``, its PNG files);
    returns the Markdown."""
    results, out = Path(results), Path(out)
    if not (results / "suite.json").exists():
        raise FileNotFoundError(f"no suite.json in {results}: run `python -m benchmarks.evidence --out {results}` first")
    meta = json.loads((results / "suite.json").read_text())
    plan = load_plan(results)
    if plots:
        for family in plan.families:
            plot_sweep(plan, family, results / f"sweep_{family}.png")
        plot_headline(plan, results / "headline.png")
        plot_starvation(plan, results / "starvation_boundaries.png")
    rel = os.path.relpath(results, out.parent)
    rule = SELECTION_RULE.format(max_drop=plan.profile.max_source_drop)
    headline, not_helping = _headline_section(plan, rel, results)
    parts = [
        "# hf_vcreg evidence: does VCReg pretraining transfer better?",
        "",
        f"Generated by `python -m benchmarks.evidence report` from the results files in [`{rel}/`]({rel}/): "
        "`runs.jsonl` (every run: its exact configuration and metrics), `suite.json` (profile, machine, "
        "sessions), `selection.json` (the chosen settings). Every number below is computed from them.",
        "",
        *_summary_section(plan),
        *_protocol(plan, meta, rule),
        *_baselines(plan),
        *_selection_section(plan, rel),
        *headline,
        "## Where VCReg does not help",
        "",
        "Every headline metric (test) whose 95 % interval of the paired Δ does not lie above 0; the VCReg "
        "variance / covariance terms are descriptive and not listed.",
        "",
        *(not_helping or ["- None: every headline interval lies above 0."]),
        "",
        *_sweep_section(plan, rel, results),
        *_placement_section(plan),
        *_starvation_section(plan, rel, results),
        *_cost_section(plan),
        CAVEATS.format(headline_seeds=_headline_seeds_text(plan), sweep_seeds=plan.profile.sweep_seeds,
                       grids=_grids_text(plan)),
    ]
    text = "\n".join(parts)
    out.write_text(text)
    return text
