"""Offline image data for the examples and benchmarks: Fashion-MNIST (Debian package), scikit-learn's digits and
the ``Trainer`` transform. Not part of the ``hf_vcreg`` package: the library takes any `datasets` data.

Loaders return `datasets` objects with the same schema as the Hub's image-classification data sets (an
``image`` column of `datasets.Image()` and a ``label`` column of `datasets.ClassLabel` with names), so the same
pipeline runs on this offline set and on Hub data sets for users online.

- `load_fashion_mnist` / `fashion_mnist_arrays` / `read_idx`: the 70k 28x28 Fashion-MNIST images from the IDX
  files of the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``); no download.
- `load_digits_dataset`: scikit-learn's 1797 8x8 handwritten digits (ships inside scikit-learn).
- `with_transforms`: on-the-fly ``pixel_values`` / ``labels`` tensors for `transformers.Trainer`.

The benchmarks' other data (superclasses, long tail, two moons, the protocol splits) live in
``benchmarks/evidence/data.py``, which reads Fashion-MNIST through this module.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

__all__ = [
    "DIGITS_NAMES",
    "FASHION_MNIST_COARSE",
    "FASHION_MNIST_COARSE_NAMES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_ROOT",
    "fashion_mnist_arrays",
    "load_digits_dataset",
    "load_fashion_mnist",
    "read_idx",
    "stratified_indices",
    "stratified_split",
    "with_transforms",
]

DIGITS_NAMES: list[str] = [str(i) for i in range(10)]


FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four gzipped IDX files."""

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""(images, labels) IDX file names per split, without the optional ``.gz`` suffix."""

FASHION_MNIST_NAMES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
"""Class names in label order, as in the Hub's ``fashion_mnist`` data set."""

DatasetOrDict = TypeVar("DatasetOrDict", Dataset, DatasetDict)

FASHION_MNIST_COARSE_NAMES: list[str] = ["tops", "bottoms_and_dresses", "footwear", "bags"]
FASHION_MNIST_COARSE: dict[int, int] = {
    0: 0, 2: 0, 4: 0, 6: 0,  # T-shirt/top, Pullover, Coat, Shirt -> tops
    1: 1, 3: 1,  # Trouser, Dress -> bottoms_and_dresses
    5: 2, 7: 2, 9: 2,  # Sandal, Sneaker, Ankle boot -> footwear
    8: 3,  # Bag -> bags
}
"""Fine Fashion-MNIST label -> superclass index into `FASHION_MNIST_COARSE_NAMES`."""


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


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if the name ends in ``.gz``) into a numpy array.

    Format (LeCun's MNIST format): big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim``
    uint32 sizes, then the data; only type 0x08 (unsigned byte) is used by (Fashion-)MNIST.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zeros, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zeros != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic bytes {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _find_idx(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists; FileNotFoundError with the install fix otherwise."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / name}[.gz]. Install the Debian package with "
        f"`apt-get install dataset-fashion-mnist` (it puts the IDX files in {FASHION_MNIST_ROOT}), "
        f"or pass root=<folder holding {name}[.gz]>."
    )


def fashion_mnist_arrays(root: str | Path = FASHION_MNIST_ROOT) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}``: (N, 28, 28) uint8 and (N,) int64 arrays.

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``) under ``root``. Raises FileNotFoundError naming the
    missing file and the ``apt-get install`` fix.
    """
    root = Path(root)
    arrays = {}
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        images = read_idx(_find_idx(root, image_name))
        labels = read_idx(_find_idx(root, label_name)).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images of shape {images.shape} do not match {len(labels)} labels")
        arrays[split] = (images, labels)
    return arrays


def stratified_split(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen, rest)``: a seeded stratified sample of ``size`` rows of ``range(len(labels))``
    (`sklearn.model_selection.train_test_split` with ``random_state=seed``) and the other rows, both sorted."""
    num_classes = len(np.unique(labels))
    if size < num_classes:
        raise ValueError(f"a stratified subsample needs one row per class: size {size} < {num_classes} classes")
    from sklearn.model_selection import train_test_split

    chosen, rest = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen), np.sort(rest)


def stratified_indices(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified subsample of ``size`` rows (all rows if size is None or >= N)."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    return stratified_split(labels, size, seed)[0]


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Fashion-MNIST (60000 train, 10000 test 28x28 grey images, 10 classes) from local IDX files.

    The arrays of `fashion_mnist_arrays` as a ``DatasetDict(train, test)``. ``max_train`` / ``max_test``
    keep a seeded stratified subsample of that many rows (`train_test_split` with ``random_state=seed``,
    rows in original order); None keeps the whole split. Class names are `FASHION_MNIST_NAMES`. Building
    the full set (PNG-encoding 70k images) takes a few seconds.
    """
    limits = {"train": max_train, "test": max_test}
    splits = {}
    for split, (images, labels) in fashion_mnist_arrays(root).items():
        keep = stratified_indices(labels, limits[split], seed)
        splits[split] = _image_dataset(images[keep], labels[keep], FASHION_MNIST_NAMES)
    return DatasetDict(splits)


# ---------------------------------------------------------------------------------------------- Trainer transform
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
