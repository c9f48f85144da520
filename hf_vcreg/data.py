"""Offline image data for the examples: scikit-learn's digits and the ``Trainer`` transform.

Loaders return `datasets` objects with the same schema as the Hub's image-classification data sets (an
``image`` column of `datasets.Image()` and a ``label`` column of `datasets.ClassLabel` with names), so the same
pipeline runs on this offline set and on Hub data sets for users online.

- `load_digits_dataset`: scikit-learn's 1797 8x8 handwritten digits (ships inside scikit-learn).
- `with_transforms`: on-the-fly ``pixel_values`` / ``labels`` tensors for `transformers.Trainer`.

The benchmarks' data (Fashion-MNIST, superclasses, long tail, two moons) live in ``benchmarks/evidence/data.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

__all__ = ["DIGITS_NAMES", "load_digits_dataset", "with_transforms"]

DIGITS_NAMES: list[str] = [str(i) for i in range(10)]


DatasetOrDict = TypeVar("DatasetOrDict", Dataset, DatasetDict)


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    """(N, H, W) uint8 grey images and (N,) labels -> Dataset(image: Image(), label: ClassLabel(names))."""
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def load_digits_dataset(split_seed: int = 0, test_size: float = 0.25) -> DatasetDict:
    """scikit-learn's digits (1797 8x8 grey images, 10 classes) as ``DatasetDict(train, test)``.

    Pixel values 0..16 become uint8 ``round(v * 255 / 16)`` in 0..255 (mode "L" PIL images). The split
    is stratified by class and seeded (`sklearn.model_selection.train_test_split` with
    ``random_state=split_seed``); each split keeps the original order of its rows. With the defaults:
    1347 train and 450 test rows.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rows = np.arange(len(labels))
    train, test = train_test_split(rows, test_size=test_size, stratify=labels, random_state=split_seed)
    train, test = np.sort(train), np.sort(test)
    return DatasetDict(
        train=_image_dataset(images[train], labels[train], DIGITS_NAMES),
        test=_image_dataset(images[test], labels[test], DIGITS_NAMES),
    )


def with_transforms(
    dataset: DatasetOrDict,
    image_size: int,
    channels: int = 3,
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    label_column: str = "label",
) -> DatasetOrDict:
    """Return ``dataset.with_transform(...)`` producing ``pixel_values`` and ``labels`` for `transformers.Trainer`.

    Each ``image`` is converted to ``channels`` channels (1: PIL mode "L"; 3: "RGB", grey replicated),
    resized to ``image_size`` x ``image_size`` with bilinear interpolation (skipped if already that
    size), scaled to [0, 1] and normalised per channel:

        pixel_values = (pixel / 255 - mean[ch]) / std[ch]      float32 tensor (channels, H, W)
        labels       = int64 tensor from ``label_column``       (e.g. "fine_label" for a fine probe)

    With the defaults mean = std = 0.5 the values lie in [-1, 1]. Rows come out as dicts of tensors
    that `transformers.default_data_collator` stacks into (B, C, H, W) and (B,). The transform reads
    the ``image`` column, so train with ``TrainingArguments(remove_unused_columns=False)`` (as the
    transformers image-classification example does): otherwise Trainer drops ``image`` first.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB); got {channels}")
    for name, value in (("mean", mean), ("std", std)):
        if np.ndim(value) not in (0, 1) or np.size(value) not in (1, channels):
            raise ValueError(f"{name} must be one float or {channels} floats (one per channel); got {value}")
    mode = "L" if channels == 1 else "RGB"
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)

    def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
        image = image.convert(mode)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), PIL.Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.array(image, dtype=np.uint8)).to(torch.float32) / 255.0
        return array.unsqueeze(0) if channels == 1 else array.permute(2, 0, 1)

    def transform(batch: dict) -> dict:
        pixels = torch.stack([to_tensor(image) for image in batch["image"]])
        return {
            "pixel_values": (pixels - mean_t) / std_t,
            "labels": torch.as_tensor(batch[label_column], dtype=torch.long),
        }

    return dataset.with_transform(transform)
