"""Published preprocessing = training preprocessing (hf_vcreg.publishing.record_preprocessing).

A model trained at 32x32 with mean/std 0.5 is saved; the checkpoint read back with timm
(``resolve_data_config``), with transformers' ``AutoImageProcessor`` and with examples/finetune.py's transform
preprocesses at 32x32 with mean/std 0.5, not the library defaults (224, ImageNet statistics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from _examples import load_example
import timm
import timm.data
import torch
from _tiny_models import hf_vit
from transformers import AutoImageProcessor, ResNetConfig, ResNetForImageClassification

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.publishing import record_preprocessing


def _save(model, out: Path) -> Path:
    args = VCRegConfig(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True)
    VCRegTrainer(model=model, args=args).save_model()
    return out


def _white_and_black(size=(50, 60)):
    """Two RGB images (50 wide, 60 high): all 255 and all 0 -> 1.0 and -1.0 after mean/std 0.5."""
    return [PIL.Image.new("RGB", size, (255, 255, 255)), PIL.Image.new("RGB", size, (0, 0, 0))]


def _check_processor(processor):
    pixels = processor(_white_and_black(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (2, 3, 32, 32)
    assert torch.allclose(pixels[0], torch.ones(3, 32, 32), atol=1e-5)  # (1 - 0.5) / 0.5: mean/std 0.5, not ImageNet
    assert torch.allclose(pixels[1], -torch.ones(3, 32, 32), atol=1e-5)


def test_timm_resnet18_trained_at_32_reloads_with_its_preprocessing(tmp_path):
    model = timm.create_model("resnet18", num_classes=3)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)  # timm's default, what used to be published
    data_config = record_preprocessing(model, 32, mean=0.5, std=0.5)
    assert data_config == {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                           "interpolation": "bilinear", "crop_pct": 1.0}
    out = _save(model, tmp_path / "timm")
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["test_input_size"] == [3, 32, 32] and cfg["test_crop_pct"] == 1.0  # timm's resnet18 default: 288
    assert timm.data.resolve_data_config({}, model=timm.create_model(f"local-dir:{out}", pretrained=True),
                                         use_test_size=True)["input_size"] == (3, 32, 32)

    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert tuple(reloaded.pretrained_cfg["input_size"]) == (3, 32, 32)
    resolved = timm.data.resolve_data_config({}, model=reloaded)
    assert tuple(resolved["input_size"]) == (3, 32, 32)
    assert tuple(resolved["mean"]) == (0.5,) * 3 and tuple(resolved["std"]) == (0.5,) * 3
    assert resolved["crop_pct"] == 1.0 and resolved["interpolation"] == "bilinear"
    eval_transform = timm.data.create_transform(**resolved)
    x = eval_transform(_white_and_black()[0])
    assert tuple(x.shape) == (3, 32, 32) and torch.allclose(x, torch.ones_like(x), atol=1e-5)

    processor = AutoImageProcessor.from_pretrained(str(out))  # transformers: TimmWrapperImageProcessor
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    _check_processor(processor)
    _check_finetune_transform(out)


def _check_finetune_transform(out: Path):
    finetune = load_example("finetune")
    transform = finetune.make_transform(AutoImageProcessor.from_pretrained(str(out)))
    batch = transform({"image": _white_and_black(), "label": [1, 0]})
    assert tuple(batch["pixel_values"].shape) == (2, 3, 32, 32)
    assert torch.allclose(batch["pixel_values"][0], torch.ones(3, 32, 32), atol=1e-5)
    assert batch["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_transformers_model_trained_at_32_writes_its_preprocessor_config(tmp_path, name):
    if name == "vit":
        model = hf_vit()
        model.config.image_size = 224  # the config alone would publish 224
    else:
        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          num_labels=3))
    record_preprocessing(model, 32, mean=(0.5, 0.5, 0.5), std=0.5, interpolation="bilinear", crop_pct=1.0)
    out = _save(model, tmp_path / name)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == [0.5] * 3 and saved["image_std"] == [0.5] * 3 and saved["resample"] == 2
    processor = AutoImageProcessor.from_pretrained(str(out))
    size = dict(processor.size)
    assert (size.get("height"), size.get("width")) == (32, 32) or size.get("shortest_edge") == 32
    _check_processor(processor)
    _check_finetune_transform(out)
    card = (out / "README.md").read_text()
    assert "resize to 32x32 (bilinear), 3 channels, scale to [0, 1], normalise with mean (0.5, 0.5, 0.5)" in card


def test_record_preprocessing_rejects_values_a_loader_cannot_reproduce():
    model = hf_vit()
    with pytest.raises(ValueError, match=r"image_size must be a positive int; got 0"):
        record_preprocessing(model, 0)
    with pytest.raises(ValueError, match=r"interpolation 'area' is not one of"):
        record_preprocessing(model, 32, interpolation="area")
    with pytest.raises(ValueError, match=r"mean needs 1 or 3 values; got \(0.5, 0.5\)"):
        record_preprocessing(model, 32, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]; got 1.5"):
        record_preprocessing(model, 32, crop_pct=1.5)
    assert not hasattr(model, "vcreg_preprocessing")  # nothing recorded by a rejected call
    np.testing.assert_equal(record_preprocessing(model, 16, channels=1, mean=0.1, std=0.2)["input_size"], (1, 16, 16))
