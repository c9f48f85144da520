"""One run of the protocol (train one model, measure it), the run cache, and the process pool that executes runs.

A run is described by a *spec*: a JSON-able dict holding everything that changes its result (family and model
config, task, seed, VCReg setting, training schedule, data sizes, evaluation settings, `RUN_FORMAT`). Its key is
a hash of the spec, so a run is reused wherever the same spec appears again (the sweep's seeds 0-1 of the chosen
setting are the headline's seeds 0-1) and skipped when a killed suite is started again: every finished run is one
JSON line in ``runs.jsonl``.

Tasks: ``fine`` (10 Fashion-MNIST classes), ``coarse`` (4 superclasses), ``long_tail`` (imbalanced subset of the
pool), ``starvation`` (two moons, a 3-layer MLP). Metric names start with ``val_`` (the held-out validation split,
or the digits validation split for the cross-domain probes) or ``test_`` (the test splits); the selection reads
``val_`` keys only.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import data as edata
from .features import accuracy, extract_family, few_shot_probe, linear_probe, representation_stats
from .models import FAMILIES, MoonsMLP, layers_pattern

__all__ = ["RUN_FORMAT", "RunCache", "execute", "run_specs", "spec_key"]

RUN_FORMAT = 1
"""Version of what a run measures; part of every key, so a change here invalidates cached runs."""

TASKS = ("fine", "coarse", "long_tail", "starvation")
MANY, MEDIUM = 3, 7  # long tail: classes 0-2 many-shot, 3-6 medium-shot, 7-9 few-shot (head class 0)

logger = logging.getLogger("benchmarks.evidence")


def spec_key(spec: dict) -> str:
    """First 16 hex digits of the SHA-256 of the spec's canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class RunCache:
    """``runs.jsonl``: one finished run per line (``{"key", "spec", "metrics", ...}``), appended as runs finish.

    A line cut short by a kill is ignored when the file is read back (that run is simply trained again).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, spec: dict) -> dict | None:
        return self.records.get(spec_key(spec))

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by a kill: start on a fresh line
                    f.write(b"\n")
            f.write((json.dumps(record, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


# ---------------------------------------------------------------------------------------------- one run
class _Rows(torch.utils.data.Dataset):
    """Rows as ``{"pixel_values": x[i], "labels": y[i]}`` for ``transformers.Trainer``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@functools.cache
def _protocol_data(val_size: int, test_size: int | None, split_seed: int) -> edata.ProtocolData:
    return edata.protocol_data(val_size=val_size, test_size=test_size, split_seed=split_seed)


@functools.cache
def _coarse() -> torch.Tensor:
    return torch.from_numpy(
        edata.coarse_lookup(edata.FASHION_MNIST_COARSE, edata.FASHION_MNIST_NAMES, edata.FASHION_MNIST_COARSE_NAMES)
    )


def _train(model, spec: dict, layers: list[str], x: torch.Tensor, y: torch.Tensor, **overrides) -> dict:
    """Train ``model`` through ``VCRegTrainer`` as ``spec`` says; returns the trainer's summary."""
    from transformers.trainer_callback import PrinterCallback

    from hf_vcreg import VCRegConfig, VCRegTrainer

    t, v = spec["train"], spec["vcreg"]
    out_dir = tempfile.mkdtemp(prefix="evidence_run_")
    try:
        kw = dict(
            output_dir=out_dir, per_device_train_batch_size=t["batch_size"], num_train_epochs=t["epochs"],
            learning_rate=t["learning_rate"], weight_decay=t["weight_decay"], lr_scheduler_type="cosine",
            warmup_steps=t["warmup"], seed=spec["seed"], data_seed=spec["seed"], report_to="none",
            save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
            vcreg_alpha=v["alpha"], vcreg_beta=v["beta"], vcreg_delta=v["delta"],
        )
        if layers:
            kw["vcreg_layers"] = layers_pattern(layers)
        kw.update(overrides)
        args = VCRegConfig(**kw)
        trainer = VCRegTrainer(model=model, args=args, train_dataset=_Rows(x, y))
        trainer.remove_callback(PrinterCallback)  # the summary goes into the record, not onto the console
        t0 = time.time()
        trainer.train()
        summary = {k: v for k, v in trainer.state.log_history[-1].items() if isinstance(v, (int, float))}
        return {
            "layers": trainer.vcreg_layer_names,
            "steps": trainer.state.global_step,
            "train_s": round(time.time() - t0, 2),
            "train_loss": summary.get("train_loss"),
            "penalty": summary.get("vcreg/penalty"),
            "variance": summary.get("vcreg/variance"),
            "covariance": summary.get("vcreg/covariance"),
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _task_rows(spec: dict, d: edata.ProtocolData) -> np.ndarray:
    """Rows of the pool a task pretrains on (fixed for every run: seed 0)."""
    if spec["task"] == "long_tail":
        lt = spec["data"]["long_tail"]
        return edata.long_tail_indices(d.pool.y.numpy(), 10, lt["ratio"], seed=0, n_max=lt["n_max"])
    return edata.stratified_indices(d.pool.y.numpy(), spec["train"]["size"], seed=0)


def _image_run(spec: dict) -> dict:
    family = FAMILIES[spec["family"]]
    ds = spec["data"]
    d = _protocol_data(ds["val_size"], ds["test_size"], ds["split_seed"])
    rows = _task_rows(spec, d)
    train = d.pool.take(rows)
    task = spec["task"]
    to_label = (lambda y: _coarse()[y]) if task == "coarse" else (lambda y: y)
    model = family.build(4 if task == "coarse" else 10, spec["seed"])
    v = spec["vcreg"]
    layers = family.placements(model)[v["placement"]] if (v["alpha"] or v["beta"]) else []
    info = _train(model, spec, layers, train.x, to_label(train.y))
    evals = {"val": d.val, "test": d.test}
    out = {split: extract_family(model, family, s.x) for split, s in evals.items()}
    m = {f"{split}_source_accuracy": accuracy(out[split][0], to_label(s.y)) for split, s in evals.items()}
    if task == "fine":
        _, digits_train = extract_family(model, family, d.digits_train.x)
        digits = {"val": (extract_family(model, family, d.digits_val.x)[1], d.digits_val.y),
                  "test": (extract_family(model, family, d.digits_test.x)[1], d.digits_test.y)}
        probe = linear_probe((digits_train, d.digits_train.y), digits)
        m.update({f"{split}_cross_domain_probe": acc for split, acc in probe.items()})
        few = spec["eval"]["few_shot"]
        shot = few_shot_probe((digits_train, d.digits_train.y), digits, few["shots"], few["draws"], seed=0)
        m.update({f"{split}_few_shot_probe": acc for split, acc in shot.items()})
        m.update({f"test_{k}": val for k, val in representation_stats(out["test"][1], d.test.y).items()})
    elif task == "coarse":
        probe_rows = edata.stratified_indices(train.y.numpy(), ds["probe_pool_size"], seed=0)
        _, probe_x = extract_family(model, family, train.x[probe_rows])
        probe = linear_probe((probe_x, train.y[probe_rows]), {s: (out[s][1], evals[s].y) for s in evals})
        m.update({f"{split}_hierarchical_probe": acc for split, acc in probe.items()})
    elif task == "long_tail":
        for split, s in evals.items():
            pred = out[split][0].argmax(1)
            per_class = [float((pred[s.y == c] == c).double().mean()) for c in range(10)]
            m[f"{split}_balanced_accuracy"] = float(np.mean(per_class))
            m[f"{split}_many_shot_accuracy"] = float(np.mean(per_class[:MANY]))
            m[f"{split}_medium_shot_accuracy"] = float(np.mean(per_class[MANY:MEDIUM]))
            m[f"{split}_few_shot_accuracy"] = float(np.mean(per_class[MEDIUM:]))
            m[f"{split}_per_class_accuracy"] = per_class
        m["train_class_counts"] = np.bincount(train.y.numpy(), minlength=10).tolist()
    return {"info": info, "metrics": m}


@torch.no_grad()
def _moons_metrics(model, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Test accuracy, and with the dominant coordinate x0 shuffled / zeroed, and with the minor one x1 shuffled."""
    model.eval()

    def acc(z: torch.Tensor) -> float:
        return float((model(z).argmax(1) == y).double().mean())

    g = torch.Generator().manual_seed(1000 + seed)
    shuffled, zeroed, minor = x.clone(), x.clone(), x.clone()
    shuffled[:, 0] = shuffled[torch.randperm(len(x), generator=g), 0]
    zeroed[:, 0] = 0.0
    minor[:, 1] = minor[torch.randperm(len(x), generator=g), 1]
    return {
        "test_accuracy": acc(x),
        "dominant_shuffled_accuracy": acc(shuffled),
        "dominant_zeroed_accuracy": acc(zeroed),
        "minor_shuffled_accuracy": acc(minor),
    }


@torch.no_grad()
def _boundary(model, lim: float = 2.0, n: int = 61) -> list[list[float]]:
    """P(class 1) on an ``n`` x ``n`` grid over [-lim, lim]^2 (rows: x1, columns: x0), rounded to 3 decimals."""
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    prob = torch.softmax(model(pts), 1)[:, 1].numpy().reshape(n, n)
    return np.round(prob, 3).tolist()


def _moons_run(spec: dict) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    mo = spec["moons"]
    tensors = []
    for n, seed in ((mo["train"], 0), (mo["test"], 1)):
        ds = edata.two_moons_separable(n=n, seed=seed)
        tensors += [torch.tensor(np.asarray(ds["x"]), dtype=torch.float32), torch.tensor(np.asarray(ds["label"]))]
    xtr, ytr, xte, yte = tensors
    torch.manual_seed(spec["seed"])
    model = MoonsMLP(mo["hidden"])
    v = spec["vcreg"]
    layers = ["hidden.0", "hidden.1"] if (v["alpha"] or v["beta"]) else []
    info = _train(model, spec, layers, xtr, ytr, lr_scheduler_type="constant")
    m = _moons_metrics(model, xte, yte, spec["seed"])
    m["minor_feature_reliance"] = m["test_accuracy"] - m["minor_shuffled_accuracy"]
    # What x1 alone can give: a 15-NN classifier that sees only the minor coordinate.
    m["minor_feature_ceiling_accuracy"] = float(KNeighborsClassifier(15).fit(xtr[:, 1:], ytr).score(xte[:, 1:], yte))
    out = {"info": info, "metrics": m}
    if spec["seed"] == 0:
        out["boundary"] = _boundary(model)
    return out


def execute(spec: dict) -> dict:
    """Train and measure the run ``spec`` describes; returns its record (``key``, ``spec``, ``metrics``, ...)."""
    if spec["task"] not in TASKS:
        raise ValueError(f"unknown task {spec['task']!r}: use one of {TASKS}")
    t0, cpu0 = time.time(), time.process_time()
    result = _moons_run(spec) if spec["task"] == "starvation" else _image_run(spec)
    return {"key": spec_key(spec), "spec": spec, **result, "wall_s": round(time.time() - t0, 2),
            "cpu_s": round(time.process_time() - cpu0, 2), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- execution
_LIMITS = []


def set_threads(threads: int) -> None:
    """One process's thread budget: torch intra-op threads and every BLAS / OpenMP pool (scikit-learn probes)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    _LIMITS.append(threadpool_limits(threads))  # kept referenced: the limits hold for the process's lifetime


def _init_worker(threads: int) -> None:
    import transformers

    set_threads(threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("hf_vcreg").setLevel(logging.ERROR)


def run_specs(ready: Callable[[], list[dict]], cache: RunCache, jobs: int = 1, threads: int = 1) -> int:
    """Execute runs until ``ready()`` offers none that is neither cached nor running; returns how many ran.

    ``ready()`` returns the specs that can run now, most urgent first (it is called again after every finished
    run, so a later stage can depend on an earlier one). ``jobs`` > 1 runs that many worker processes
    (``spawn``), each with ``threads`` threads; ``jobs`` = 1 runs in this process.
    """
    done = 0

    def pending(busy: set[str]) -> list[dict]:
        out, seen = [], set(busy)
        for spec in ready():
            key = spec_key(spec)
            if key not in cache and key not in seen:
                seen.add(key)
                out.append(spec)
        return out

    def finish(record: dict) -> None:
        nonlocal done
        cache.add(record)
        done += 1
        s = record["spec"]
        logger.info("run %d done (%s %s seed %s %s): %.0f s", done, s.get("family"), s["task"], s["seed"],
                    s["vcreg"], record["wall_s"])

    if jobs <= 1:  # in this process: its thread budget for the runs, the caller's restored afterwards
        from threadpoolctl import threadpool_limits

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads):
                while todo := pending(set()):
                    finish(execute(todo[0]))
        finally:
            torch.set_num_threads(before)
        return done
    os.environ.update({v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        running: dict[cf.Future, str] = {}
        while True:
            for spec in pending(set(running.values()))[: jobs - len(running)]:
                running[pool.submit(execute, spec)] = spec_key(spec)
            if not running:
                return done
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                del running[future]
                finish(future.result())
