#!/usr/bin/env python
"""Supervised pretraining with VCReg on any ``transformers`` or ``timm`` image model and any ``datasets`` image set.

Runs a baseline (plain supervised training through the same trainer, vcreg_alpha = vcreg_beta = 0) and a
VCReg model on the same data, schedule and seed, and prints both results. With no arguments it trains a small
ViT on scikit-learn's digits (ships with the install, no download) on CPU in a few minutes:

    python examples/pretrain.py

Other data and models:

    # a Hub data set (online) and a timm model
    python examples/pretrain.py --dataset_name fashion_mnist --model_name timm:resnet18 --image_size 32
    # a local folder of class sub-folders
    python examples/pretrain.py --train_dir path/to/images --model_name vit --output_dir out
    # any VCRegConfig / TrainingArguments field, e.g.
    python examples/pretrain.py --vcreg_alpha 0.5 --vcreg_layers last --num_train_epochs 10 --runs vcreg

``--model_name`` is ``vit`` or ``resnet`` (small transformers models built from a config), ``timm:<arch>``
(a timm architecture, randomly initialised), or a local path / Hub id of a transformers checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import AutoConfig, AutoModelForImageClassification, HfArgumentParser, set_seed

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.data import load_digits_dataset, with_transforms

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub image-classification data set (online). Default: scikit-learn digits."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "An `imagefolder` directory (class sub-folders)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    image_size: int = field(default=32, metadata={"help": "Images are resized to image_size x image_size."})
    test_size: float = field(default=0.25, metadata={"help": "Held-out fraction when the data has no test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})


@dataclass
class ModelArguments:
    model_name: str = field(
        default="vit",
        metadata={"help": "'vit' or 'resnet' (small transformers models), 'timm:<arch>', or a transformers checkpoint."},
    )
    runs: str = field(default="baseline,vcreg", metadata={"help": "Which runs: 'baseline', 'vcreg' or both."})


def load_data(args: DataArguments) -> DatasetDict:
    if args.dataset_name:
        data = load_dataset(args.dataset_name)
    elif args.train_dir:
        data = load_dataset("imagefolder", data_dir=args.train_dir)
    else:
        return load_digits_dataset()
    if "test" not in data:
        data = data["train"].train_test_split(test_size=args.test_size, seed=0, stratify_by_column=args.label_column)
    if args.image_column != "image":
        data = data.rename_column(args.image_column, "image")
    if args.label_column != "label":
        data = data.rename_column(args.label_column, "label")
    return data


def build_model(name: str, num_labels: int, image_size: int, id2label: dict[int, str]):
    label2id = {v: k for k, v in id2label.items()}
    if name == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            image_size=image_size, patch_size=4, num_labels=num_labels, id2label=id2label, label2id=label2id,
        )
        return transformers.ViTForImageClassification(cfg)
    if name == "resnet":
        cfg = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
            num_labels=num_labels, id2label=id2label, label2id=label2id,
        )
        return transformers.ResNetForImageClassification(cfg)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[len("timm:") :], num_classes=num_labels)
    config = AutoConfig.from_pretrained(name, num_labels=num_labels, id2label=id2label, label2id=label2id)
    return AutoModelForImageClassification.from_pretrained(name, config=config, ignore_mismatched_sizes=True)


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = HfArgumentParser((ModelArguments, DataArguments, VCRegConfig))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, config = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        defaults = {
            "output_dir": "outputs/pretrain", "num_train_epochs": 15, "per_device_train_batch_size": 64,
            "learning_rate": 3e-3, "eval_strategy": "epoch", "save_strategy": "no", "logging_steps": 10,
            "report_to": "none", "remove_unused_columns": False, "disable_tqdm": True, "seed": 0,
        }
        given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
        argv = [x for k, v in defaults.items() if k not in given for x in (f"--{k}", str(v))] + argv
        model_args, data_args, config = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    runs = [r.strip() for r in model_args.runs.split(",") if r.strip()]
    unknown = set(runs) - {"baseline", "vcreg"}
    if unknown:
        raise ValueError(f"--runs {model_args.runs!r}: unknown run(s) {sorted(unknown)}; use 'baseline', 'vcreg' or both.")

    data = load_data(data_args)
    if data_args.max_train_samples is not None:
        data["train"] = data["train"].select(range(min(data_args.max_train_samples, len(data["train"]))))
    names = data["train"].features["label"].names
    id2label = dict(enumerate(names))
    train = with_transforms(data["train"], data_args.image_size, channels=3)
    test = with_transforms(data["test"], data_args.image_size, channels=3)

    results = {}
    for run in runs:
        args = config if run == "vcreg" else replace(config, vcreg_alpha=0.0, vcreg_beta=0.0)
        args = replace(args, output_dir=os.path.join(config.output_dir, run))
        set_seed(args.seed)
        model = build_model(model_args.model_name, len(names), data_args.image_size, id2label)
        trainer = VCRegTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy)
        trainer.train()
        metrics = trainer.evaluate()
        results[run] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if args.save_strategy != "no" or args.push_to_hub:
            trainer.save_model()
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results[run], f, indent=2)

    print(f"\nmodel={model_args.model_name} data={data_args.dataset_name or data_args.train_dir or 'digits'} seed={config.seed}")
    columns = ["eval_accuracy", "eval_task_loss", "eval_vcreg/variance", "eval_vcreg/covariance"]
    print("run       " + "".join(f"{c:>24}" for c in columns))
    for run, m in results.items():
        print(f"{run:<10}" + "".join(f"{m[c]:>24.4f}" if c in m else f"{'-':>24}" for c in columns))
    return results


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    main()
