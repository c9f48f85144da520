#!/usr/bin/env python
"""Fine-tune (or linear-probe) a published image classifier, e.g. a VCReg-pretrained checkpoint.

Written in the conventions of transformers' ``examples/pytorch/image-classification/run_image_classification.py``
and loading the model exactly as it does (``AutoConfig`` with the new labels, ``AutoModelForImageClassification``
with ``ignore_mismatched_sizes=True``, ``AutoImageProcessor``), so it takes any checkpoint that script takes:
transformers models, and timm models through ``TimmWrapperForImageClassification``. hf_vcreg is NOT needed.

Data: ``--dataset_name`` (a Hub data set, or ``sklearn-digits``: scikit-learn's 1797 8x8 digits, offline) or
``--train_dir``/``--validation_dir`` (``imagefolder`` folders). Without a validation split, ``--train_val_split``
of the training set is held out.

Metric: accuracy, ``mean(predictions == labels)`` in numpy.

``--linear_probe``: the backbone is frozen (no gradient, and kept in eval mode so BatchNorm statistics and
dropout stay fixed); only the classification head is trained (``classifier``, or timm's ``get_classifier()``).

Example (offline)::

    python examples/finetune.py --model_name_or_path <repo or folder> --dataset_name sklearn-digits \\
        --output_dir finetuned --do_train --do_eval --max_steps 50 --linear_probe
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub repo id or local folder of the pretrained checkpoint."})
    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one / HF_TOKEN)."})
    linear_probe: bool = field(
        default=False, metadata={"help": "Freeze the backbone (eval mode) and train only the classification head."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True, metadata={"help": "Re-initialise the head when its number of classes differs (new labels)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub data set name, or 'sklearn-digits' for the offline digits set."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder directory of training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder directory for evaluation."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the integer labels."})
    train_val_split: float = field(default=0.15, metadata={"help": "Held-out fraction when there is no validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("Give --dataset_name (a Hub data set or 'sklearn-digits') or --train_dir (imagefolder).")


def load_sklearn_digits() -> DatasetDict:
    """scikit-learn's digits (8x8 grey, pixel values 0..16 scaled to 0..255) as one ``train`` split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return DatasetDict(train=Dataset.from_dict({"image": list(images), "label": digits.target}, features=features))


def load_data(data_args: DataTrainingArguments, seed: int) -> DatasetDict:
    if data_args.dataset_name == "sklearn-digits":
        dataset = load_sklearn_digits()
    elif data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        dirs = {"train": data_args.train_dir, "validation": data_args.validation_dir}
        dataset = DatasetDict(
            {split: load_dataset("imagefolder", data_dir=path, split="train") for split, path in dirs.items() if path}
        )
    if "validation" not in dataset:
        evaluation = "test" if "test" in dataset else None
        if evaluation is None:
            split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed,
                                                      stratify_by_column=data_args.label_column_name)
            dataset = DatasetDict(train=split["train"], validation=split["test"])
        else:
            dataset["validation"] = dataset.pop(evaluation)
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset["train"].column_names:
            raise ValueError(f"Column {column!r} not in the data set ({dataset['train'].column_names}); set "
                             "--image_column_name / --label_column_name.")
    return dataset


def load_accuracy():
    """``compute_metrics`` for the Trainer: ``{"accuracy": mean(argmax(logits) == labels)}``."""
    return lambda p: {"accuracy": float(np.mean(np.argmax(p.predictions, axis=1) == p.label_ids))}


def classification_head(model: nn.Module) -> nn.Module:
    """The module that maps features to class logits (``classifier``, or timm's ``get_classifier()``)."""
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        return timm_model.get_classifier()
    head = getattr(model, "classifier", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"--linear_probe: {type(model).__name__} has no `classifier` module; fine-tune it fully.")
    return head


def freeze_backbone(model: nn.Module) -> list[str]:
    """Freeze every parameter outside the head and keep those modules in eval mode; return the trained names."""
    head = classification_head(model)
    head_params = {id(p) for p in head.parameters()}
    for param in model.parameters():
        param.requires_grad = id(param) in head_params
    head_modules = {id(m) for m in head.modules()}
    # every module that neither is part of the head nor contains it (BatchNorm, dropout, ...)
    frozen = [m for m in model.modules() if not any(id(x) in head_modules for x in m.modules())]
    original_train = model.train

    def train(mode: bool = True):  # NOTE: Trainer calls model.train() every step; the backbone must stay frozen
        original_train(mode)
        for module in frozen:
            module.eval()
        return model

    model.train = train
    return [name for name, p in model.named_parameters() if p.requires_grad]


def make_transform(image_processor, image_column: str = "image", label_column: str = "label"):
    """``with_transform`` function: images -> ``pixel_values`` by the checkpoint's own saved preprocessing.

    ``image_processor`` is ``AutoImageProcessor.from_pretrained(<checkpoint>)``: the ``preprocessor_config.json``
    (transformers) or the timm ``pretrained_cfg`` (``TimmWrapperImageProcessor``) written with the checkpoint, so
    a model pretrained at 28x28 with mean/std 0.5 is fine-tuned on exactly that (hf_vcreg's
    ``record_preprocessing``).
    """

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column])}

    return transform


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run with ``argv`` (default: ``sys.argv[1:]``; one ``.json`` file = a config); return the eval metrics."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    dataset = load_data(data_args, training_args.seed)
    names = dataset["train"].features[data_args.label_column_name].names
    label2id, id2label = {n: i for i, n in enumerate(names)}, dict(enumerate(names))

    # Exactly as run_image_classification.py loads a checkpoint.
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, num_labels=len(names), label2id=label2id, id2label=id2label,
        finetuning_task="image-classification", revision=model_args.revision, token=model_args.token,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, revision=model_args.revision, token=model_args.token,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.model_name_or_path, revision=model_args.revision, token=model_args.token
    )
    if model_args.linear_probe:
        trained = freeze_backbone(model)
        logger.info("linear probe: training %d tensors (%s), backbone frozen", len(trained), ", ".join(trained))

    transform = make_transform(image_processor, data_args.image_column_name, data_args.label_column_name)

    train_set, eval_set = dataset["train"], dataset["validation"]
    if data_args.max_train_samples is not None:
        train_set = train_set.shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(data_args.max_eval_samples, len(eval_set))))
    training_args.remove_unused_columns = False  # the transform reads the image column

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set.with_transform(transform) if training_args.do_train else None,
        eval_dataset=eval_set.with_transform(transform) if training_args.do_eval else None,
        compute_metrics=load_accuracy(),
        processing_class=image_processor,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    metrics: dict[str, float] = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification",
              "dataset": data_args.dataset_name, "tags": ["image-classification", "vision"]}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    return metrics


if __name__ == "__main__":
    main()
