#!/usr/bin/env python
"""Pretrain an image classifier with and without VCReg, then measure transfer: the hf_vcreg main command.

    python examples/pretrain.py

With no arguments: for each of ``--seeds`` (0,1,2) it trains a baseline and a VCReg model (a small
transformers ResNet; VCReg at the library's per-family defaults) on a stratified subset of Fashion-MNIST
(read offline from the Debian package ``dataset-fashion-mnist``), linear-probes both backbones on
scikit-learn's digits (ships with the install) and prints ONE table: source accuracy, transfer accuracy
(mean ± sample std over seeds, and the paired per-seed deltas), the feature statistics of both runs (the
baseline's through ``vcreg_monitor_only``, which logs them without a penalty), a one-line reading and the
next step. It writes ``summary.json`` and ``summary.md`` and saves every final model under ``--output_dir``
(``<run>-seed<k>/``, loadable with ``from_pretrained``); per-step logs go to ``trainer_state.json`` there.

Every trainer is built, its layers resolved and one forward pass run BEFORE any training, so a configuration
error (``--vcreg_layers nomatch``, an unknown ``--model_name``) costs seconds: it prints one line and exits 2.

Other data and models (see docs/pretraining.md):

    python examples/pretrain.py --model_name timm:resnet18 --image_size 32 --seeds 0
    python examples/pretrain.py --train_dir path/to/class_folders --transfer none --runs vcreg
    python examples/pretrain.py --mixup_alpha 0.8 --cutmix_alpha 1.0 --auto_augment trivial --rrc_scale 0.35
    python examples/pretrain.py cfg.json       # any field below, the script's defaults apply under it
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForImageClassification, HfArgumentParser, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/: offline_data, finetune

from offline_data import (  # noqa: E402
    FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_NAMES,
    load_digits_dataset,
    load_fashion_mnist,
    stratified_indices,
)

from hf_vcreg import VCRegConfig, VCRegTrainer  # noqa: E402
from hf_vcreg.publishing import record_preprocessing  # noqa: E402

logger = logging.getLogger("pretrain")

RUNS = ("baseline", "vcreg")

# The script's defaults, applied with parser.set_defaults: `--help` shows them and a JSON config starts from them.
SCRIPT_DEFAULTS: dict = {
    # data and model: a run of about 5 minutes on 2 CPU cores for 3 seeds x 2 runs
    "model_name": "resnet", "dataset_name": "fashion_mnist", "image_size": 28, "max_train_samples": 20000,
    "max_eval_samples": 5000, "seeds": "0,1,2", "transfer": "fine_labels",
    # TrainingArguments
    "output_dir": "outputs/pretrain", "num_train_epochs": 3, "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 256, "learning_rate": 4e-3, "weight_decay": 0.05, "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 10, "report_to": "none",
    "remove_unused_columns": False, "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
    "dataloader_pin_memory": False,
}

EPILOG = """\
The options that matter first (script defaults in brackets; every TrainingArguments / VCRegConfig field works):
  --model_name     resnet | vit (small transformers models) | timm:<arch> | a transformers checkpoint [resnet]
  --dataset_name   fashion_mnist (offline, Debian package dataset-fashion-mnist) | digits | a Hub data set
  --train_dir      an imagefolder directory instead
  --seeds 0,1,2    --runs baseline,vcreg    --transfer fine_labels|digits|none    --save_final_model true
  --image_size 28  --max_train_samples 20000 --max_eval_samples 5000  --num_train_epochs 3  --learning_rate 4e-3
  --rrc_scale 1.0 (RandomResizedCrop lower scale; 1 = off)  --hflip false  --auto_augment none|trivial|rand
  --mixup_alpha 0  --cutmix_alpha 0 (soft labels, soft-target cross-entropy)  --label_smoothing_factor 0
  --drop_path_rate 0 (timm models / transformers configs that have it)
  --vcreg_alpha / --vcreg_beta  unset = the recommended value for the model's family (hf_vcreg.config.RECOMMENDED)
  --vcreg_layers blocks | last | module-name regular expressions   --vcreg_monitor_only (statistics, no penalty)
Config errors print one line and exit with status 2 before any training. docs/pretraining.md has the recipe."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's (script) default and keeps the epilog's layout."""


class ConfigError(ValueError):
    """A bad command-line / JSON value, found before any training: printed as one line, exit status 2."""


@dataclass
class ModelArguments:
    model_name: str = field(
        default="resnet",
        metadata={"help": "'resnet' or 'vit' (small transformers models), 'timm:<arch>', or a transformers checkpoint."},
    )
    runs: str = field(default="baseline,vcreg", metadata={"help": "Which runs: 'baseline', 'vcreg' or both."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds; each trains every run."})
    save_final_model: bool = field(default=True, metadata={"help": "Save each final model to output_dir/<run>-seed<k>."})
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth (timm models, transformers configs with it)."})
    torch_threads: int = field(default=2, metadata={"help": "torch.set_num_threads (CPU)."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "'fashion_mnist' (offline, Debian package), 'digits' (scikit-learn) or a Hub data set."},
    )
    train_dir: str | None = field(default=None, metadata={"help": "An `imagefolder` directory (class sub-folders)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    image_size: int = field(default=28, metadata={"help": "Training resolution (image_size x image_size)."})
    max_train_samples: int | None = field(default=1000, metadata={"help": "Stratified training subset (None: all)."})
    max_eval_samples: int | None = field(default=1000, metadata={"help": "Stratified test subset (None: all)."})
    transfer: str = field(
        default="fine_labels",
        metadata={"help": "Linear-probe target. 'fine_labels' (Fashion-MNIST only): pretrain on its 4 superclasses, "
                  "probe the 10 classes (hierarchical transfer); 'digits': probe scikit-learn's digits "
                  "(cross-domain); 'none'."})
    rrc_scale: float = field(default=1.0, metadata={"help": "RandomResizedCrop scale lower bound (1.0: off)."})
    hflip: bool = field(default=False, metadata={"help": "Random horizontal flip."})
    auto_augment: str = field(default="none", metadata={"help": "'none', 'trivial' (TrivialAugmentWide) or 'rand' (RandAugment)."})
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp alpha (0: off); soft labels."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix alpha (0: off); soft labels."})


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, VCRegConfig),
        usage="python examples/pretrain.py [--option value ...] | python examples/pretrain.py config.json",
        description=__doc__.split("\n")[0] + "\n\n" + EPILOG, formatter_class=_HelpFormatter,
    )
    parser.set_defaults(**SCRIPT_DEFAULTS)
    return parser


def parse(argv: list[str]) -> tuple[ModelArguments, DataArguments, VCRegConfig]:
    """Command line or one JSON file; both start from SCRIPT_DEFAULTS (a JSON config only sets what it names)."""
    parser = make_parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            return parser.parse_dict({**SCRIPT_DEFAULTS, **json.load(f)})
    return parser.parse_args_into_dataclasses(args=argv)


# ----------------------------------------------------------------------------------------------------- data
MEAN = STD = 0.5


def load_data(args: DataArguments):
    """``DatasetDict(train, test)`` with ``image`` and ``label`` columns; train/test stratified subsets."""
    from datasets import load_dataset

    if args.train_dir is not None:
        if not os.path.isdir(args.train_dir):
            raise ConfigError(f"--train_dir {args.train_dir!r} does not exist (give a folder of class sub-folders).")
        data = load_dataset("imagefolder", data_dir=args.train_dir)
    elif args.dataset_name == "fashion_mnist":
        try:  # the same stratified subsets (seed 0) as the benchmarks' loader
            return load_fashion_mnist(max_train=args.max_train_samples, max_test=args.max_eval_samples, seed=0)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    elif args.dataset_name == "digits":
        data = load_digits_dataset()
    else:
        data = load_dataset(args.dataset_name)
    if "test" not in data:
        data = data["train"].train_test_split(test_size=0.25, seed=0, stratify_by_column=args.label_column)
    for column, name in ((args.image_column, "image"), (args.label_column, "label")):
        if column not in data["train"].column_names:
            raise ConfigError(f"column {column!r} is not in the data set ({data['train'].column_names}); set "
                              f"--{name}_column.")
        if column != name:
            data = data.rename_column(column, name)
    for split, limit in (("train", args.max_train_samples), ("test", args.max_eval_samples)):
        if limit is not None and limit < len(data[split]):
            labels = np.asarray(data[split]["label"])
            data[split] = data[split].select(stratified_indices(labels, limit, seed=0))
    return data


PROBE_TRAIN = 10_000  # training images (fine labels) the hierarchical probe is fitted on
TRANSFER_TEXT = {
    "fine_labels": "the 10 classes from the 4-superclass model (hierarchical), linear probe on frozen features",
    "digits": "scikit-learn digits (cross-domain), linear probe on frozen features",
    "none": "none",
}


def to_superclasses(data):
    """Relabel Fashion-MNIST to its 4 superclasses (tops, bottoms and dresses, footwear, bags): returns the
    relabelled ``DatasetDict`` and ``{split: fine labels}`` (numpy) for the hierarchical probe."""
    from datasets import ClassLabel

    lookup = np.array([FASHION_MNIST_COARSE[i] for i in range(len(FASHION_MNIST_COARSE))])
    fine = {split: np.asarray(data[split]["label"]) for split in data}
    features = data["train"].features.copy()
    features["label"] = ClassLabel(names=FASHION_MNIST_COARSE_NAMES)
    coarse = data.map(lambda batch: {"label": lookup[np.asarray(batch["label"])].tolist()}, batched=True,
                      features=features)
    return coarse, fine


def make_transform(args: DataArguments, train: bool):
    """torchvision.transforms.v2 pipeline: (train: augmentation) -> resize -> [0, 1] -> normalise (MEAN, STD).

    Evaluation: resize to image_size (bilinear), the preprocessing `record_preprocessing` publishes.
    """
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(), v2.RGB()]
    size = (args.image_size, args.image_size)
    if train and args.rrc_scale < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(args.rrc_scale, 1.0), antialias=True))
    else:
        steps.append(v2.Resize(size, antialias=True))
    if train and args.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if train and args.auto_augment != "none":
        steps.append({"trivial": v2.TrivialAugmentWide, "rand": v2.RandAugment}[args.auto_augment]())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN] * 3, [STD] * 3)]
    pipeline = v2.Compose(steps)

    def transform(batch: dict) -> dict:
        return {"pixel_values": torch.stack([pipeline(image) for image in batch["image"]]),
                "labels": torch.as_tensor(batch["label"], dtype=torch.long)}

    return transform


def batch_mixer(args: DataArguments, num_labels: int):
    """MixUp / CutMix (torchvision v2) on a batch: (pixel_values, int labels) -> (mixed, soft labels (B, C))."""
    if args.mixup_alpha <= 0 and args.cutmix_alpha <= 0:
        return None
    from torchvision.transforms import v2

    mixers = [m for m, a in ((v2.MixUp, args.mixup_alpha), (v2.CutMix, args.cutmix_alpha)) if a > 0]
    alphas = [a for a in (args.mixup_alpha, args.cutmix_alpha) if a > 0]
    ops = [m(alpha=a, num_classes=num_labels) for m, a in zip(mixers, alphas)]
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


class PretrainTrainer(VCRegTrainer):
    """VCRegTrainer + MixUp/CutMix on training batches (soft labels -> the trainer's soft-target cross-entropy)."""

    def __init__(self, *args, batch_mix=None, **kwargs):
        self.batch_mix = batch_mix
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.batch_mix is not None and model.training:
            pixels, labels = self.batch_mix(inputs["pixel_values"], inputs["labels"])
            inputs = {**inputs, "pixel_values": pixels, "labels": labels}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# ----------------------------------------------------------------------------------------------------- models
def build_model(name: str, num_labels: int, image_size: int, id2label: dict[int, str], drop_path_rate: float):
    label2id = {v: k for k, v in id2label.items()}
    labels = {"num_labels": num_labels, "id2label": id2label, "label2id": label2id}
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        if not timm.is_model(arch):
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
            raise ConfigError(f"--model_name {name!r}: timm has no model {arch!r}"
                              + (f"; close names: {', '.join(close)}" if close else "") + ".")
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        return timm.create_model(arch, num_classes=num_labels, **extra)
    if name == "resnet":
        config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
                                           layer_type="basic", **labels)
    elif name == "vit":
        config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        intermediate_size=128, image_size=image_size, patch_size=4, **labels)
    else:
        config = AutoConfig.from_pretrained(name, **labels)
    if drop_path_rate:
        if not hasattr(config, "drop_path_rate"):
            raise ConfigError(f"--drop_path_rate {drop_path_rate}: {type(config).__name__} has no drop_path_rate; "
                              "use a timm model or a transformers model with stochastic depth (ConvNeXt, Swin, ...).")
        config.drop_path_rate = drop_path_rate
    if name in ("resnet", "vit"):
        return AutoModelForImageClassification.from_config(config)
    return AutoModelForImageClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (its input is the backbone's feature vector)."""
    for owner in (model, getattr(model, "timm_model", None)):
        if owner is not None and hasattr(owner, "get_classifier"):
            return owner.get_classifier()
    head = getattr(model, "classifier", None)
    if isinstance(head, torch.nn.Module):
        return head
    raise ConfigError(f"{type(model).__name__} has no `classifier` / get_classifier(): the transfer probe needs one "
                      "(use --transfer none).")


@torch.no_grad()
def features(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The backbone features (the classification head's input), flattened, in eval mode."""
    captured = []
    hook = head_module(model).register_forward_pre_hook(lambda m, a: captured.append(a[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    bare = not isinstance(model, transformers.PreTrainedModel)
    try:
        for start in range(0, len(pixel_values), batch_size):
            x = pixel_values[start:start + batch_size].to(device)
            model(x) if bare else model(pixel_values=x)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy of a standardised logistic regression trained on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# ----------------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(results: dict, meta: dict) -> dict:
    """Per run: mean/std over seeds and per-seed values; paired per-seed deltas vcreg - baseline."""
    keys = ("source_accuracy", "transfer_accuracy", "variance", "covariance")
    runs = {}
    for run, per_seed in results.items():
        runs[run] = {}
        for key in keys:
            values = [r[key] for r in per_seed.values() if r.get(key) is not None]
            if values:
                mean, std = _mean_std(values)
                runs[run][key] = {"mean": mean, "std": std, "per_seed": values}
    summary = {**meta, "runs": runs, "per_seed": results}
    if set(RUNS) <= set(results):
        seeds = sorted(set(results["baseline"]) & set(results["vcreg"]), key=int)
        for key in ("source_accuracy", "transfer_accuracy"):
            deltas = [results["vcreg"][s][key] - results["baseline"][s][key] for s in seeds
                      if results["vcreg"][s].get(key) is not None]
            if deltas:
                mean, std = _mean_std(deltas)
                summary.setdefault("paired_delta", {})[key] = {"seeds": seeds[:len(deltas)], "per_seed": deltas,
                                                                "mean": mean, "std": std,
                                                                "ahead": sum(d > 0 for d in deltas)}
        summary["reading"] = reading(summary)
        transfer = summary.get("paired_delta", {}).get("transfer_accuracy")
        if transfer:
            n, k = len(transfer["per_seed"]), transfer["ahead"]
            summary["conclusion"] = {"vcreg_ahead_on_transfer": k == n, "seeds_ahead": k, "seeds": n,
                                     "transfer_delta_pts": 100 * transfer["mean"]}
    return summary


def reading(summary: dict) -> str:
    delta = summary.get("paired_delta", {})
    transfer, source = delta.get("transfer_accuracy"), delta.get("source_accuracy")
    parts = []
    if transfer:
        n, k = len(transfer["per_seed"]), transfer["ahead"]
        verdict = "on every seed" if k == n else "on no seed" if k == 0 else "not a consistent effect"
        parts.append(f"VCReg ahead on transfer on {k}/{n} seeds ({verdict}; Δ {100 * transfer['mean']:+.1f} ± "
                     f"{100 * transfer['std']:.1f} pts)")
    if source:
        parts.append(f"source Δ {100 * source['mean']:+.1f} ± {100 * source['std']:.1f} pts")
    return "; ".join(parts) + "." if parts else ""


def render_table(summary: dict) -> str:
    def cell(run: str, key: str, scale: float = 100.0, fmt: str = "{:.1f} ± {:.1f}") -> str:
        value = summary["runs"].get(run, {}).get(key)
        return fmt.format(scale * value["mean"], scale * value["std"]) if value else "-"

    header = ("| run | source acc. (%) | transfer acc. (%) | feature variance term V | feature covariance term K |\n"
              "|---|---|---|---|---|")
    rows = [f"| {run} | {cell(run, 'source_accuracy')} | {cell(run, 'transfer_accuracy')} | "
            f"{cell(run, 'variance', 1.0, '{:.3g} ± {:.2g}')} | {cell(run, 'covariance', 1.0, '{:.3g} ± {:.2g}')} |"
            for run in summary["runs"]]
    delta = summary.get("paired_delta", {})
    if delta:
        seeds = next(iter(delta.values()))["seeds"]
        per = [" ".join(f"{100 * d:+.1f}" for d in delta[key]["per_seed"]) if key in delta else "-"
               for key in ("source_accuracy", "transfer_accuracy")]
        rows.append(f"| Δ vcreg − baseline, seeds {','.join(seeds)} (pts) | {per[0]} | {per[1]} | | |")
    return "\n".join([header, *rows])


def render(summary: dict) -> str:
    coeffs = summary["vcreg"]
    lines = [
        f"hf_vcreg pretrain: {summary['model']} on {summary['data']} ({summary['train_size']} train / "
        f"{summary['test_size']} test images, {summary['epochs']:g} epochs), transfer: {summary['transfer']}; "
        f"seeds {','.join(summary['seeds'])}; mean ± std over seeds",
        f"VCReg: vcreg_alpha={coeffs['vcreg_alpha']}, vcreg_beta={coeffs['vcreg_beta']} ({coeffs['source']}), "
        f"vcreg_layers={coeffs['vcreg_layers']!r} ({coeffs['layers']} layer{'s' * (coeffs['layers'] != 1)}); baseline: same model and seed, statistics via vcreg_monitor_only",
        "",
        render_table(summary),
        "",
    ]
    if summary.get("reading"):
        lines.append(f"Reading: {summary['reading']} (V, K: lower = more feature variance / less covariance)")
    saved = (f"{len(summary['saved'])} final models in {summary['output_dir']}/<run>-seed<k>/ (from_pretrained loads them)"
             if summary["saved"] else "no models (--save_final_model false)")
    lines.append(f"Wall time {summary['wall_time_s']:.0f} s. Saved: {saved}; this table: "
                 f"{summary['output_dir']}/summary.md, summary.json")
    lines.append(f"Next: {summary['next_step']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main
def build_all(model_args, data_args, config, train, test, num_labels, id2label):
    """Every (seed, run) trainer, built and checked (layers resolved, one forward pass) before any training."""
    from transformers import default_data_collator

    seeds = [s.strip() for s in model_args.seeds.split(",") if s.strip()]
    runs = [r.strip() for r in model_args.runs.split(",") if r.strip()]
    if not seeds or not all(s.isdigit() for s in seeds):
        raise ConfigError(f"--seeds {model_args.seeds!r}: give comma-separated non-negative integers, e.g. 0,1,2.")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown or not runs:
        raise ConfigError(f"--runs {model_args.runs!r}: unknown run(s) {unknown}; use 'baseline', 'vcreg' or both.")
    mix = batch_mixer(data_args, num_labels)
    probe_batch = default_data_collator([train[i] for i in range(min(2, len(train)))])
    trainers = {}
    for seed in seeds:
        for run in runs:
            args = replace(config, seed=int(seed), output_dir=os.path.join(config.output_dir, f"{run}-seed{seed}"),
                           vcreg_monitor_only=True if run == "baseline" else config.vcreg_monitor_only)
            set_seed(int(seed))
            model = build_model(model_args.model_name, num_labels, data_args.image_size, id2label,
                                model_args.drop_path_rate)
            trainer = PretrainTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                      compute_metrics=accuracy, batch_mix=mix)
            for callback in (PrinterCallback, ProgressCallback):  # per-step dicts go to trainer_state.json only
                trainer.remove_callback(callback)
            batch = {k: v.to(trainer.args.device) for k, v in probe_batch.items()}
            bare = not isinstance(trainer.model, transformers.PreTrainedModel)
            try:
                with torch.no_grad():
                    out = trainer.model(batch["pixel_values"]) if bare else trainer.model(**batch)
            except Exception as err:  # a model that cannot take this data: say so before any training
                raise ConfigError(f"--model_name {model_args.model_name!r} failed on a {tuple(batch['pixel_values'].shape)} "
                                  f"batch: {type(err).__name__}: {err}") from err
            logits = out if bare else out.logits
            if logits.shape[-1] != num_labels:
                raise ConfigError(f"--model_name {model_args.model_name!r} returns {logits.shape[-1]} logits for "
                                  f"{num_labels} classes.")
            trainers[(seed, run)] = trainer
    return seeds, runs, trainers


def main(argv: list[str] | None = None) -> dict:
    """The command (``argv``: its arguments); returns the summary. Restores the caller's torch thread count."""
    threads = torch.get_num_threads()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv: list[str]) -> dict:
    start = time.perf_counter()
    try:
        model_args, data_args, config = parse(argv)
    except ValueError as err:  # VCRegConfig / TrainingArguments validation
        return _config_error(err)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()  # one table on the console, nothing else
    torch.set_num_threads(max(1, model_args.torch_threads))
    try:
        if data_args.auto_augment not in ("none", "trivial", "rand"):
            raise ConfigError(f"--auto_augment {data_args.auto_augment!r}: use none, trivial or rand.")
        if data_args.transfer not in ("fine_labels", "digits", "none"):
            raise ConfigError(f"--transfer {data_args.transfer!r}: use fine_labels, digits or none.")
        if data_args.transfer == "fine_labels" and (data_args.dataset_name != "fashion_mnist" or data_args.train_dir):
            raise ConfigError("--transfer fine_labels needs --dataset_name fashion_mnist (its superclasses are "
                              "known); use --transfer digits or none for other data.")
        data = load_data(data_args)
        fine = None
        if data_args.transfer == "fine_labels":  # pretrain on the superclasses; the 10 classes are the target
            data, fine = to_superclasses(data)
        names = data["train"].features["label"].names
        id2label = dict(enumerate(names))
        train = data["train"].with_transform(make_transform(data_args, train=True))
        test = data["test"].with_transform(make_transform(data_args, train=False))
        seeds, runs, trainers = build_all(model_args, data_args, config, train, test, len(names), id2label)
    except (ConfigError, ValueError, KeyError, RuntimeError) as err:
        return _config_error(err)

    transfer = None
    to_pixels = make_transform(replace(data_args, rrc_scale=1.0, hflip=False, auto_augment="none"), train=False)
    if fine is not None:
        probe_rows = stratified_indices(fine["train"], min(len(fine["train"]), PROBE_TRAIN), seed=0)
        transfer = {"train": {"pixel_values": to_pixels(data["train"].select(probe_rows)[:])["pixel_values"],
                              "labels": torch.as_tensor(fine["train"][probe_rows])},
                    "test": {"pixel_values": to_pixels(data["test"][:])["pixel_values"],
                             "labels": torch.as_tensor(fine["test"])}}
    elif data_args.transfer == "digits":
        digits = load_digits_dataset()
        transfer = {split: to_pixels(digits[split][:]) for split in ("train", "test")}

    results: dict[str, dict[str, dict]] = {run: {} for run in runs}
    saved = []
    for seed in seeds:
        for run in runs:
            trainer = trainers[(seed, run)]
            trainer.train()
            metrics = trainer.evaluate()
            trainer.save_state()  # trainer_state.json: every logged step
            model = trainer.model
            row = {"source_accuracy": metrics.get("eval_accuracy"), "variance": metrics.get("eval_vcreg/variance"),
                   "covariance": metrics.get("eval_vcreg/covariance"), "steps": trainer.state.global_step}
            if transfer is not None:
                train_x, test_x = (features(model, transfer[s]["pixel_values"]) for s in ("train", "test"))
                row["transfer_accuracy"] = linear_probe(train_x, transfer["train"]["labels"].numpy(), test_x,
                                                        transfer["test"]["labels"].numpy())
            results[run][seed] = {k: (float(v) if isinstance(v, float) else v) for k, v in row.items()}
            if model_args.save_final_model:
                record_preprocessing(model, data_args.image_size, channels=3, mean=MEAN, std=STD,
                                     interpolation="bilinear", crop_pct=1.0)
                trainer.create_model_card(dataset=_data_name(data_args))
                trainer.save_model()
                saved.append(trainer.args.output_dir)
            with open(os.path.join(trainer.args.output_dir, "eval_results.json"), "w") as f:
                json.dump({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, **row}, f, indent=2)

    first = next(iter(trainers.values()))
    vcreg_trainer = next((t for (s, r), t in trainers.items() if r == "vcreg"), first)
    resolved = vcreg_trainer.vcreg_resolved
    source = ("per-family default for a " + vcreg_trainer.vcreg_family + " model"
              if set(vcreg_trainer.vcreg_recommended) >= {"vcreg_alpha", "vcreg_beta"} else "set by the user" if not vcreg_trainer.vcreg_recommended
              else "partly the per-family default")
    example = saved[-1] if saved else "<output_dir>/vcreg-seed0"
    meta = {
        "model": model_args.model_name, "data": _data_name(data_args), "train_size": len(data["train"]),
        "test_size": len(data["test"]), "epochs": config.num_train_epochs, "seeds": seeds,
        "transfer": TRANSFER_TEXT[data_args.transfer],
        "vcreg": {"vcreg_alpha": resolved["vcreg_alpha"], "vcreg_beta": resolved["vcreg_beta"], "source": source,
                  "vcreg_layers": resolved["vcreg_layers"],
                  "layers": len(vcreg_trainer.vcreg_layer_names), "family": vcreg_trainer.vcreg_family},
        "torch_threads": torch.get_num_threads(), "saved": saved, "output_dir": config.output_dir,
        "next_step": (f"publish: trainer.push_to_hub() or `hf upload <user>/<repo> {example}`; fine-tune: "
                      f"python examples/finetune.py --model_name_or_path {example} --dataset_name sklearn-digits "
                      "--output_dir finetuned --do_train --do_eval --linear_probe"),
    }
    meta["wall_time_s"] = time.perf_counter() - start
    meta["run"] = {"command": shlex.join(["python", "examples/pretrain.py", *argv]), "threads": torch.get_num_threads(),
                   "wall_s": meta["wall_time_s"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "commit": _git_commit()}
    summary = summarise(results, meta)
    text = render(summary)
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(config.output_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return summary


def _git_commit() -> str | None:
    """The short commit of the checkout this script runs from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _data_name(args: DataArguments) -> str:
    if args.train_dir:
        return f"imagefolder {os.path.basename(os.path.normpath(args.train_dir))}"
    return {"fashion_mnist": "Fashion-MNIST", "digits": "scikit-learn digits"}.get(args.dataset_name, args.dataset_name)


def _config_error(err: BaseException):
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"pretrain.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
