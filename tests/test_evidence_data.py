"""Benchmark data (benchmarks/evidence/data.py): Fashion-MNIST IDX files, superclasses, long tail, two moons,
and the protocol's fixed splits."""

import gzip
import struct

import numpy as np
import pytest
from datasets import ClassLabel, Features, Image, Sequence, Value

from benchmarks.evidence.data import (
    DIGITS_COARSE,
    DIGITS_COARSE_NAMES,
    FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_NAMES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_NAMES,
    FASHION_MNIST_ROOT,
    coarse_labels,
    fashion_mnist_arrays,
    load_fashion_mnist,
    long_tail,
    long_tail_counts,
    long_tail_indices,
    protocol_data,
    read_idx,
    stratified_split,
    two_moons,
    two_moons_separable,
)
from examples.offline_data import DIGITS_NAMES, load_digits_dataset, with_transforms
from test_data import DIGITS_TRAIN_COUNTS, _counts, _labels, digits  # noqa: F401 (digits: the shared fixture)

FASHION_MISSING = not all(
    (FASHION_MNIST_ROOT / name).is_file() or (FASHION_MNIST_ROOT / f"{name}.gz").is_file()
    for names in FASHION_MNIST_FILES.values()
    for name in names
)
needs_fashion_mnist = pytest.mark.skipif(
    FASHION_MISSING,
    reason=f"Fashion-MNIST IDX files absent under {FASHION_MNIST_ROOT}: apt-get install dataset-fashion-mnist",
)


def test_coarse_digits_counts_are_sums_of_fine_counts_and_fine_label_is_kept(digits):
    coarse = coarse_labels(digits, DIGITS_COARSE, DIGITS_COARSE_NAMES)
    train = coarse["train"]
    assert train.features["label"] == ClassLabel(names=DIGITS_COARSE_NAMES)
    assert train.features["fine_label"] == ClassLabel(names=DIGITS_NAMES)
    assert _labels(train, "fine_label").tolist() == _labels(digits["train"]).tolist()
    # closed loops 0,6,8,9 / straight strokes 1,4,7 / open curves 2,3,5
    c = DIGITS_TRAIN_COUNTS
    assert _counts(train) == [c[0] + c[6] + c[8] + c[9], c[1] + c[4] + c[7], c[2] + c[3] + c[5]]
    assert _counts(train) == [535, 406, 406]
    assert _counts(coarse["test"]) == [178, 136, 136]


def test_coarse_labels_rejects_incomplete_or_out_of_range_mapping(digits):
    with pytest.raises(ValueError, match=r"no superclass for fine classes \[9\]"):
        coarse_labels(digits["train"], {c: 0 for c in range(9)}, ["all"])
    with pytest.raises(ValueError, match=r"superclass indices \[2\] outside 0..1"):
        coarse_labels(digits["train"], [0, 1, 2, 0, 1, 0, 1, 0, 1, 0], ["a", "b"])
    with pytest.raises(ValueError, match=r"superclasses \['c'\] receive no fine class"):
        coarse_labels(digits["train"], [0, 1] * 5, ["a", "b", "c"])


def test_long_tail_counts_reproduce_cao_et_al_cifar_profiles():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert long_tail_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    cifar100 = long_tail_counts(500, 100, 100)
    assert (cifar100[0], cifar100[-1], sum(cifar100)) == (500, 5, 10847)
    with pytest.raises(ValueError, match="leaves classes empty"):
        long_tail_counts(50, 10, 100)


def test_long_tail_digits_counts_follow_profile_for_ratio_100(digits):
    subset = long_tail(digits["train"], imbalance_ratio=100, seed=0)
    n_max = min(DIGITS_TRAIN_COUNTS)  # 131
    expected = [int(n_max * 0.01 ** (c / 9)) for c in range(10)]
    assert expected == [131, 78, 47, 28, 16, 10, 6, 3, 2, 1]
    assert _counts(subset) == expected
    assert subset.features == digits["train"].features


def test_long_tail_is_seeded(digits):
    first = long_tail(digits["train"], imbalance_ratio=10, seed=0)
    again = long_tail(digits["train"], imbalance_ratio=10, seed=0)
    other = long_tail(digits["train"], imbalance_ratio=10, seed=1)
    assert _counts(first) == _counts(other) == long_tail_counts(131, 10, 10)
    assert first._indices.column(0).to_pylist() == again._indices.column(0).to_pylist()
    assert first._indices.column(0).to_pylist() != other._indices.column(0).to_pylist()


def test_two_moons_schema_balance_and_seed():
    moons = two_moons(n=101, noise=0.1, seed=3)
    x_feature = Sequence(Value("float32"), length=2)
    assert moons.features == Features({"x": x_feature, "label": ClassLabel(names=["moon_0", "moon_1"])})
    assert moons.num_rows == 101 and _counts(moons) == [50, 51]
    assert moons["x"][:5] == two_moons(n=101, noise=0.1, seed=3)["x"][:5]
    assert moons["x"][:5] != two_moons(n=101, noise=0.1, seed=4)["x"][:5]


def test_two_moons_separable_first_coordinate_separates_with_margin():
    moons = two_moons_separable(n=300, noise=0.1, margin=0.1, seed=0)
    x = np.asarray(moons["x"], dtype=np.float64)
    y = _labels(moons)
    assert _counts(moons) == [150, 150]
    assert x[y == 1, 0].max() <= -0.1 + 1e-6 and x[y == 0, 0].min() >= 0.1 - 1e-6
    overlapping = two_moons_separable(n=300, noise=0.1, margin=-0.1, seed=0)
    x_o, y_o = np.asarray(overlapping["x"]), _labels(overlapping)
    assert x_o[y_o == 1, 0].max() > 0 and x_o[y_o == 0, 0].min() < 0  # negative margin: classes overlap


def test_fashion_mnist_missing_files_error_names_path_and_apt_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte") in message
    assert "apt-get install dataset-fashion-mnist" in message


@needs_fashion_mnist
def test_fashion_mnist_debian_files_have_the_documented_shapes():
    def installed(name):
        return next(p for p in (FASHION_MNIST_ROOT / name, FASHION_MNIST_ROOT / f"{name}.gz") if p.is_file())

    assert read_idx(installed("t10k-images-idx3-ubyte")).shape == (10000, 28, 28)
    test_labels = read_idx(installed("t10k-labels-idx1-ubyte"))
    assert np.bincount(test_labels).tolist() == [1000] * 10


@needs_fashion_mnist
def test_fashion_mnist_stratified_subsample_and_coarse_counts():
    data = load_fashion_mnist(max_train=1000, max_test=200, seed=0)
    assert data["train"].features == Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_NAMES)})
    assert _counts(data["train"]) == [100] * 10 and _counts(data["test"]) == [20] * 10
    image = data["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (28, 28))
    coarse = coarse_labels(data, FASHION_MNIST_COARSE, FASHION_MNIST_COARSE_NAMES)
    assert coarse["train"].features["label"] == ClassLabel(names=FASHION_MNIST_COARSE_NAMES)
    assert _counts(coarse["train"]) == [400, 200, 300, 100]  # tops, bottoms_and_dresses, footwear, bags
    assert _counts(coarse["test"]) == [80, 40, 60, 20]


def test_coarse_constants_cover_all_fine_classes():
    assert sorted(FASHION_MNIST_COARSE) == list(range(10)) and sorted(DIGITS_COARSE) == list(range(10))
    footwear = [FASHION_MNIST_NAMES[c] for c in range(10) if FASHION_MNIST_COARSE[c] == 2]
    assert footwear == ["Sandal", "Sneaker", "Ankle boot"]



def _write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_fashion_mnist_reads_plain_and_gzipped_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, size=(30, 28, 28)), np.repeat(np.arange(10), 3)),
        "test": (rng.integers(0, 256, size=(10, 28, 28)), np.arange(10)),
    }
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / images_name, arrays[split][0], compress=split == "train")
        _write_idx(tmp_path / labels_name, arrays[split][1], compress=False)
    data = load_fashion_mnist(root=tmp_path, max_train=20)
    assert data["train"].features == Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_NAMES)})
    assert (data["train"].num_rows, data["test"].num_rows) == (20, 10)
    assert _counts(data["train"]) == [2] * 10
    np.testing.assert_array_equal(np.asarray(data["test"][4]["image"]), arrays["test"][0][4])
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), arrays["train"][0])
    kept = [np.asarray(row["image"]).tolist() for row in data["train"]]
    again = load_fashion_mnist(root=tmp_path, max_train=20, seed=0)
    other = load_fashion_mnist(root=tmp_path, max_train=20, seed=1)
    assert [np.asarray(row["image"]).tolist() for row in again["train"]] == kept  # seeded subsample
    assert [np.asarray(row["image"]).tolist() for row in other["train"]] != kept


# ---------------------------------------------------------------------------------------------- protocol splits
@needs_fashion_mnist
def test_validation_split_is_stratified_disjoint_and_fixed():
    labels = fashion_mnist_arrays()["train"][1]
    val, pool = stratified_split(labels, 10_000, seed=0)
    assert (len(val), len(pool)) == (10_000, 50_000)
    assert np.intersect1d(val, pool).size == 0 and np.union1d(val, pool).tolist() == list(range(60_000))
    assert np.bincount(labels[val]).tolist() == [1000] * 10 and np.bincount(labels[pool]).tolist() == [5000] * 10
    again, _ = stratified_split(labels, 10_000, seed=0)
    other, _ = stratified_split(labels, 10_000, seed=1)
    assert again.tolist() == val.tolist() and other.tolist() != val.tolist()
    tail = long_tail_indices(labels[pool], 10, imbalance_ratio=100, seed=0, n_max=5000)
    assert np.bincount(labels[pool][tail]).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@needs_fashion_mnist
def test_protocol_data_holds_the_fixed_normalised_splits():
    data = protocol_data(val_size=10_000)
    images, labels = fashion_mnist_arrays()["train"]
    val_rows, pool_rows = stratified_split(labels, 10_000, seed=0)
    assert data.pool.x.shape == (50_000, 1, 28, 28) and data.val.x.shape == (10_000, 1, 28, 28)
    assert data.test.x.shape == (10_000, 1, 28, 28) and data.test.y.bincount().tolist() == [1000] * 10
    assert data.val.y.tolist() == labels[val_rows].tolist() and data.pool.y.tolist() == labels[pool_rows].tolist()
    expected = (images[val_rows[7]].astype(np.float32) / 255.0 - 0.5) / 0.5  # with_transforms' normalisation
    np.testing.assert_allclose(data.val.x[7, 0].numpy(), expected, atol=1e-6)
    assert data.pool.x.min().item() == -1.0 and data.pool.x.max().item() == 1.0
    # digits: 50 / 25 / 25 % stratified, upsampled to 28x28 like the examples' transform
    sizes = [len(s) for s in (data.digits_train, data.digits_val, data.digits_test)]
    assert sizes == [898, 449, 450] and data.digits_train.x.shape[1:] == (1, 28, 28)
    assert all(np.bincount(s.y.numpy()).min() >= 43 for s in (data.digits_val, data.digits_test))
    first = with_transforms(load_digits_dataset(split_seed=0, test_size=0.5)["train"], 28, channels=1)[0]
    np.testing.assert_array_equal(data.digits_train.x[0].numpy(), first["pixel_values"].numpy())


@needs_fashion_mnist
def test_protocol_splits_are_bit_identical_after_the_reader_moved_to_examples_offline_data():
    """The Fashion-MNIST reader now lives in examples/offline_data.py (shared with examples/pretrain.py); the
    evidence splits must be the same bytes as before the move (hash taken with the reader in this module)."""
    import hashlib

    import benchmarks.evidence.data as evidence
    import examples.offline_data as offline

    assert evidence.read_idx is offline.read_idx and evidence.fashion_mnist_arrays is offline.fashion_mnist_arrays
    data = protocol_data(val_size=2000, test_size=1000, split_seed=0)
    digest = hashlib.sha256()
    for name in ("pool", "val", "test", "digits_train", "digits_val", "digits_test"):
        split = getattr(data, name)
        digest.update(split.x.numpy().tobytes())
        digest.update(split.y.numpy().tobytes())
    assert len(data.pool) == 58000 and len(data.val) == 2000 and len(data.test) == 1000
    assert digest.hexdigest() == "b158d27e17e903cfe019878a7df81e0421e72afa0b0feada8474cdbf978e0610"
