"""Evidence suite: baseline vs VCReg on small models and real offline data, several seeds, ablations, plots.

One entry point::

    python -m benchmarks.evidence [--quick] [--experiments hierarchical cross_dataset ...] [--seeds 0 1 2]
                                  [--out benchmarks/results/evidence]

Every comparison trains the *same* model (same config, same initialisation seed), on the same data, with the
same schedule, through :class:`hf_vcreg.VCRegTrainer`; the baseline is ``vcreg_alpha = vcreg_beta = 0`` (no
hooks at all), the VCReg run uses the library defaults (``hf_vcreg.config.VCREG_DEFAULTS``) unless an ablation
says otherwise. Experiments:

* ``hierarchical``: pretrain on the 4 Fashion-MNIST superclasses, linear-probe the 10 fine classes
  (frozen penultimate features, scikit-learn logistic regression).
* ``cross_dataset``: pretrain on the 10 Fashion-MNIST classes, linear-probe scikit-learn digits (8x8 resized
  to the model's input size).
* ``long_tail``: pretrain on Fashion-MNIST subsampled to imbalance ratio 100 (class 0 head, class 9 tail),
  evaluate the classifier on the balanced test set: overall, many-shot (3 head classes) and few-shot
  (3 tail classes) accuracy.
* ``collapse``: NC1 / CDNV of the penultimate features (train and test) and effective rank of the
  image-level (token / position mean-pooled) output of every block, for the 10-class models of
  ``cross_dataset`` (shared runs), with the shipped ``evaluate`` modules.
* ``starvation``: gradient starvation on linearly separable two moons (Pezeshki et al. 2021) with a 3-layer
  MLP, VCReg on both hidden layers via ``vcreg_layers`` patterns; decision-boundary plots and test accuracy
  when the dominant (linearly separable) coordinate is shuffled across the test set.
* ``ablations``: on the hierarchical task: variance term only, covariance term only, final block only,
  smooth-L1 (Huber) covariance, next to the default (every block, both terms, squared covariance).
* ``sweep``: alpha x beta grid on the hierarchical task (fewer seeds allowed); picks the default.

Results: ``<out>/<experiment>.json`` (machine, versions, seeds, date, wall time, exact configs, every run),
rewritten after every run so that an interrupted suite still leaves its finished runs, ``<out>/<experiment>.md``
and PNG plots. ``python -m benchmarks.report`` turns them into ``benchmarks/RESULTS.md``.

Data default to the offline sets of :mod:`benchmarks.data`; ``--source-dataset`` / ``--target-dataset`` accept
Hub data set names (``image`` + ``label`` columns, e.g. ``zalando-datasets/fashion_mnist``) for users online.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os

# NOTE: single-threaded BLAS / OpenMP unless the caller says otherwise. On a shared, oversubscribed machine
# multi-threaded BLAS (scikit-learn probes, metric SVDs) and torch spin-wait for descheduled threads.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hf_vcreg
from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.capture import feature_axis, find_blocks
from hf_vcreg.config import VCREG_DEFAULTS

from . import data as bdata
from .overhead import cpu_name

# Run order: the sweep before the image comparisons, because its best (alpha, beta) is the VCReg setting of every
# later comparison; starvation (independent, cheap) first.
EXPERIMENTS = ("starvation", "sweep", "hierarchical", "cross_dataset", "collapse", "long_tail", "ablations")
MODELS = ("vit", "cnn")
OFFLINE_SOURCE = "fashion_mnist"
OFFLINE_TARGET = "digits"

logger = logging.getLogger("benchmarks.evidence")


# ---------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """Sizes and schedule of one suite run (all experiments share them)."""

    name: str
    train_size: int  # stratified Fashion-MNIST training subset (pretraining and probe training)
    test_size: int  # stratified Fashion-MNIST test subset (every evaluation)
    epochs: int  # pretraining epochs
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    long_tail_n_max: int = 3000  # head-class size of the long-tail set (tail: n_max / imbalance_ratio)
    imbalance_ratio: float = 100.0
    long_tail_from_subset: bool = False  # draw the long-tail set from the train_size subset, not all 60k (tests)
    collapse_rows: int = 2000  # rows of train / test features for NC1, CDNV, effective rank
    moons_train: int = 300
    moons_test: int = 1000
    moons_steps: int = 500  # full-batch steps of the two-moons MLP
    moons_hidden: int = 100
    # NOTE: the grid reaches 10: the public code's beta 0.08 acts like beta ~ 0.08 (n - 1) with n ~ 10^3 rows
    # (its covariance gradient is (n - 1) times too large), so the meaningful range may reach well above 1.
    sweep_alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    sweep_betas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    sweep_seeds: int = 2  # the sweep uses the first `sweep_seeds` of the suite's seeds
    huber_delta: float = 0.1  # vcreg_delta of the smooth-L1 ablation
    moons_strengths: tuple[float, ...] = (0.1, 1.0, 10.0)  # alpha = beta values of the two-moons VCReg runs


PROFILES = {
    # Sized for ~1 hour on a shared 2-core CPU (the issue allows 2 hours; this session could not afford it).
    "full": Profile("full", train_size=4000, test_size=2000, epochs=3, long_tail_n_max=2000),
    "quick": Profile(
        "quick", train_size=2000, test_size=1000, epochs=2, long_tail_n_max=1000, collapse_rows=1000, moons_steps=200,
        sweep_alphas=(0.1, 10.0), sweep_betas=(0.1, 10.0), sweep_seeds=1, moons_strengths=(1.0, 10.0),
    ),
    # For tests: every code path, seconds per run.
    "tiny": Profile(
        "tiny", train_size=500, test_size=200, epochs=1, batch_size=64, long_tail_n_max=50, imbalance_ratio=10,
        long_tail_from_subset=True, collapse_rows=200,
        moons_train=100, moons_test=200, moons_steps=20, moons_hidden=16, sweep_alphas=(0.1,), sweep_betas=(0.01, 1.0),
        sweep_seeds=1, moons_strengths=(1.0,),
    ),
}


# ---------------------------------------------------------------------------------------------- metadata
def machine_info() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    import datasets
    import evaluate
    import sklearn
    import timm
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "datasets": datasets.__version__,
        "evaluate": evaluate.__version__,
        "scikit-learn": sklearn.__version__,
        "hf_vcreg": hf_vcreg.__version__,
    }


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Split:
    x: torch.Tensor  # (N, C, H, W) float32, normalised to [-1, 1]
    y: torch.Tensor  # (N,) int64 labels used for training
    fine: torch.Tensor  # (N,) int64 fine labels (== y unless relabelled)


class TensorDictDataset(torch.utils.data.Dataset):
    """Rows as ``{"pixel_values": x[i], "labels": y[i]}`` for ``transformers.Trainer``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _to_tensors(dataset, image_size: int) -> Split:
    """Decode a (Hub-schema) image-classification Dataset once into tensors via `with_transforms`."""
    if "image" not in dataset.column_names or "label" not in dataset.column_names:
        raise ValueError(
            f"dataset columns {dataset.column_names}: need 'image' and 'label'. Rename them first, e.g. "
            "dataset.rename_column('img', 'image')."
        )
    rows = bdata.with_transforms(dataset, image_size=image_size, channels=1)[:]
    labels = rows["labels"]
    return Split(rows["pixel_values"].contiguous(), labels, labels.clone())


def _load_named(name: str, max_train: int | None, max_test: int | None, seed: int = 0):
    """Offline names ``fashion_mnist`` / ``digits``; anything else is a Hub data set (``datasets.load_dataset``)."""
    if name == "fashion_mnist":
        return bdata.load_fashion_mnist(max_train=max_train, max_test=max_test, seed=seed)
    if name == "digits":
        return bdata.load_digits_dataset(split_seed=seed)
    import datasets

    ds = datasets.load_dataset(name)
    if "train" not in ds or "test" not in ds:
        raise ValueError(f"Hub dataset {name!r} has splits {list(ds)}; the suite needs 'train' and 'test'.")
    out = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        part = ds[split]
        if "img" in part.column_names and "image" not in part.column_names:
            part = part.rename_column("img", "image")
        if limit is not None and limit < len(part):
            part = part.shuffle(seed=seed).select(range(limit))
        out[split] = part
    return datasets.DatasetDict(out)


class Data:
    """The suite's data, decoded once per process."""

    def __init__(self, profile: Profile, source: str = OFFLINE_SOURCE, target: str = OFFLINE_TARGET, image_size=28):
        self.profile, self.source_name, self.target_name, self.image_size = profile, source, target, image_size
        self._source = None
        self._target = None
        self._coarse = None
        self._long_tail = None

    @property
    def source(self):
        if self._source is None:
            raw = _load_named(self.source_name, self.profile.train_size, self.profile.test_size)
            self._raw_source = raw
            self._source = {s: _to_tensors(raw[s], self.image_size) for s in ("train", "test")}
            self.source_class_names = raw["train"].features["label"].names
        return self._source

    @property
    def coarse(self):
        """Source relabelled to superclasses (``y`` coarse, ``fine`` fine)."""
        if self._coarse is None:
            src = self.source
            names = self.source_class_names
            if names == bdata.FASHION_MNIST_NAMES:
                mapping, coarse_names = bdata.FASHION_MNIST_COARSE, bdata.FASHION_MNIST_COARSE_NAMES
            elif names == bdata.DIGITS_NAMES:
                mapping, coarse_names = bdata.DIGITS_COARSE, bdata.DIGITS_COARSE_NAMES
            else:
                raise ValueError(
                    f"No superclass mapping for source classes {names}: the hierarchical experiment knows "
                    "Fashion-MNIST and digits. Use --source-dataset fashion_mnist (or a Hub copy with the same names)."
                )
            lookup = torch.tensor([mapping[c] for c in range(len(names))])
            self.coarse_class_names = coarse_names
            self._coarse = {s: Split(sp.x, lookup[sp.fine], sp.fine) for s, sp in src.items()}
        return self._coarse

    @property
    def target(self):
        if self._target is None:
            raw = _load_named(self.target_name, None, None)
            self._target = {s: _to_tensors(raw[s], self.image_size) for s in ("train", "test")}
        return self._target

    def long_tail(self) -> tuple[Split, list[int]]:
        """Imbalance-100 subset of the full source training split (class 0 head), decoded once."""
        if self._long_tail is None:
            p = self.profile
            if p.long_tail_from_subset:
                self.source  # noqa: B018 (decodes the subset and keeps the raw Dataset)
                raw = self._raw_source["train"]
            else:
                raw = _load_named(self.source_name, None, 10)["train"]
            sub = bdata.long_tail(raw, imbalance_ratio=p.imbalance_ratio, seed=0, n_max=p.long_tail_n_max)
            num_classes = raw.features["label"].num_classes
            counts = np.bincount(np.asarray(sub["label"]), minlength=num_classes).tolist()
            self._long_tail = (_to_tensors(sub, self.image_size), counts)
        return self._long_tail


# ---------------------------------------------------------------------------------------------- models
def vit_config(num_labels: int) -> dict:
    return dict(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
    )


def cnn_config(num_labels: int) -> dict:
    return dict(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        num_labels=num_labels,
    )


def build_model(kind: str, num_labels: int, seed: int) -> nn.Module:
    """A randomly initialised tiny classifier; ``seed`` fixes the initialisation (same for baseline and VCReg)."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        set_seed,
    )

    set_seed(seed)
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(**vit_config(num_labels)))
    if kind == "cnn":
        return ResNetForImageClassification(ResNetConfig(**cnn_config(num_labels)))
    raise ValueError(f"model kind {kind!r}: use one of {MODELS}")


class MoonsMLP(nn.Module):
    """3-layer MLP for 2-D points: two hidden Linear+ReLU blocks (``hidden.0``, ``hidden.1``) and a linear head."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden = nn.ModuleList(
            [nn.Sequential(nn.Linear(2, width), nn.ReLU()), nn.Sequential(nn.Linear(width, width), nn.ReLU())]
        )
        self.head = nn.Linear(width, 2)

    def forward(self, pixel_values):
        h = pixel_values
        for block in self.hidden:
            h = block(h)
        return self.head(h)


# ---------------------------------------------------------------------------------------------- training
BASELINE = {"vcreg_alpha": 0.0, "vcreg_beta": 0.0}



def make_args(profile: Profile, seed: int, vcreg: dict, out_dir: str, **overrides) -> VCRegConfig:
    kw = dict(
        output_dir=out_dir,
        per_device_train_batch_size=profile.batch_size,
        num_train_epochs=profile.epochs,
        learning_rate=profile.learning_rate,
        weight_decay=profile.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kw.update(overrides)
    kw.update(vcreg)
    return VCRegConfig(**kw)


TRAIN_KEYS = (
    "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate", "weight_decay",
    "lr_scheduler_type", "warmup_steps", "optim", "seed", "data_seed",
)


def train(model: nn.Module, args: VCRegConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Train through `VCRegTrainer`; returns the exact config used and the final logged losses."""
    trainer = VCRegTrainer(model=model, args=args, train_dataset=TensorDictDataset(x, y))
    t0 = time.time()
    out = trainer.train()
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    if trainer.state.log_history:  # the final log() call carries the VCReg terms (averaged over the last steps)
        metrics.update({k: v for k, v in trainer.state.log_history[-1].items() if isinstance(v, (int, float))})
    return {
        "vcreg": args.vcreg_dict(),
        "training": {k: getattr(args, k) if not hasattr(getattr(args, k), "value") else getattr(args, k).value
                     for k in TRAIN_KEYS},
        "regularised_layers": trainer.vcreg_layer_names,
        "train_loss": metrics.get("train_loss"),
        "final_task_loss": metrics.get("task_loss"),
        "final_penalty": metrics.get("vcreg/penalty"),
        "train_s": round(time.time() - t0, 2),
    }


# ---------------------------------------------------------------------------------------------- evaluation
def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


@torch.no_grad()
def forward_features(model: nn.Module, x: torch.Tensor, blocks: bool = False, batch: int = 512) -> dict:
    """Logits, penultimate features (the input of the final linear layer) and, with ``blocks``, the
    image-level output of every block (mean over tokens / positions, i.e. every axis but features and batch)."""
    model.eval()
    feats, logits, block_out = [], [], {}
    store = {}
    head = _last_linear(model)
    handles = [head.register_forward_pre_hook(lambda m, a: store.__setitem__("pen", a[0].flatten(1)))]
    names = find_blocks(model) if blocks else []
    modules = dict(model.named_modules())
    for name in names:

        def hook(m, a, out, name=name):
            t = out[0] if isinstance(out, (tuple, list)) else out
            axis = feature_axis(m, t) % t.dim()
            t = t.movedim(axis, -1)
            store[name] = t.reshape(t.shape[0], -1, t.shape[-1]).mean(1)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        for i in range(0, len(x), batch):
            out = model(x[i : i + batch])
            out = out.logits if hasattr(out, "logits") else out
            logits.append(out.float())
            feats.append(store["pen"].float())
            for name in names:
                block_out.setdefault(name, []).append(store[name].float())
    finally:
        for h in handles:
            h.remove()
    return {
        "logits": torch.cat(logits),
        "features": torch.cat(feats),
        "blocks": {k: torch.cat(v) for k, v in block_out.items()},
    }


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a logistic regression (L2, C=1, lbfgs) on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


class Metrics:
    """The shipped `evaluate` modules, loaded once (offline, by path)."""

    def __init__(self):
        from hf_vcreg.metrics import load_metric

        self.nc = load_metric("neural_collapse")
        self.rank = load_metric("effective_rank")

    def accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return float((logits.argmax(1) == labels).double().mean())

    def collapse(self, feats: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.nc.compute(embeddings=feats.numpy(), labels=labels.tolist())
        return {"nc1": float(out["nc1"]), "cdnv": float(out["cdnv"])}

    def effective_rank(self, feats: torch.Tensor) -> dict:
        out = self.rank.compute(embeddings=feats.numpy())
        return {"effective_rank": float(out["effective_rank"]), "rank_ratio": float(out["rank_ratio"])}


# ---------------------------------------------------------------------------------------------- the suite
def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


@dataclass
class Suite:
    profile: Profile
    out: Path
    seeds: list[int]
    models: list[str] = field(default_factory=lambda: list(MODELS))
    source: str = OFFLINE_SOURCE
    target: str = OFFLINE_TARGET
    command: str = ""
    threads: int = 1

    def __post_init__(self):
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = Data(self.profile, self.source, self.target)
        self._metrics = None
        self._cache: dict[str, dict] = {}
        self._results: dict[str, dict] = {}
        self._tmp = tempfile.mkdtemp(prefix="evidence_")
        # VCReg setting of the baseline-vs-VCReg comparisons: the library defaults until the sweep picks one.
        self.main_vcreg = dict(VCREG_DEFAULTS)
        self.main_vcreg_source = "library defaults (hf_vcreg.config.VCREG_DEFAULTS) at run time"

    @property
    def metrics(self) -> Metrics:
        if self._metrics is None:
            self._metrics = Metrics()
        return self._metrics

    # ---------------------------------------------------------------- results files
    def _meta(self, experiment: str) -> dict:
        return {
            "experiment": experiment,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": versions(),
            "seeds": self.seeds,
            "profile": asdict(self.profile),
            "models": {
                "vit": {"class": "ViTForImageClassification", "config": vit_config(0)},
                "cnn": {"class": "ResNetForImageClassification", "config": cnn_config(0)},
                "mlp": {"class": "MoonsMLP (2 -> h -> h -> 2, ReLU)", "width": self.profile.moons_hidden},
            },
            "data": {"source": self.source, "target": self.target},
            "vcreg_defaults_at_run_time": dict(VCREG_DEFAULTS),
            "vcreg_main": dict(self.main_vcreg),
            "vcreg_main_source": self.main_vcreg_source,
            "command": self.command,
        }

    def record(self, experiment: str, run: dict) -> None:
        res = self._results.setdefault(experiment, {**self._meta(experiment), "runs": [], "_t0": time.time()})
        res["runs"].append(run)
        self.flush(experiment)

    def flush(self, experiment: str, extra: dict | None = None) -> None:
        res = self._results[experiment]
        if extra:
            res.update(extra)
        res["wall_s"] = round(time.time() - res["_t0"], 1)
        payload = {k: v for k, v in res.items() if not k.startswith("_")}
        path = self.out / f"{experiment}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
        tmp.replace(path)

    # ---------------------------------------------------------------- image pretraining tasks
    def _pretrain(self, task: str, kind: str, vcreg: dict, seed: int) -> dict:
        """Train one model on one task and measure everything the experiments read from it (cached)."""
        key = _key(task, kind, vcreg, seed)
        if key in self._cache:
            return self._cache[key]
        t0 = time.time()
        p = self.profile
        if task == "coarse":
            train_split, test_split = self.data.coarse["train"], self.data.coarse["test"]
        elif task == "fine":
            train_split, test_split = self.data.source["train"], self.data.source["test"]
        elif task == "long_tail":
            train_split, counts = self.data.long_tail()
            test_split = self.data.source["test"]
        else:
            raise ValueError(task)
        num_labels = int(max(train_split.y.max(), test_split.y.max())) + 1
        model = build_model(kind, num_labels, seed)
        args = make_args(p, seed, vcreg, os.path.join(self._tmp, "run"))
        info = train(model, args, train_split.x, train_split.y)
        test = forward_features(model, test_split.x, blocks=True)
        m = {"source_test_accuracy": self.metrics.accuracy(test["logits"], test_split.y)}
        if task in ("coarse", "fine"):
            train_f = forward_features(model, train_split.x)["features"]
            m["fine_probe_accuracy"] = linear_probe(
                train_f.numpy(), train_split.fine.numpy(), test["features"].numpy(), test_split.fine.numpy()
            )
        if task == "fine":
            tgt = self.data.target
            tr = forward_features(model, tgt["train"].x)["features"].numpy()
            te = forward_features(model, tgt["test"].x)["features"].numpy()
            m["target_probe_accuracy"] = linear_probe(tr, tgt["train"].y.numpy(), te, tgt["test"].y.numpy())
            r = p.collapse_rows
            m.update({f"train_{k}": v for k, v in self.metrics.collapse(train_f[:r], train_split.y[:r]).items()})
            m.update({f"test_{k}": v for k, v in self.metrics.collapse(test["features"][:r], test_split.y[:r]).items()})
        if task == "long_tail":
            pred = test["logits"].argmax(1)
            per_class = [float((pred[test_split.y == c] == c).float().mean()) for c in range(10)]
            m["per_class_accuracy"] = per_class
            m["many_shot_accuracy"] = float(np.mean(per_class[:3]))
            m["medium_shot_accuracy"] = float(np.mean(per_class[3:7]))
            m["few_shot_accuracy"] = float(np.mean(per_class[7:]))
            m["train_class_counts"] = counts
        r = p.collapse_rows
        m.update({f"penultimate_{k}": v for k, v in self.metrics.effective_rank(test["features"][:r]).items()})
        m["block_effective_rank"] = {
            name: self.metrics.effective_rank(f[:r])["effective_rank"] for name, f in test["blocks"].items()
        }
        m["block_width"] = {name: int(f.shape[1]) for name, f in test["blocks"].items()}
        run = {"task": task, "model": kind, "seed": seed, **info, "metrics": m, "wall_s": round(time.time() - t0, 2)}
        self._cache[key] = run
        logger.info("%s %s %s seed %d: %s (%.1fs)", task, kind, vcreg, seed, _short(m), run["wall_s"])
        return run

    def _compare(self, experiment: str, task: str, variants: dict[str, dict], seeds=None) -> None:
        for kind in self.models:
            for seed in seeds or self.seeds:
                for name, vcreg in variants.items():
                    run = self._pretrain(task, kind, vcreg, seed)
                    self.record(experiment, {"variant": name, **run})

    def run_hierarchical(self):
        self._compare("hierarchical", "coarse", {"baseline": BASELINE, "vcreg": self.main_vcreg})

    def run_cross_dataset(self):
        self._compare("cross_dataset", "fine", {"baseline": BASELINE, "vcreg": self.main_vcreg})

    def run_collapse(self):
        self._compare("collapse", "fine", {"baseline": BASELINE, "vcreg": self.main_vcreg})

    def run_long_tail(self):
        self._compare("long_tail", "long_tail", {"baseline": BASELINE, "vcreg": self.main_vcreg})

    def run_ablations(self):
        d = dict(self.main_vcreg)
        variants = {
            "baseline": BASELINE,
            "vcreg (every block, both terms)": d,
            "variance only": {**d, "vcreg_beta": 0.0},
            "covariance only": {**d, "vcreg_alpha": 0.0},
            "final block only": {**d, "vcreg_layers": "last"},
            f"smooth L1 (delta={self.profile.huber_delta})": {**d, "vcreg_delta": self.profile.huber_delta},
        }
        self._compare("ablations", "coarse", variants)

    def run_sweep(self):
        p = self.profile
        variants = {"baseline": BASELINE}
        for a in p.sweep_alphas:
            for b in p.sweep_betas:
                variants[f"alpha={a:g}, beta={b:g}"] = {"vcreg_alpha": a, "vcreg_beta": b}
        self._compare("sweep", "coarse", variants, seeds=self.seeds[: p.sweep_seeds])
        runs = self._results["sweep"]["runs"]
        selection = select_defaults(runs)
        self.flush("sweep", {"selection": selection})
        if selection:
            self.main_vcreg = {"vcreg_alpha": selection["best_alpha"], "vcreg_beta": selection["best_beta"]}
            self.main_vcreg_source = f"best of the alpha/beta sweep ({selection['best_variant']})"
            logger.info("sweep selected %s: used for every later comparison", self.main_vcreg)

    # ---------------------------------------------------------------- two moons
    def run_starvation(self):
        p = self.profile
        train_ds = bdata.two_moons_separable(n=p.moons_train, seed=0)
        test_ds = bdata.two_moons_separable(n=p.moons_test, seed=1)
        xtr = torch.tensor(np.asarray(train_ds["x"]), dtype=torch.float32)
        ytr = torch.tensor(np.asarray(train_ds["label"]))
        xte = torch.tensor(np.asarray(test_ds["x"]), dtype=torch.float32)
        yte = torch.tensor(np.asarray(test_ds["label"]))
        ceiling = _minor_feature_ceiling(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy())
        variants = {"baseline": BASELINE}
        for s in p.moons_strengths:
            variants[f"vcreg alpha=beta={s:g}"] = {"vcreg_alpha": s, "vcreg_beta": s, "vcreg_layers": r"hidden\.0,hidden\.1"}
        grids = {}
        for seed in self.seeds:
            for name, vcreg in variants.items():
                t0 = time.time()
                torch.manual_seed(seed)
                model = MoonsMLP(p.moons_hidden)
                args = make_args(
                    p, seed, vcreg, os.path.join(self._tmp, "moons"), per_device_train_batch_size=p.moons_train,
                    num_train_epochs=p.moons_steps, learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant",
                )
                info = train(model, args, xtr, ytr)
                m = _moons_metrics(model, xte, yte, seed)
                m["minor_feature_ceiling_accuracy"] = ceiling
                with torch.no_grad():
                    hidden = forward_features(model, xte)["features"]
                m.update({f"hidden_{k}": v for k, v in self.metrics.effective_rank(hidden).items()})
                if seed == self.seeds[0]:
                    grids[name] = _boundary_grid(model)
                self.record("starvation", {"variant": name, "model": "mlp", "seed": seed, **info, "metrics": m,
                                           "wall_s": round(time.time() - t0, 2)})
                logger.info("starvation %s seed %d: %s", name, seed, _short(m))
        plot_boundaries(grids, xtr.numpy(), ytr.numpy(), self.out / "starvation_boundaries.png", self.seeds[0])
        self.flush("starvation", {"plots": ["starvation_boundaries.png"]})

    # ---------------------------------------------------------------- driver
    def run(self, experiments) -> None:
        # NOTE: 1 intra-op thread by default. On this shared 2-core machine (load ~10), 2 threads took 2.9 s per
        # ViT step against 0.18 s with 1 thread (OpenMP threads spin-wait for a descheduled sibling).
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.threads)
        for exp in experiments:
            if exp not in EXPERIMENTS:
                raise ValueError(f"unknown experiment {exp!r}: choose from {EXPERIMENTS}")
        with threadpool_limits(self.threads):
            self._run(experiments)

    def _run(self, experiments) -> None:
        for exp in experiments:
            t0 = time.time()
            logger.info("=== %s", exp)
            getattr(self, f"run_{exp}")()
            if exp in self._results:
                write_markdown(self.out / f"{exp}.json")
            plot_summary(self.out)
            logger.info("=== %s done in %.0fs", exp, time.time() - t0)


def select_defaults(runs: list[dict], metric: str = "fine_probe_accuracy") -> dict:
    """Best (alpha, beta) of a sweep: highest ``metric`` averaged over models and seeds (baseline excluded)."""
    scores: dict[str, list[float]] = {}
    for r in runs:
        if r["variant"] == "baseline":
            continue
        scores.setdefault(r["variant"], []).append(r["metrics"][metric])
    if not scores:
        return {}
    full = max(len(v) for v in scores.values())  # only variants measured on every (model, seed) compete
    table = {k: float(np.mean(v)) for k, v in scores.items() if len(v) == full}
    best = max(table, key=table.get)
    base = [r["metrics"][metric] for r in runs if r["variant"] == "baseline"]
    cfg = next(r["vcreg"] for r in runs if r["variant"] == best)
    return {
        "metric": metric,
        "averaged_over": "models and sweep seeds",
        "mean_by_variant": table,
        "baseline_mean": float(np.mean(base)) if base else None,
        "best_variant": best,
        "best_alpha": cfg["vcreg_alpha"],
        "best_beta": cfg["vcreg_beta"],
    }


# ---------------------------------------------------------------------------------------------- moons helpers
def _minor_feature_ceiling(xtr, ytr, xte, yte) -> float:
    """Test accuracy of a k-NN (k=15) that sees only the minor coordinate x_1: what x_1 alone can give."""
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(15).fit(xtr[:, 1:], ytr).score(xte[:, 1:], yte))


@torch.no_grad()
def _moons_metrics(model, xte, yte, seed) -> dict:
    model.eval()
    acc = lambda x: float((model(x).argmax(1) == yte).float().mean())
    shuffled = xte.clone()
    g = torch.Generator().manual_seed(1000 + seed)
    shuffled[:, 0] = shuffled[torch.randperm(len(xte), generator=g), 0]
    zeroed = xte.clone()
    zeroed[:, 0] = 0.0
    minor_shuffled = xte.clone()
    minor_shuffled[:, 1] = minor_shuffled[torch.randperm(len(xte), generator=g), 1]
    return {
        "test_accuracy": acc(xte),
        "dominant_shuffled_accuracy": acc(shuffled),
        "dominant_zeroed_accuracy": acc(zeroed),
        "minor_shuffled_accuracy": acc(minor_shuffled),
    }


@torch.no_grad()
def _boundary_grid(model, lim=(-2.0, 2.0), n=150) -> dict:
    xs = np.linspace(*lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    prob = torch.softmax(model(pts), 1)[:, 1].numpy().reshape(n, n)
    return {"x": gx, "y": gy, "p": prob}


# ---------------------------------------------------------------------------------------------- output
def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _short(m: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))


def plot_boundaries(grids: dict, x: np.ndarray, y: np.ndarray, path: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items()):
        ax.contourf(g["x"], g["y"], g["p"], levels=20, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
        ax.contour(g["x"], g["y"], g["p"], levels=[0.5], colors="k")
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", edgecolors="w", linewidths=0.4, s=14, vmin=0, vmax=1)
        ax.set_title(f"{name} (seed {seed})")
        ax.set_xlabel("x0 (dominant, linearly separable)")
        ax.set_ylabel("x1 (moon coordinate)")
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# Headline metric(s) of each experiment: (metric key, label, higher is better).
HEADLINES = {
    "hierarchical": [("fine_probe_accuracy", "fine-class linear probe acc."), ("source_test_accuracy", "superclass test acc.")],
    "cross_dataset": [("target_probe_accuracy", "digits linear probe acc."), ("source_test_accuracy", "Fashion-MNIST test acc.")],
    "long_tail": [("source_test_accuracy", "balanced test acc."), ("many_shot_accuracy", "many-shot acc. (3 head classes)"),
                  ("few_shot_accuracy", "few-shot acc. (3 tail classes)")],
    "collapse": [("test_cdnv", "CDNV test (higher = less collapse)"), ("test_nc1", "NC1 test (higher = less collapse)"),
                 ("train_cdnv", "CDNV train"), ("train_nc1", "NC1 train"),
                 ("penultimate_effective_rank", "penultimate effective rank")],
    "starvation": [("test_accuracy", "test acc."), ("dominant_shuffled_accuracy", "acc. with x0 shuffled"),
                   ("dominant_zeroed_accuracy", "acc. with x0 = 0"), ("minor_shuffled_accuracy", "acc. with x1 shuffled"),
                   ("minor_feature_reliance", "acc. lost when x1 is shuffled (test acc. − acc. with x1 shuffled)")],
    "ablations": [("fine_probe_accuracy", "fine-class linear probe acc."), ("source_test_accuracy", "superclass test acc."),
                  ("penultimate_effective_rank", "penultimate effective rank")],
    "sweep": [("fine_probe_accuracy", "fine-class linear probe acc."), ("source_test_accuracy", "superclass test acc.")],
}


def aggregate(runs: list[dict], metric: str) -> dict:
    """{(model, variant): (mean, std, n, paired diff mean, paired diff std)} with diffs vs the baseline of the same
    model and seed (std: sample std, ddof=1; 0 for a single seed)."""
    by: dict[tuple, dict[int, float]] = {}
    for r in runs:
        v = r["metrics"].get(metric)
        if isinstance(v, (int, float)):
            by.setdefault((r["model"], r["variant"]), {})[r["seed"]] = float(v)
    out = {}
    for (model, variant), vals in by.items():
        arr = np.array(list(vals.values()))
        base = by.get((model, "baseline"), {})
        diffs = np.array([vals[s] - base[s] for s in vals if s in base])
        out[(model, variant)] = {
            "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "n": len(arr),
            "diff_mean": float(diffs.mean()) if len(diffs) and variant != "baseline" else None,
            "diff_std": float(diffs.std(ddof=1)) if len(diffs) > 1 and variant != "baseline" else None,
            "diff_positive": int((diffs > 0).sum()) if variant != "baseline" else None,
        }
    return out


def fmt(x: float, pct: bool) -> str:
    return f"{100 * x:.1f}" if pct else f"{x:.3g}"


def is_fraction(metric: str) -> bool:
    """Metrics shown in percent (points): accuracies and accuracy differences."""
    return "accuracy" in metric or metric.endswith("_reliance")


def markdown_table(res: dict, metric: str, label: str) -> str:
    pct = is_fraction(metric)
    agg = aggregate(res["runs"], metric)
    if not agg:
        return ""
    unit = " (%)" if pct else ""
    lines = [
        f"**{label}**{unit}",
        "",
        "| model | variant | mean ± std | seeds | Δ vs baseline (paired, mean ± std) | seeds with Δ > 0 |",
        "|---|---|---|---|---|---|",
    ]
    for (model, variant), a in agg.items():
        if a["diff_mean"] is None:
            delta, pos = "—", "—"
        else:
            sign = "+" if a["diff_mean"] >= 0 else "−"
            delta = f"{sign}{fmt(abs(a['diff_mean']), pct)}"
            if a["diff_std"] is not None:
                delta += f" ± {fmt(a['diff_std'], pct)}"
            pos = f"{a['diff_positive']}/{a['n']}"
        lines.append(
            f"| {model} | {variant} | {fmt(a['mean'], pct)} ± {fmt(a['std'], pct)} | {a['n']} | {delta} | {pos} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(json_path: Path) -> Path:
    res = json.loads(Path(json_path).read_text())
    exp = res["experiment"]
    parts = [f"# {exp}", "", f"Date {res['date']}, wall time {res['wall_s']} s, seeds {res['seeds']}, "
             f"profile `{res['profile']['name']}`, machine {res['machine']['cpu']} ({res['machine']['cores']} cores).", ""]
    for metric, label in [(m, l) for m, l in HEADLINES.get(exp, [])]:
        t = markdown_table(res, metric, label)
        if t:
            parts += [t, ""]
    if res.get("selection"):
        s = res["selection"]
        parts += [f"Best on `{s['metric']}` averaged over {s['averaged_over']}: **{s['best_variant']}** "
                  f"({100 * s['mean_by_variant'][s['best_variant']]:.2f}%; baseline {100 * s['baseline_mean']:.2f}%).", ""]
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(parts))
    return path


def load_results(out: Path) -> dict[str, dict]:
    """``{experiment: results}`` of every results file in ``out``."""
    found = {}
    for p in sorted(Path(out).glob("*.json")):
        res = json.loads(p.read_text())
        if "experiment" in res and "runs" in res:
            found[res["experiment"]] = res
    return found


def plot_summary(out: Path, results: dict[str, dict] | None = None) -> list[Path]:
    """Bar charts (mean ± std over seeds) of the headline metric per experiment, effective rank per block, sweep
    heatmap; from ``results`` (``{experiment: results}``) or, if None, the results files in ``out``."""
    results = load_results(out) if results is None else results
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    panels = []
    for exp, metric in [("hierarchical", "fine_probe_accuracy"), ("cross_dataset", "target_probe_accuracy"),
                        ("long_tail", "source_test_accuracy"), ("long_tail", "few_shot_accuracy"),
                        ("collapse", "test_cdnv"), ("starvation", "dominant_shuffled_accuracy")]:
        if exp in results:
            agg = aggregate(results[exp]["runs"], metric)
            if agg:
                panels.append((exp, metric, agg))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (exp, metric, agg) in zip(axes[0], panels):
            keys = list(agg)
            ax.bar(range(len(keys)), [agg[k]["mean"] for k in keys], yerr=[agg[k]["std"] for k in keys],
                   color=["tab:gray" if k[1] == "baseline" else "tab:blue" for k in keys], capsize=3)
            ax.set_xticks(range(len(keys)), [f"{m}\n{v.replace('vcreg alpha=beta=', 'a=b=')[:14]}" for m, v in keys],
                          fontsize=7)
            lo = min(agg[k]["mean"] - agg[k]["std"] for k in keys)
            hi = max(agg[k]["mean"] + agg[k]["std"] for k in keys)
            pad = max(hi - lo, 0.02 * abs(hi), 1e-3)
            ax.set_ylim(max(0.0, lo - 0.5 * pad), hi + 0.3 * pad)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(f"{exp}\n{metric}", fontsize=8)
        made.append(_save_figure(fig, out / "summary.png"))
    if "collapse" in results:
        res = results["collapse"]
        models = sorted({r["model"] for r in res["runs"]})
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.4), squeeze=False)
        for ax, model in zip(axes[0], models):
            for variant, color in (("baseline", "tab:gray"), ("vcreg", "tab:blue")):
                rows = [r["metrics"]["block_effective_rank"] for r in res["runs"]
                        if r["model"] == model and r["variant"] == variant]
                if not rows:
                    continue
                names = list(rows[0])
                vals = np.array([[row[n] for n in names] for row in rows])
                ax.errorbar(range(len(names)), vals.mean(0), yerr=vals.std(0), label=variant, color=color, capsize=3,
                            marker="o")
                ax.set_xticks(range(len(names)), [n.split(".")[-1] for n in names])
            ax.set_title(f"{model}: effective rank per block (test, pooled)", fontsize=8)
            ax.set_xlabel("block")
            ax.legend(fontsize=7)
        made.append(_save_figure(fig, out / "effective_rank_per_block.png"))
    if "sweep" in results:
        res = results["sweep"]
        models = sorted({r["model"] for r in res["runs"]})
        alphas = sorted({r["vcreg"]["vcreg_alpha"] for r in res["runs"] if r["variant"] != "baseline"})
        betas = sorted({r["vcreg"]["vcreg_beta"] for r in res["runs"] if r["variant"] != "baseline"})
        if alphas and betas:
            fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.5), squeeze=False)
            for ax, model in zip(axes[0], models):
                grid = np.full((len(alphas), len(betas)), np.nan)
                base = [r["metrics"]["fine_probe_accuracy"] for r in res["runs"]
                        if r["model"] == model and r["variant"] == "baseline"]
                for i, a in enumerate(alphas):
                    for j, b in enumerate(betas):
                        v = [r["metrics"]["fine_probe_accuracy"] for r in res["runs"] if r["model"] == model
                             and r["variant"] != "baseline" and r["vcreg"]["vcreg_alpha"] == a
                             and r["vcreg"]["vcreg_beta"] == b]
                        if v:
                            grid[i, j] = 100 * (np.mean(v) - (np.mean(base) if base else 0.0))
                im = ax.imshow(grid, cmap="RdBu", vmin=-np.nanmax(np.abs(grid)), vmax=np.nanmax(np.abs(grid)))
                for i in range(len(alphas)):
                    for j in range(len(betas)):
                        if np.isfinite(grid[i, j]):
                            ax.text(j, i, f"{grid[i, j]:+.1f}", ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
                ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
                ax.set_xlabel("beta")
                ax.set_ylabel("alpha")
                ax.set_title(f"{model}: fine-probe acc. − baseline (pts)", fontsize=8)
                fig.colorbar(im, ax=ax)
            made.append(_save_figure(fig, out / "sweep_heatmap.png"))
    return made


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes, one seed for the sweep (a few minutes).")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None, help="Overrides --quick (tiny: tests).")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Default: 0 1 2 (quick: 0 1).")
    parser.add_argument("--out", default=None, help="Default benchmarks/results/evidence (quick: ..._quick).")
    parser.add_argument("--vcreg-alpha", type=float, default=None,
                        help="VCReg alpha of the comparisons when the sweep does not run (default: library default).")
    parser.add_argument("--vcreg-beta", type=float, default=None,
                        help="VCReg beta of the comparisons when the sweep does not run (default: library default).")
    parser.add_argument("--sweep-alphas", nargs="+", type=float, default=None, help="Override the sweep's alpha grid.")
    parser.add_argument("--sweep-betas", nargs="+", type=float, default=None, help="Override the sweep's beta grid.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: fastest on a shared, oversubscribed machine).")
    parser.add_argument("--source-dataset", default=OFFLINE_SOURCE,
                        help="'fashion_mnist' (offline, Debian package) or a Hub image-classification data set name.")
    parser.add_argument("--target-dataset", default=OFFLINE_TARGET,
                        help="Cross-dataset probe target: 'digits' (offline, scikit-learn) or a Hub data set name.")
    ns = parser.parse_args(argv)
    profile_name = ns.profile or ("quick" if ns.quick else "full")
    profile = PROFILES[profile_name]
    if ns.sweep_alphas:
        profile = replace(profile, sweep_alphas=tuple(ns.sweep_alphas))
    if ns.sweep_betas:
        profile = replace(profile, sweep_betas=tuple(ns.sweep_betas))
    seeds = ns.seeds if ns.seeds is not None else ([0, 1] if profile_name != "full" else [0, 1, 2])
    out = ns.out or ("benchmarks/results/evidence" + ("" if profile_name == "full" else f"_{profile_name}"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for name in ("transformers", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    suite = Suite(profile, Path(out), seeds, models=ns.models, source=ns.source_dataset, target=ns.target_dataset,
                  threads=ns.threads, command=" ".join(["python -m benchmarks.evidence", *(argv if argv is not None else sys.argv[1:])]))
    if ns.vcreg_alpha is not None or ns.vcreg_beta is not None:
        suite.main_vcreg = {
            "vcreg_alpha": ns.vcreg_alpha if ns.vcreg_alpha is not None else VCREG_DEFAULTS["vcreg_alpha"],
            "vcreg_beta": ns.vcreg_beta if ns.vcreg_beta is not None else VCREG_DEFAULTS["vcreg_beta"],
        }
        suite.main_vcreg_source = "command line (--vcreg-alpha / --vcreg-beta)"
    t0 = time.time()
    suite.run(ns.experiments)
    logger.info("suite done in %.0fs; results in %s", time.time() - t0, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
