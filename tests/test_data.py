"""Offline data for the examples (examples/offline_data.py): exact schemas, class counts, transforms, seeding."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Features, Image

from benchmarks.evidence.data import DIGITS_COARSE, DIGITS_COARSE_NAMES, coarse_labels
from examples.offline_data import DIGITS_NAMES, load_digits_dataset, with_transforms

DIGITS_TRAIN_COUNTS = [133, 136, 133, 137, 136, 136, 136, 134, 131, 135]  # seed 0, test_size 0.25
DIGITS_TEST_COUNTS = [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
DIGITS_TOTAL_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn load_digits


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
