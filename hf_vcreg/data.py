"""Real image data sets and toy data for the examples and benchmarks, built offline.

Every loader returns `datasets` objects with the same schema as the Hub's image-classification data
sets (an ``image`` column of `datasets.Image()` and a ``label`` column of `datasets.ClassLabel` with
names), so the same pipeline runs on these offline sets and on Hub data sets for users online.

- `load_digits_dataset`: scikit-learn's 1797 8x8 handwritten digits (ships inside scikit-learn).
- `load_fashion_mnist`: the 70k 28x28 Fashion-MNIST images from the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``).
- `coarse_labels`: relabel fine classes into superclasses (hierarchical experiment), with the
  Fashion-MNIST and digits groupings as constants.
- `long_tail`: exponentially imbalanced subset (Cao et al. 2019), for the long-tail experiment.
- `two_moons`, `two_moons_separable`: 2-D toy data for the gradient-starvation experiment.
- `with_transforms`: on-the-fly ``pixel_values`` / ``labels`` tensors for `transformers.Trainer`.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import PIL.Image
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from datasets import Sequence as SequenceFeature

__all__ = [
    "DIGITS_COARSE",
    "DIGITS_COARSE_NAMES",
    "DIGITS_NAMES",
    "FASHION_MNIST_COARSE",
    "FASHION_MNIST_COARSE_NAMES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_ROOT",
    "coarse_labels",
    "load_digits_dataset",
    "load_fashion_mnist",
    "long_tail",
    "long_tail_counts",
    "read_idx",
    "two_moons",
    "two_moons_separable",
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

FASHION_MNIST_COARSE_NAMES: list[str] = ["tops", "bottoms_and_dresses", "footwear", "bags"]
FASHION_MNIST_COARSE: dict[int, int] = {
    0: 0, 2: 0, 4: 0, 6: 0,  # T-shirt/top, Pullover, Coat, Shirt -> tops
    1: 1, 3: 1,  # Trouser, Dress -> bottoms_and_dresses
    5: 2, 7: 2, 9: 2,  # Sandal, Sneaker, Ankle boot -> footwear
    8: 3,  # Bag -> bags
}
"""Fine Fashion-MNIST label -> superclass index into `FASHION_MNIST_COARSE_NAMES`."""

DIGITS_COARSE_NAMES: list[str] = ["closed_loops", "straight_strokes", "open_curves"]
DIGITS_COARSE: dict[int, int] = {
    0: 0, 6: 0, 8: 0, 9: 0,  # digits drawn with a closed loop
    1: 1, 4: 1, 7: 1,  # digits drawn with straight strokes
    2: 2, 3: 2, 5: 2,  # digits drawn with open curves
}
"""Fine digit -> superclass index into `DIGITS_COARSE_NAMES`, grouped by stroke shape (our choice:
no standard hierarchy exists for digits; each superclass mixes 3-4 visually distinct digits)."""

DatasetOrDict = TypeVar("DatasetOrDict", Dataset, DatasetDict)


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> Dataset:
    """(N, H, W) uint8 grey images and (N,) labels -> Dataset(image: Image(), label: ClassLabel(names))."""
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """Raw values of one column as a numpy array (ignores any transform set on the dataset)."""
    return np.asarray(dataset.with_format("numpy")[name][:])


def _stratified_indices(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified subsample of ``size`` rows (all rows if size is None or >= N)."""
    if size is None or size >= len(labels):
        return np.arange(len(labels))
    num_classes = len(np.unique(labels))
    if size < num_classes:
        raise ValueError(f"a stratified subsample needs one row per class: size {size} < {num_classes} classes")
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


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


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Fashion-MNIST (60000 train, 10000 test 28x28 grey images, 10 classes) from local IDX files.

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``) under ``root``. ``max_train`` / ``max_test``
    keep a seeded stratified subsample of that many rows (`train_test_split` with
    ``random_state=seed``, rows in original order); None keeps the whole split. Class names are
    `FASHION_MNIST_NAMES`. Building the full set (PNG-encoding 70k images) takes a few seconds.
    Raises FileNotFoundError naming the missing file and the ``apt-get install`` fix.
    """
    root = Path(root)
    limits = {"train": max_train, "test": max_test}
    splits = {}
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        images = read_idx(_find_idx(root, image_name))
        labels = read_idx(_find_idx(root, label_name)).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images of shape {images.shape} do not match {len(labels)} labels")
        keep = _stratified_indices(labels, limits[split], seed)
        splits[split] = _image_dataset(images[keep], labels[keep], FASHION_MNIST_NAMES)
    return DatasetDict(splits)


def coarse_labels(
    dataset: DatasetOrDict, mapping: Mapping[int, int] | Sequence[int], names: Sequence[str]
) -> DatasetOrDict:
    """Relabel fine classes into superclasses: ``label`` becomes ``mapping[fine]``, ``fine_label`` keeps the fine one.

    ``mapping[c]`` is the superclass index (into ``names``) of fine class ``c``; it must cover every
    fine class of the ``label`` ClassLabel and use every superclass. The new ``label`` is a
    ``ClassLabel(names=names)``; ``fine_label`` keeps the original ClassLabel (and its names).
    A `DatasetDict` is relabelled split by split. Example: ``coarse_labels(ds, FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_NAMES)``.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: coarse_labels(part, mapping, names) for split, part in dataset.items()})
    fine_feature = dataset.features["label"]
    if not isinstance(fine_feature, ClassLabel):
        raise ValueError(f"coarse_labels needs a ClassLabel 'label' column; got {fine_feature}")
    if "fine_label" in dataset.column_names:
        raise ValueError("dataset already has a 'fine_label' column: is it already coarse-labelled?")
    num_fine = fine_feature.num_classes
    covered = mapping if isinstance(mapping, Mapping) else range(len(mapping))
    missing = [c for c in range(num_fine) if c not in covered]
    if missing:
        missing_names = [fine_feature.int2str(c) for c in missing]
        raise ValueError(f"mapping has no superclass for fine classes {missing} ({missing_names})")
    lookup = np.array([mapping[c] for c in range(num_fine)], dtype=np.int64)
    bad = sorted(set(lookup.tolist()) - set(range(len(names))))
    if bad:
        raise ValueError(f"mapping uses superclass indices {bad} outside 0..{len(names) - 1} ({len(names)} names)")
    unused = sorted(set(range(len(names))) - set(lookup.tolist()))
    if unused:
        raise ValueError(f"superclasses {[names[c] for c in unused]} receive no fine class in mapping")
    coarse = lookup[_column(dataset, "label")]
    relabelled = dataset.rename_column("label", "fine_label")
    return relabelled.add_column("label", coarse.tolist(), feature=ClassLabel(names=list(names)))


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float = 100.0) -> list[int]:
    """Per-class sizes of the exponential long-tail profile of Cao et al. 2019 (LDAM-DRW):

        n_c = floor(n_max * (1 / imbalance_ratio) ** (c / (K - 1))),   c = 0 .. K-1,

    so class 0 keeps n_max rows and class K-1 keeps n_max / imbalance_ratio. Computed exactly as
    their CIFAR-LT code does (CIFAR-10-LT, ratio 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50).
    """
    if num_classes < 2:
        raise ValueError(f"a long-tail profile needs at least 2 classes; got {num_classes}")
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (n_max / n_min); got {imbalance_ratio}")
    factor = 1.0 / imbalance_ratio
    counts = [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]
    if min(counts) < 1:
        raise ValueError(f"imbalance_ratio {imbalance_ratio} leaves classes empty with n_max {n_max}: counts {counts}")
    return counts


def long_tail(dataset: Dataset, imbalance_ratio: float = 100.0, seed: int = 0, n_max: int | None = None) -> Dataset:
    """Seeded long-tailed subset: class c keeps ``long_tail_counts(n_max, K, imbalance_ratio)[c]`` rows.

    Class order is the label index (class 0 is the head, class K-1 the tail). ``n_max`` defaults to
    the size of the smallest class, so that every class can supply its count. Rows of each class are
    drawn without replacement with ``numpy.random.default_rng(seed)``; the subset keeps the original
    row order.
    """
    num_classes = dataset.features["label"].num_classes
    labels = _column(dataset, "label")
    available = np.bincount(labels, minlength=num_classes)
    n_max = int(available.min()) if n_max is None else n_max
    counts = long_tail_counts(n_max, num_classes, imbalance_ratio)
    short = [c for c in range(num_classes) if counts[c] > available[c]]
    if short:
        raise ValueError(f"classes {short} have {available[short].tolist()} rows, fewer than the profile's {counts}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=counts[c], replace=False) for c in range(num_classes)]
    return dataset.select(np.sort(np.concatenate(chosen)))


def _points_dataset(points: np.ndarray, labels: np.ndarray) -> Dataset:
    """(N, 2) float points and (N,) 0/1 labels -> Dataset(x: 2 float32, label: ClassLabel(moon_0, moon_1))."""
    features = Features(
        {"x": SequenceFeature(Value("float32"), length=2), "label": ClassLabel(names=["moon_0", "moon_1"])}
    )
    columns = {"x": points.astype(np.float32).tolist(), "label": labels.astype(np.int64)}
    return Dataset.from_dict(columns, features=features)


def two_moons(n: int = 1000, noise: float = 0.1, seed: int = 0) -> Dataset:
    """Two interleaving half circles in 2-D: ``sklearn.datasets.make_moons(n, noise=noise, random_state=seed)``.

    Columns: ``x`` (2 float32 coordinates) and ``label`` (ClassLabel moon_0 / moon_1). Not linearly
    separable: a network must learn the curved boundary.
    """
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=n, noise=noise, random_state=seed)
    return _points_dataset(points, labels)


def two_moons_separable(n: int = 300, noise: float = 0.1, margin: float = 0.1, seed: int = 0) -> Dataset:
    """Two moons made linearly separable along one coordinate, the gradient-starvation setting of
    Pezeshki et al. 2021 (Fig. 1; same construction as their public code, n = 300, noise = 0.1).

    With (u, y) = make_moons(n, noise=noise, random_state=seed) and s = 2y - 1 in {-1, +1}:

        a = u_1 - 0.5                        (centre the moons horizontally)
        b = u_2 - 0.3 s;  b = b - mean(b)    (pull the moons together vertically, centre)
        b = -s * (|b| + margin)              (fold class y=1 onto b <= -margin, class y=0 onto b >= margin)
        x = (b, a)                           (swap, so the separable coordinate comes first)

    So x_0 alone separates the classes (the line x_0 = 0 with margin ``margin``: the "dominant",
    linearly separable feature) while x_1 keeps the curved moon structure. Networks trained with
    cross-entropy learn an almost vertical boundary from x_0 and ignore x_1: gradient starvation.
    A negative margin makes the classes overlap by |margin| along x_0 instead. Columns as `two_moons`.
    """
    from sklearn.datasets import make_moons

    points, labels = make_moons(n_samples=n, noise=noise, random_state=seed)
    sign = 2.0 * labels - 1.0
    a = points[:, 0] - 0.5
    b = points[:, 1] - 0.3 * sign
    b = b - b.mean()
    b = -sign * (np.abs(b) + margin)
    return _points_dataset(np.stack([b, a], axis=1), labels)


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
