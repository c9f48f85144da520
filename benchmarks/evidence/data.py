"""The evidence protocol's data, built offline: Fashion-MNIST (source), scikit-learn digits (target), two moons.

Builders that return `datasets` objects (Hub schema: an ``image`` column of `datasets.Image()`, a ``label``
column of `datasets.ClassLabel`), as :mod:`examples.offline_data` does for the examples:

- `load_fashion_mnist`: the 70k 28x28 Fashion-MNIST images from the IDX files of the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``).
- `coarse_labels`: relabel fine classes into superclasses, with the Fashion-MNIST and digits groupings.
- `long_tail`: exponentially imbalanced subset (Cao et al. 2019).
- `two_moons`, `two_moons_separable`: 2-D toy data for the gradient-starvation experiment.

The protocol itself works on tensors (decoding 70k PNG-encoded rows would cost about a minute per process):
`protocol_data` reads the IDX arrays once and returns the fixed splits of :class:`ProtocolData`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Sequence as SequenceFeature

from examples.offline_data import (  # the one offline Fashion-MNIST / digits reader, shared with the examples
    FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_NAMES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_NAMES,
    FASHION_MNIST_ROOT,
    DatasetOrDict,
    fashion_mnist_arrays,
    load_digits_dataset,
    load_fashion_mnist,
    read_idx,
    stratified_indices,
    stratified_split,
    with_transforms,
)

__all__ = [
    "DIGITS_COARSE",
    "DIGITS_COARSE_NAMES",
    "FASHION_MNIST_COARSE",
    "FASHION_MNIST_COARSE_NAMES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_ROOT",
    "ProtocolData",
    "Split",
    "coarse_labels",
    "coarse_lookup",
    "fashion_mnist_arrays",
    "load_fashion_mnist",
    "long_tail",
    "long_tail_counts",
    "long_tail_indices",
    "protocol_data",
    "read_idx",
    "stratified_indices",
    "stratified_split",
    "two_moons",
    "two_moons_separable",
]

DIGITS_COARSE_NAMES: list[str] = ["closed_loops", "straight_strokes", "open_curves"]
DIGITS_COARSE: dict[int, int] = {
    0: 0, 6: 0, 8: 0, 9: 0,  # digits drawn with a closed loop
    1: 1, 4: 1, 7: 1,  # digits drawn with straight strokes
    2: 2, 3: 2, 5: 2,  # digits drawn with open curves
}
"""Fine digit -> superclass index into `DIGITS_COARSE_NAMES`, grouped by stroke shape (our choice:
no standard hierarchy exists for digits; each superclass mixes 3-4 visually distinct digits)."""


# ---------------------------------------------------------------------------------------------- superclasses
def _column(dataset: Dataset, name: str) -> np.ndarray:
    """Raw values of one column as a numpy array (ignores any transform set on the dataset)."""
    return np.asarray(dataset.with_format("numpy")[name][:])


def coarse_lookup(
    mapping: Mapping[int, int] | Sequence[int], fine_names: Sequence[str], names: Sequence[str]
) -> np.ndarray:
    """``lookup[c]`` = superclass index (into ``names``) of fine class ``c`` (int64, one per ``fine_names``).

    Checked: ``mapping`` covers every fine class, uses only indices into ``names`` and gives every superclass
    at least one fine class; ValueError naming the offending classes otherwise.
    """
    covered = mapping if isinstance(mapping, Mapping) else range(len(mapping))
    missing = [c for c in range(len(fine_names)) if c not in covered]
    if missing:
        raise ValueError(f"mapping has no superclass for fine classes {missing} ({[fine_names[c] for c in missing]})")
    lookup = np.array([mapping[c] for c in range(len(fine_names))], dtype=np.int64)
    bad = sorted(set(lookup.tolist()) - set(range(len(names))))
    if bad:
        raise ValueError(f"mapping uses superclass indices {bad} outside 0..{len(names) - 1} ({len(names)} names)")
    unused = sorted(set(range(len(names))) - set(lookup.tolist()))
    if unused:
        raise ValueError(f"superclasses {[names[c] for c in unused]} receive no fine class in mapping")
    return lookup


def coarse_labels(
    dataset: DatasetOrDict, mapping: Mapping[int, int] | Sequence[int], names: Sequence[str]
) -> DatasetOrDict:
    """Relabel fine classes into superclasses: ``label`` becomes ``mapping[fine]``, ``fine_label`` keeps the fine one.

    ``mapping[c]`` is the superclass index (into ``names``) of fine class ``c``; it must cover every
    fine class of the ``label`` ClassLabel and use every superclass (`coarse_lookup`). The new ``label`` is a
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
    lookup = coarse_lookup(mapping, fine_feature.names, names)
    coarse = lookup[_column(dataset, "label")]
    relabelled = dataset.rename_column("label", "fine_label")
    return relabelled.add_column("label", coarse.tolist(), feature=ClassLabel(names=list(names)))


# ---------------------------------------------------------------------------------------------- long tail
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


def long_tail_indices(
    labels: np.ndarray, num_classes: int, imbalance_ratio: float = 100.0, seed: int = 0, n_max: int | None = None
) -> np.ndarray:
    """Sorted row indices of a seeded long-tailed subset: class c keeps ``long_tail_counts(n_max, K, ratio)[c]``
    rows, drawn without replacement with ``numpy.random.default_rng(seed)``. Class 0 is the head, class K-1
    the tail; ``n_max`` defaults to the size of the smallest class."""
    available = np.bincount(labels, minlength=num_classes)
    n_max = int(available.min()) if n_max is None else n_max
    counts = long_tail_counts(n_max, num_classes, imbalance_ratio)
    short = [c for c in range(num_classes) if counts[c] > available[c]]
    if short:
        raise ValueError(f"classes {short} have {available[short].tolist()} rows, fewer than the profile's {counts}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=counts[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def long_tail(dataset: Dataset, imbalance_ratio: float = 100.0, seed: int = 0, n_max: int | None = None) -> Dataset:
    """Seeded long-tailed subset of a Dataset (`long_tail_indices` of its ``label`` column); keeps row order."""
    num_classes = dataset.features["label"].num_classes
    return dataset.select(long_tail_indices(_column(dataset, "label"), num_classes, imbalance_ratio, seed, n_max))


# ---------------------------------------------------------------------------------------------- two moons
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


# ---------------------------------------------------------------------------------------------- protocol splits
MEAN = STD = 0.5
"""Pixel normalisation ``(pixel / 255 - MEAN) / STD`` in [-1, 1]: the defaults of `examples.offline_data.with_transforms`."""


@dataclass(frozen=True)
class Split:
    """Images as a float32 ``(N, 1, 28, 28)`` tensor normalised to [-1, 1] and their int64 ``(N,)`` labels."""

    x: torch.Tensor
    y: torch.Tensor

    def take(self, rows: np.ndarray) -> "Split":
        index = torch.as_tensor(rows, dtype=torch.long)
        return Split(self.x[index], self.y[index])

    def __len__(self) -> int:
        return len(self.y)


def _normalised(images: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 ``(pixel / 255 - MEAN) / STD``."""
    return ((torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0 - MEAN) / STD).unsqueeze(1)


@dataclass(frozen=True)
class ProtocolData:
    """The fixed splits of the evidence protocol.

    - ``pool``: the pretraining pool, the 60k Fashion-MNIST training images minus ``val``;
    - ``val``: a stratified held-out validation set of the training images (seed ``split_seed``): every choice
      (coefficients, placement) is made on it;
    - ``test``: the Fashion-MNIST test split (or a stratified subset of it, for tests): reported for the chosen
      settings only;
    - ``digits_train`` / ``digits_val`` / ``digits_test``: scikit-learn digits upsampled to 28x28 (bilinear,
      `examples.offline_data.with_transforms`, same normalisation), stratified 50 / 25 / 25 % (seed ``split_seed``):
      the cross-domain probe trains on the first and is scored on the other two.
    """

    pool: Split
    val: Split
    test: Split
    digits_train: Split
    digits_val: Split
    digits_test: Split


def _digits_splits(seed: int) -> tuple[Split, Split, Split]:
    """Digits probe-train / val / test (50 / 25 / 25 %, stratified, seeded), as 28x28 normalised tensors."""
    halves = load_digits_dataset(split_seed=seed, test_size=0.5)
    rest = halves["test"]
    val_rows, test_rows = stratified_split(_column(rest, "label"), len(rest) // 2, seed)
    out = []
    for part in (halves["train"], rest.select(val_rows), rest.select(test_rows)):
        rows = with_transforms(part, image_size=28, channels=1, mean=MEAN, std=STD)[:]
        out.append(Split(rows["pixel_values"].contiguous(), rows["labels"]))
    return tuple(out)


def protocol_data(
    val_size: int = 10_000, test_size: int | None = None, split_seed: int = 0, root: str | Path = FASHION_MNIST_ROOT
) -> ProtocolData:
    """Build :class:`ProtocolData`: ``val_size`` stratified validation images held out of the training split
    (`stratified_split`; the rest is the pool), the test split (a stratified ``test_size`` subset if given), the
    digits splits."""
    arrays = fashion_mnist_arrays(root)
    images, labels = arrays["train"]
    val_rows, pool_rows = stratified_split(labels, val_size, split_seed)
    test_images, test_labels = arrays["test"]
    test_rows = stratified_indices(test_labels, test_size, split_seed)
    digits = _digits_splits(split_seed)
    return ProtocolData(
        pool=Split(_normalised(images[pool_rows]), torch.from_numpy(labels[pool_rows])),
        val=Split(_normalised(images[val_rows]), torch.from_numpy(labels[val_rows])),
        test=Split(_normalised(test_images[test_rows]), torch.from_numpy(test_labels[test_rows])),
        digits_train=digits[0],
        digits_val=digits[1],
        digits_test=digits[2],
    )
