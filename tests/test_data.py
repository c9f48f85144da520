"""Offline data sets (hf_vcreg/data.py, re-exported by benchmarks/data.py): exact schemas, class counts, transforms, seeding."""

import gzip
import struct

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Features, Image, Sequence, Value

from hf_vcreg.data import (
    DIGITS_COARSE,
    DIGITS_COARSE_NAMES,
    DIGITS_NAMES,
    FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_NAMES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_NAMES,
    FASHION_MNIST_ROOT,
    coarse_labels,
    load_digits_dataset,
    load_fashion_mnist,
    long_tail,
    long_tail_counts,
    read_idx,
    two_moons,
    two_moons_separable,
    with_transforms,
)

DIGITS_TRAIN_COUNTS = [133, 136, 133, 137, 136, 136, 136, 134, 131, 135]  # seed 0, test_size 0.25
DIGITS_TEST_COUNTS = [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
DIGITS_TOTAL_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn load_digits

FASHION_MISSING = not all(
    (FASHION_MNIST_ROOT / name).is_file() or (FASHION_MNIST_ROOT / f"{name}.gz").is_file()
    for names in FASHION_MNIST_FILES.values()
    for name in names
)
needs_fashion_mnist = pytest.mark.skipif(
    FASHION_MISSING,
    reason=f"Fashion-MNIST IDX files absent under {FASHION_MNIST_ROOT}: apt-get install dataset-fashion-mnist",
)


def _labels(dataset, column="label"):
    return np.asarray(dataset.with_format("numpy")[column][:])


def _counts(dataset, column="label"):
    return np.bincount(_labels(dataset, column), minlength=dataset.features[column].num_classes).tolist()


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_schema_and_stratified_split_sizes(digits):
    expected = Features({"image": Image(), "label": ClassLabel(names=DIGITS_NAMES)})
    assert digits["train"].features == expected and digits["test"].features == expected
    assert (digits["train"].num_rows, digits["test"].num_rows) == (1347, 450)
    assert _counts(digits["train"]) == DIGITS_TRAIN_COUNTS
    assert _counts(digits["test"]) == DIGITS_TEST_COUNTS
    assert np.add(DIGITS_TRAIN_COUNTS, DIGITS_TEST_COUNTS).tolist() == DIGITS_TOTAL_COUNTS


def test_digits_images_are_8x8_grey_scaled_from_0_16_to_0_255(digits):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    train_rows, _ = train_test_split(np.arange(1797), test_size=0.25, stratify=raw.target, random_state=0)
    first = int(np.sort(train_rows)[0])  # splits keep the original row order
    image = digits["train"][0]["image"]
    assert (image.mode, image.size) == ("L", (8, 8))
    assert digits["train"][0]["label"] == raw.target[first]
    np.testing.assert_array_equal(np.asarray(image), np.round(raw.images[first] * 255 / 16).astype(np.uint8))
    assert max(np.asarray(digits["test"][i]["image"]).max() for i in range(20)) == 255  # 16 -> 255


def test_digits_split_is_deterministic_under_seed(digits):
    again = load_digits_dataset(split_seed=0)
    other = load_digits_dataset(split_seed=1)
    assert _labels(again["train"]).tolist() == _labels(digits["train"]).tolist()
    assert np.asarray(again["test"][7]["image"]).tolist() == np.asarray(digits["test"][7]["image"]).tolist()
    assert _labels(other["train"]).tolist() != _labels(digits["train"]).tolist()
    assert _labels(other["test"]).tolist() != _labels(digits["test"]).tolist()


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


def test_with_transforms_gives_resized_normalised_rgb_tensors(digits):
    transformed = with_transforms(digits["train"], image_size=32, channels=3)
    row = transformed[0]
    assert set(row) == {"pixel_values", "labels"}
    assert row["pixel_values"].shape == (3, 32, 32) and row["pixel_values"].dtype == torch.float32
    assert row["labels"].dtype == torch.int64 and row["labels"].item() == 0
    values = transformed[:16]["pixel_values"]
    assert values.shape == (16, 3, 32, 32)
    assert values.min().item() == -1.0 and values.max().item() <= 1.0  # background 0 -> -1
    torch.testing.assert_close(values[:, 0], values[:, 2])  # grey replicated to RGB


def test_with_transforms_without_resize_is_exact_normalisation(digits):
    transformed = with_transforms(digits["train"], image_size=8, channels=1, mean=0.25, std=0.5)
    raw = np.asarray(digits["train"][5]["image"], dtype=np.float32)
    expected = torch.from_numpy((raw / 255.0 - 0.25) / 0.5).unsqueeze(0)
    torch.testing.assert_close(transformed[5]["pixel_values"], expected, rtol=0, atol=1e-6)


def test_with_transforms_label_column_selects_fine_labels(digits):
    coarse = coarse_labels(digits["test"], DIGITS_COARSE, DIGITS_COARSE_NAMES)
    fine = with_transforms(coarse, image_size=8, channels=1, label_column="fine_label")[:10]["labels"]
    assert fine.tolist() == _labels(digits["test"])[:10].tolist()
    coarse_out = with_transforms(coarse, image_size=8, channels=1)[:10]["labels"]
    assert coarse_out.tolist() == [DIGITS_COARSE[c] for c in fine.tolist()]


def test_with_transforms_rejects_bad_channels_and_stats(digits):
    with pytest.raises(ValueError, match="channels must be 1"):
        with_transforms(digits["train"], 32, channels=2)
    with pytest.raises(ValueError, match="mean must be one float or 1 floats"):
        with_transforms(digits["train"], 32, channels=1, mean=[0.5, 0.5, 0.5])


def test_with_transforms_feeds_trainer_with_default_collator(digits, tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    batch = default_data_collator([with_transforms(digits["test"], 16, 3)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].shape == (4,)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 10)

        def forward(self, pixel_values, labels=None):
            logits = self.fc(pixel_values.flatten(1))
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=8, remove_unused_columns=False,
        report_to=[], use_cpu=True, dataloader_num_workers=0,
    )
    eval_set = with_transforms(digits["test"].select(range(20)), image_size=16, channels=3)
    output = Trainer(model=Linear(), args=args, data_collator=default_data_collator).predict(eval_set)
    assert output.predictions.shape == (20, 10)
    assert output.label_ids.tolist() == _labels(digits["test"])[:20].tolist()


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
