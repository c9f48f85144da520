"""The protocol: profiles, the runs each experiment needs, the selection rule, and the suite that runs them.

Experiments (per model family):

* ``sweep``: stage 1, every (alpha, beta) of the profile's grid (minus (0, 0)) and the old default
  (0.01, 0.1), with the penalty on every block; stage 2, the stage-1 choice at the family's other placements
  (stages, last block, second half of the blocks). Every setting is trained on the ``fine`` and the ``coarse``
  task with the first ``sweep_seeds`` seeds, paired with the baseline (alpha = beta = 0) of the same seed.
  Validation metrics only: see `SELECTION_RULE`.
* ``headline``: the chosen setting against the baseline on the test splits, ``headline_seeds`` seeds, tasks
  ``fine``, ``coarse`` and ``long_tail``; the old default too for ``reference_families``. Needs the sweep.
* ``starvation``: two moons, a 3-layer MLP, baseline and alpha = beta in ``moons_strengths``.

The plan is a pure function of the profile and the finished runs (`Plan`), so a killed suite resumes where it
stopped and the report rebuilds every table from the results files alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .models import FAMILIES
from .runs import RUN_FORMAT, RunCache, run_specs

__all__ = [
    "EXPERIMENTS", "PROFILES", "Plan", "Profile", "SELECTION_RULE", "Suite", "choose", "setting", "summarise",
]

EXPERIMENTS = ("sweep", "headline", "starvation")
IMAGE_TASKS = ("fine", "coarse", "long_tail")
BASELINE = "baseline"

logger = logging.getLogger("benchmarks.evidence")


# ---------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """Sizes, schedules and grids of one suite run."""

    name: str
    families: tuple[str, ...]  # default model families (--models overrides)
    train_size: int  # fine / coarse pretraining images: a stratified subset (seed 0) of the 50k pool
    epochs: dict[str, float]  # pretraining epochs per family
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps with a linear learning-rate warm-up (then cosine decay)
    val_size: int = 10_000  # held-out validation images (stratified, seed 0) of the 60k training split
    test_size: int | None = None  # None: the whole 10k test split; else a stratified subset (tests)
    probe_pool_size: int = 10_000  # hierarchical probe: trained on this many pretraining images (fine labels)
    long_tail_n_max: int = 5_000  # long tail: head-class images (class 0); tail class n_max / imbalance_ratio
    imbalance_ratio: float = 100.0
    few_shot_shots: int = 5  # few-shot digits probe: images per class
    few_shot_draws: int = 10  # ... averaged over this many seeded draws
    sweep_alphas: tuple[float, ...] = (0.0, 0.1, 1.0, 10.0)
    sweep_betas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    # Per-family (alphas, betas) replacing the two above for that family (a smaller grid for a costlier family).
    family_grids: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    # Per-family headline seeds and placements (stage 2) replacing the defaults for that family.
    family_headline_seeds: dict[str, int] = field(default_factory=dict)
    family_placements: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reference: tuple[float, float] = (0.01, 0.1)  # the old library default (alpha, beta): a reference point
    sweep_seeds: int = 2
    headline_seeds: int = 5
    reference_families: tuple[str, ...] = ("cnn",)  # families with a headline of the old default too
    reference_seeds: int = 3
    max_source_drop: float = 0.5  # selection: largest allowed mean drop of validation source accuracy (points)
    moons_train: int = 300
    moons_test: int = 1000
    moons_steps: int = 500  # full-batch steps of the two-moons MLP
    moons_hidden: int = 100
    moons_strengths: tuple[float, ...] = (0.1, 1.0, 10.0)  # alpha = beta of the two-moons VCReg runs
    moons_seeds: int = 3

    def grid(self, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The family's sweep grid ``(alphas, betas)``."""
        alphas, betas = self.family_grids.get(family, (self.sweep_alphas, self.sweep_betas))
        return tuple(alphas), tuple(betas)

    def headline_seeds_of(self, family: str) -> int:
        return self.family_headline_seeds.get(family, self.headline_seeds)


PROFILES = {
    # 136 runs, 6,100 CPU-seconds of process time in the committed run (benchmarks/results/evidence): under an hour
    # at --jobs 2 on an otherwise idle 2-core machine, more on a shared one. Sized to the time available: alpha = 10 and
    # the old default's own headline are left out; the ViT, the costlier family, gets two settings around the CNN's
    # best cells plus its old default, no placement stage and 3 headline seeds.
    "full": Profile("full", families=("vit", "cnn"), train_size=50_000,
                    epochs={"cnn": 3, "vit": 3, "timm_cnn": 3, "timm_vit": 3},
                    sweep_alphas=(0.0, 0.1, 1.0), sweep_betas=(0.0, 1.0, 10.0, 100.0),
                    family_grids={"vit": ((0.1, 1.0), (1.0,))}, family_headline_seeds={"vit": 3},
                    family_placements={"vit": ("blocks",)}, reference_families=()),
    # Smoke test: every experiment and code path, a few minutes.
    "quick": Profile(
        "quick", families=("vit", "cnn"), train_size=2_000, epochs={"cnn": 1, "vit": 1, "timm_cnn": 1, "timm_vit": 1},
        test_size=2_000, val_size=2_000, probe_pool_size=1_000, long_tail_n_max=500, imbalance_ratio=10,
        sweep_alphas=(0.0, 1.0), sweep_betas=(0.0, 10.0), headline_seeds=2, reference_seeds=2, moons_steps=100,
        moons_strengths=(1.0,), moons_seeds=2,
    ),
    # Tests: every code path, seconds per run, about 20 runs.
    "tiny": Profile(
        "tiny", families=("cnn",), train_size=300, epochs={"cnn": 1, "vit": 1, "timm_cnn": 1, "timm_vit": 1},
        val_size=300, test_size=300, probe_pool_size=200, long_tail_n_max=60, imbalance_ratio=10,
        few_shot_draws=2, sweep_alphas=(1.0,), sweep_betas=(0.0, 10.0), sweep_seeds=1, headline_seeds=2,
        reference_families=(), moons_train=100, moons_test=200, moons_steps=20, moons_hidden=16,
        moons_strengths=(1.0,), moons_seeds=2,
    ),
}


# ---------------------------------------------------------------------------------------------- settings, specs
def setting(alpha: float, beta: float, placement: str | None = "blocks", delta: float | None = None) -> dict:
    """A VCReg setting as it appears in a spec; alpha = beta = 0 is the baseline (no hooks, no placement)."""
    if alpha == 0 and beta == 0:
        placement = None
    return {"alpha": float(alpha), "beta": float(beta), "placement": placement, "delta": delta}


def label(s: dict) -> str:
    """``baseline`` or ``alpha=1, beta=10, blocks``."""
    if s["alpha"] == 0 and s["beta"] == 0:
        return BASELINE
    text = f"alpha={s['alpha']:g}, beta={s['beta']:g}, {s['placement']}"
    return text + (f", delta={s['delta']:g}" if s["delta"] is not None else "")


BASE = setting(0.0, 0.0)


def make_spec(profile: Profile, family: str, task: str, seed: int, vcreg: dict) -> dict:
    """The spec of one image run (everything that changes its result; see `runs`)."""
    fam = FAMILIES[family]
    p = profile
    data = {"val_size": p.val_size, "test_size": p.test_size, "split_seed": 0}
    if task == "coarse":
        data["probe_pool_size"] = p.probe_pool_size
    if task == "long_tail":
        data["long_tail"] = {"n_max": p.long_tail_n_max, "ratio": p.imbalance_ratio}
    spec = {
        "format": RUN_FORMAT,
        "family": family,
        "model": {"source": fam.source, **fam.config},
        "task": task,
        "seed": seed,
        "vcreg": vcreg,
        "train": {"size": None if task == "long_tail" else p.train_size, "epochs": p.epochs[family],
                  "batch_size": fam.batch_size, "learning_rate": fam.learning_rate, "weight_decay": p.weight_decay,
                  "warmup": p.warmup},
        "data": data,
    }
    if task == "fine":
        spec["eval"] = {"few_shot": {"shots": p.few_shot_shots, "draws": p.few_shot_draws}}
    return spec


def moons_spec(profile: Profile, seed: int, strength: float) -> dict:
    """The spec of one two-moons run (alpha = beta = strength on both hidden layers; 0: baseline)."""
    p = profile
    vcreg = setting(strength, strength, "hidden")
    return {
        "format": RUN_FORMAT,
        "family": "mlp",
        "task": "starvation",
        "seed": seed,
        "vcreg": vcreg,
        "train": {"epochs": p.moons_steps, "batch_size": p.moons_train, "learning_rate": 1e-2, "weight_decay": 0.0,
                  "warmup": 0.0},
        "moons": {"train": p.moons_train, "test": p.moons_test, "hidden": p.moons_hidden},
    }


# ---------------------------------------------------------------------------------------------- selection
# The metrics the selection reads: validation only, by construction of these names.
VAL_SOURCE = ("fine", "val_source_accuracy")
VAL_HIERARCHICAL = ("coarse", "val_hierarchical_probe")
VAL_CROSS_DOMAIN = ("fine", "val_cross_domain_probe")

SELECTION_RULE = (
    "Per family, on the validation splits only, paired per seed with the baseline of the same seed: among the "
    "settings whose mean drop of 10-class Fashion-MNIST validation accuracy (task fine) is at most {max_drop:g} "
    "points, choose the one with the highest mean over seeds of (hierarchical probe delta + cross-domain probe "
    "delta) / 2, in points (hierarchical: 4-superclass pretraining, 10-class linear probe on the validation "
    "split; cross-domain: 10-class pretraining, linear probe of digits scored on the digits validation split). "
    "Stage 1 applies the rule to the (alpha, beta) grid with the penalty on every block; stage 2 applies it to "
    "the stage-1 choice and the same coefficients at the other placements. If no setting meets the constraint, "
    "the one with the smallest drop is chosen and marked constraint_met = false."
)


def summarise(metrics: dict[tuple[str, str, int], dict], labels: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per setting, the paired validation deltas against the baseline (points, means over ``seeds``).

    ``metrics[(task, setting label, seed)]`` is a run's metrics dict (the baseline's label is ``baseline``).
    Returns ``{label: {"source_delta", "hierarchical_delta", "cross_domain_delta", "objective", "per_seed"}}``
    where ``objective = (hierarchical_delta + cross_domain_delta) / 2``. Reads only the ``VAL_*`` metrics.
    """
    out = {}
    for name in labels:
        per_seed = {}
        for seed in seeds:
            def delta(task_metric):
                task, key = task_metric
                return 100.0 * (metrics[(task, name, seed)][key] - metrics[(task, BASELINE, seed)][key])

            hier, cross = delta(VAL_HIERARCHICAL), delta(VAL_CROSS_DOMAIN)
            per_seed[seed] = {"source_delta": delta(VAL_SOURCE), "hierarchical_delta": hier,
                              "cross_domain_delta": cross, "objective": (hier + cross) / 2.0}
        means = {k: float(np.mean([v[k] for v in per_seed.values()])) for k in next(iter(per_seed.values()))}
        out[name] = {**means, "per_seed": per_seed}
    return out


def choose(summary: dict[str, dict], max_drop: float) -> dict:
    """Apply `SELECTION_RULE` to a `summarise` table: ``{"label", "constraint_met", "eligible"}``.

    Ties keep the first label in ``summary``'s order.
    """
    eligible = [k for k, v in summary.items() if -v["source_delta"] <= max_drop]
    if eligible:
        best = max(eligible, key=lambda k: summary[k]["objective"])
        return {"label": best, "constraint_met": True, "eligible": eligible}
    best = max(summary, key=lambda k: summary[k]["source_delta"])
    return {"label": best, "constraint_met": False, "eligible": []}


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Which runs the experiments need, given the profile and the finished runs in ``cache``."""

    profile: Profile
    families: tuple[str, ...]
    experiments: tuple[str, ...]
    cache: RunCache
    _placements: dict[str, list[str]] = field(default_factory=dict)

    def seeds(self, n: int) -> list[int]:
        return list(range(n))

    def placements(self, family: str) -> list[str]:
        """The family's placements (built once from a model: which exist depends on the architecture)."""
        if family not in self._placements:
            found = list(FAMILIES[family].placements(FAMILIES[family].build(10, 0)))
            keep = self.profile.family_placements.get(family)
            self._placements[family] = [pl for pl in found if keep is None or pl in keep]
        return self._placements[family]

    # ---------------------------------------------------------------- the sweep
    def stage1(self, family: str) -> list[dict]:
        p = self.profile
        alphas, betas = p.grid(family)
        grid = [setting(a, b) for a in alphas for b in betas if (a, b) != (0, 0)]
        ref = setting(*p.reference)
        return grid + ([ref] if ref not in grid else [])

    def _sweep_specs(self, family: str, settings: list[dict]) -> list[dict]:
        return [make_spec(self.profile, family, task, seed, s)
                for seed in self.seeds(self.profile.sweep_seeds) for s in settings for task in ("fine", "coarse")]

    def _metrics(self, family: str, settings: list[dict]) -> dict | None:
        """``{(task, label, seed): metrics}`` of the sweep runs of ``settings`` and the baseline, or None while one
        is missing."""
        out = {}
        for spec in self._sweep_specs(family, [BASE, *settings]):
            record = self.cache.get(spec)
            if record is None:
                return None
            out[(spec["task"], label(spec["vcreg"]), spec["seed"])] = record["metrics"]
        return out

    def _stage(self, family: str, settings: list[dict]) -> dict | None:
        metrics = self._metrics(family, settings)
        if metrics is None:
            return None
        names = [label(s) for s in settings]
        table = summarise(metrics, names, self.seeds(self.profile.sweep_seeds))
        pick = choose(table, self.profile.max_source_drop)
        return {"settings": settings, "table": table, **pick,
                "setting": settings[names.index(pick["label"])]}

    def stage1_result(self, family: str) -> dict | None:
        return self._stage(family, self.stage1(family))

    def stage2(self, family: str) -> list[dict] | None:
        first = self.stage1_result(family)
        if first is None:
            return None
        s = first["setting"]
        return [setting(s["alpha"], s["beta"], pl, s["delta"]) for pl in self.placements(family) if pl != "blocks"]

    def stage2_result(self, family: str) -> dict | None:
        """The final choice: the rule over the stage-1 choice and its other placements."""
        others = self.stage2(family)
        if others is None:
            return None
        return self._stage(family, [self.stage1_result(family)["setting"], *others])

    def chosen(self, family: str) -> dict | None:
        final = self.stage2_result(family)
        return None if final is None else final["setting"]

    # ---------------------------------------------------------------- the headline
    def headline_specs(self, family: str, vcreg: dict, seeds: int) -> list[dict]:
        return [make_spec(self.profile, family, task, seed, vcreg)
                for seed in self.seeds(seeds) for task in IMAGE_TASKS]

    def moons_specs(self) -> list[dict]:
        return [moons_spec(self.profile, seed, s)
                for seed in self.seeds(self.profile.moons_seeds) for s in (0.0, *self.profile.moons_strengths)]

    def ready(self) -> list[dict]:
        """Runs that can start now, most urgent first: those that unlock a later stage, then the sweep's stage 1,
        then runs nothing waits for (baselines and the old default of the headline, two moons)."""
        p = self.profile
        unlocking, stage1, fillers = [], [], []
        sweep = "sweep" in self.experiments or "headline" in self.experiments
        for family in self.families if sweep else ():
            stage1 += self._sweep_specs(family, [BASE, *self.stage1(family)])
            later = self.stage2(family)
            if later is not None:
                unlocking += self._sweep_specs(family, later)
            if "headline" in self.experiments:
                fillers += self.headline_specs(family, BASE, p.headline_seeds_of(family))
                if family in p.reference_families:
                    fillers += self.headline_specs(family, setting(*p.reference), p.reference_seeds)
                chosen = self.chosen(family)
                if chosen is not None:
                    unlocking += self.headline_specs(family, chosen, p.headline_seeds_of(family))
        if "starvation" in self.experiments:
            fillers += self.moons_specs()
        # Family by family: the first family's stage 2 and headline can start while the next one's stage 1 runs.
        return unlocking + stage1 + fillers


# ---------------------------------------------------------------------------------------------- the suite
def machine_info(threads: int) -> dict:
    from benchmarks.overhead import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "threads_per_job": threads}


def versions() -> dict:
    import sklearn
    import timm
    import torch
    import transformers

    import hf_vcreg

    return {"torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
            "scikit-learn": sklearn.__version__, "hf_vcreg": hf_vcreg.__version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Suite:
    """Runs the plan with a process pool, then writes ``selection.json`` and ``suite.json`` into ``out``."""

    profile: Profile
    out: Path
    families: tuple[str, ...]
    experiments: tuple[str, ...] = EXPERIMENTS
    jobs: int = 1
    threads: int = 1
    command: str = ""

    def __post_init__(self):
        self.out = Path(self.out)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown model families {unknown}: choose from {sorted(FAMILIES)}")
        missing = [f for f in self.families if f not in self.profile.epochs]
        if missing:
            raise ValueError(f"profile {self.profile.name!r} has no epochs for {missing}: add them to its `epochs`")
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise ValueError(f"unknown experiments {bad}: choose from {EXPERIMENTS}")
        self.cache = RunCache(self.out / "runs.jsonl")
        self.plan = Plan(self.profile, tuple(self.families), tuple(self.experiments), self.cache)

    def run(self) -> int:
        """Train what is missing; returns the number of runs trained in this call."""
        self.out.mkdir(parents=True, exist_ok=True)
        meta_path = self.out / "suite.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"sessions": []}
        profile = json.loads(json.dumps(asdict(self.profile)))  # as stored: tuples become lists
        if meta.get("profile") not in (None, profile):
            raise ValueError(f"{self.out} holds the results of another profile ({meta['profile']['name']!r}): use "
                             "another --out, or delete the folder to start over")
        meta.update({"profile": profile, "families": list(self.families),
                     "experiments": list(self.experiments),
                     "models": {f: {"source": FAMILIES[f].source, "config": FAMILIES[f].config,
                                    "learning_rate": FAMILIES[f].learning_rate, "batch_size": FAMILIES[f].batch_size}
                                for f in self.families},
                     "machine": machine_info(self.threads), "versions": versions()})
        started, t0 = _now(), time.time()
        trained = run_specs(self.plan.ready, self.cache, self.jobs, self.threads)
        meta["sessions"].append({"started": started, "finished": _now(), "wall_s": round(time.time() - t0, 1),
                                 "runs_trained": trained, "jobs": self.jobs, "threads": self.threads,
                                 "command": self.command})
        _write_json(meta_path, meta)
        if "sweep" in self.experiments or "headline" in self.experiments:
            _write_json(self.out / "selection.json", selection_file(self.plan))
        return trained


def selection_file(plan: Plan) -> dict:
    """The contents of ``selection.json``: per family the chosen setting, the rule and the numbers behind it."""
    families = {}
    for family in plan.families:
        final, first = plan.stage2_result(family), plan.stage1_result(family)
        if final is None:
            continue
        chosen = final["setting"]
        record = plan.cache.get(make_spec(plan.profile, family, "fine", 0, chosen))
        families[family] = {
            "vcreg_alpha": chosen["alpha"],
            "vcreg_beta": chosen["beta"],
            "placement": chosen["placement"],
            "layers": record["info"]["layers"],
            "constraint_met": final["constraint_met"] and first["constraint_met"],
            "validation": {k: v for k, v in final["table"][final["label"]].items() if k != "per_seed"},
            "stage1": {"chosen": first["label"], "table": first["table"]},
            "stage2": {"chosen": final["label"], "table": final["table"]},
        }
    return {
        "rule": SELECTION_RULE.format(max_drop=plan.profile.max_source_drop),
        "max_source_drop_points": plan.profile.max_source_drop,
        "seeds": plan.seeds(plan.profile.sweep_seeds),
        "profile": plan.profile.name,
        "families": families,
    }


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
