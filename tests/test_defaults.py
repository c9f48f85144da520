"""Per-family defaults: the family rule, unset coefficients resolved to RECOMMENDED when the trainer is built, an
explicit value always winning (0 included), the INFO line, the trainer's attributes and the model card."""

from __future__ import annotations

import logging
import math
import re

import datasets
import pytest
import timm
import torch
import transformers as T
from torch import nn

from _tiny_models import BUILDERS, build
from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.capture import select_layers
from hf_vcreg.config import RECOMMENDED
from hf_vcreg.family import FAMILIES, is_attention, model_family

TRANSFORMERS = {"hf_vit", "hf_deit", "hf_beit", "hf_dinov2", "hf_swin", "hf_videomae", "timm_vit"}


def make_dataset(n=16, seed=0, frames=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, frames, 3, 32, 32) if frames else (n, 3, 32, 32)
    data = {"pixel_values": torch.randn(shape, generator=g).numpy(), "labels": torch.randint(0, 3, (n,), generator=g).numpy()}
    return datasets.Dataset.from_dict(data).with_format("torch")


def config(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, learning_rate=0.1, optim="sgd",
                  report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    return VCRegConfig(**{**values, **kw})


# ---------------------------------------------------------------------------------------------- the family rule
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_family_of_every_tiny_model(name):
    expected = "transformer" if name in TRANSFORMERS else "cnn"
    assert model_family(build(name)) == expected


def test_family_reads_through_wrappers():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                            num_classes=3)
    assert model_family(torch.compile(vit)) == "transformer"  # torch.compile's OptimizedModule is unwrapped
    cfg = T.TimmWrapperConfig.from_dict({
        "architecture": "vit_tiny_patch16_224", "num_classes": 3, "pretrained_cfg": {},
        "model_args": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
    })
    assert model_family(T.TimmWrapperForImageClassification(cfg)) == "transformer"
    assert model_family(build("timm_wrapper")) == "cnn"  # TimmWrapper around a resnet18


class _MHABlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        return self.mlp(x + self.attn(x, x, x)[0])


def test_family_rule_attention_in_the_blocks_only():
    with_mha = nn.Sequential(nn.Linear(4, 8), nn.ModuleList([_MHABlock(), _MHABlock()]))
    assert model_family(with_mha) == "transformer"
    # Squeeze-excitation / CBAM-style channel gates are not attention: an EfficientNet stays a CNN.
    effnet = build("timm_efficientnet")
    assert any("SqueezeExcite" in type(m).__name__ for m in effnet.modules())
    assert model_family(effnet) == "cnn"
    # No blocks detected: the whole model is read.
    assert model_family(nn.Sequential(nn.Flatten(), nn.Linear(12, 3))) == "cnn"
    assert model_family(_MHABlock()) == "transformer"
    # An attention-pooling head outside the blocks does not make a CNN a transformer.
    cnn = build("timm_resnet")
    cnn.fc = nn.Sequential(timm.layers.AttentionPool2d(512, num_heads=8, feat_size=1), nn.Linear(512, 3))
    assert is_attention(cnn.fc[0]) and model_family(cnn) == "cnn"


def test_recommended_table_covers_every_family_with_valid_fields(tmp_path):
    assert set(RECOMMENDED) == set(FAMILIES)
    fields = VCRegConfig.__dataclass_fields__
    first = set(RECOMMENDED[FAMILIES[0]])
    for family, values in RECOMMENDED.items():
        assert set(values) == first >= {"vcreg_alpha", "vcreg_beta"}, family
        assert all(fields[name].default is None for name in values)  # None means "recommended": the default
        for name in ("vcreg_alpha", "vcreg_beta"):
            value = values[name]
            assert isinstance(value, float) and math.isfinite(value) and value >= 0, (family, name, value)
        VCRegConfig(output_dir=str(tmp_path), **values)  # the config's own validation accepts them


# ---------------------------------------------------------------------------------------------- the config
def test_unset_coefficients_are_none_and_fill_from_the_family(tmp_path):
    args = VCRegConfig(output_dir=str(tmp_path))
    assert args.vcreg_alpha is None and args.vcreg_beta is None and args.vcreg_monitor_only is False
    assert args.vcreg_enabled  # an unset coefficient may switch VCReg on: the trainer decides with the family
    assert args.vcreg_recommended_fields() == ["vcreg_alpha", "vcreg_beta", "vcreg_layers"]
    assert args.vcreg_layers is None
    assert args.vcreg_dict()["vcreg_alpha"] is None
    for family in FAMILIES:
        resolved = args.vcreg_dict(family)
        assert {k: resolved[k] for k in RECOMMENDED[family]} == RECOMMENDED[family]
        assert {k: v for k, v in resolved.items() if k not in RECOMMENDED[family]} == {
            k: v for k, v in args.vcreg_dict().items() if k not in RECOMMENDED[family]}
    mixed = VCRegConfig(output_dir=str(tmp_path), vcreg_alpha=0.0)  # an explicit value wins, 0 included
    assert mixed.vcreg_recommended_fields() == ["vcreg_beta", "vcreg_layers"]
    assert mixed.vcreg_dict("cnn")["vcreg_alpha"] == 0.0
    assert mixed.vcreg_dict("cnn")["vcreg_beta"] == RECOMMENDED["cnn"]["vcreg_beta"]
    off = VCRegConfig(output_dir=str(tmp_path), vcreg_alpha=0.0, vcreg_beta=0.0)
    assert not off.vcreg_enabled and off.vcreg_dict("transformer")["vcreg_beta"] == 0.0
    assert VCRegConfig(output_dir=str(tmp_path), vcreg_alpha=0.0, vcreg_beta=0.0, vcreg_monitor_only=True).vcreg_enabled
    with pytest.raises(ValueError, match=r"family='mlp' is unknown: use one of \['cnn', 'transformer'\]"):
        args.vcreg_dict("mlp")


def test_unset_coefficients_pass_json_and_command_line(tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"output_dir": "%s", "vcreg_alpha": null, "vcreg_beta": 2.5}' % tmp_path)
    (from_json,) = T.HfArgumentParser(VCRegConfig).parse_json_file(str(path))
    assert from_json.vcreg_alpha is None and from_json.vcreg_beta == 2.5
    (cli,) = T.HfArgumentParser(VCRegConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path),
                                                                          "--vcreg_beta", "2.5"])
    assert cli.vcreg_alpha is None and cli.vcreg_beta == 2.5


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("name,family", [("hf_vit", "transformer"), ("hf_resnet", "cnn"), ("timm_convnext", "cnn"),
                                         ("hf_swin", "transformer")])
def test_trainer_resolves_unset_coefficients_to_the_family_values_and_uses_them(name, family, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_vcreg.trainer")
    trainer = VCRegTrainer(model=build(name), args=config(tmp_path), train_dataset=make_dataset())
    alpha, beta = RECOMMENDED[family]["vcreg_alpha"], RECOMMENDED[family]["vcreg_beta"]
    layers = RECOMMENDED[family]["vcreg_layers"]
    assert trainer.vcreg_family == family
    assert trainer.vcreg_recommended == ["vcreg_alpha", "vcreg_beta", "vcreg_layers"]
    assert trainer.vcreg_resolved == {**trainer.args.vcreg_dict(), "vcreg_alpha": alpha, "vcreg_beta": beta,
                                      "vcreg_layers": layers}
    assert trainer.args.vcreg_alpha is None  # args keep "recommended": a new model (model_init) resolves again
    assert (trainer._vcreg_spec.alpha, trainer._vcreg_spec.beta) == (alpha, beta)
    assert trainer.vcreg_layer_names == select_layers(trainer.model, layers)  # the family's placement
    lines = [r.getMessage() for r in caplog.records if r.name == "hf_vcreg.trainer"]
    assert lines == [f"VCReg defaults for a {family} model: alpha={alpha!r}, beta={beta!r}, layers={layers!r} "
                     "(recommended; set vcreg_alpha / vcreg_beta / vcreg_layers to override)."]
    trainer.train()
    log = trainer.state.log_history[0]  # the penalty applied is the family's: mean over layers of alpha V + beta K
    assert log["vcreg/penalty"] == pytest.approx(alpha * log["vcreg/variance"] + beta * log["vcreg/covariance"],
                                                 rel=1e-5)
    assert log["vcreg/penalty"] > 0


def test_an_explicit_value_wins_zero_included(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_vcreg.trainer")
    beta = RECOMMENDED["cnn"]["vcreg_beta"]
    trainer = VCRegTrainer(model=build("hf_resnet"), args=config(tmp_path, vcreg_alpha=0.0),
                           train_dataset=make_dataset())
    assert (trainer.vcreg_resolved["vcreg_alpha"], trainer.vcreg_resolved["vcreg_beta"]) == (0.0, beta)
    assert trainer.vcreg_recommended == ["vcreg_beta", "vcreg_layers"]
    assert caplog.records[-1].getMessage() == (
        f"VCReg for a cnn model: alpha=0.0 (set by the user), beta={beta!r} (recommended for cnn; set vcreg_beta to "
        f"override), layers={RECOMMENDED['cnn']['vcreg_layers']!r} (recommended for cnn; set vcreg_layers to override).")
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["vcreg/penalty"] == pytest.approx(beta * log["vcreg/covariance"], rel=1e-5)
    explicit = VCRegTrainer(model=build("hf_vit"), args=config(tmp_path, vcreg_alpha=3.0, vcreg_beta=4.0))
    assert explicit.vcreg_recommended == ["vcreg_layers"] and (explicit._vcreg_spec.alpha, explicit._vcreg_spec.beta) == (3.0, 4.0)
    assert caplog.records[-1].getMessage() == (
        "VCReg for a transformer model: alpha=3.0 (set by the user), beta=4.0 (set by the user), layers="
        f"{RECOMMENDED['transformer']['vcreg_layers']!r} (recommended for transformer; set vcreg_layers to override).")


def test_both_coefficients_zero_is_plain_training_without_hooks(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_vcreg.trainer")
    model = build("hf_vit")
    trainer = VCRegTrainer(model=model, args=config(tmp_path, vcreg_alpha=0.0, vcreg_beta=0.0),
                           train_dataset=make_dataset())
    assert trainer.vcreg_layer_names == [] and trainer.vcreg_family == "transformer"
    assert caplog.records[-1].getMessage() == (
        "VCReg off for a transformer model (alpha=0.0, beta=0.0): plain training, no hooks.")
    trainer.train()
    assert not any(key.startswith("vcreg/") for key in trainer.state.log_history[0])
    assert all(not m._forward_hooks for m in model.modules())


def _card_lines(card: str) -> dict:
    return {m[1]: m[2] for m in re.finditer(r"^\| `(vcreg_\w+)` \| (.*) \|$", card, flags=re.M)}


def test_model_card_shows_the_resolved_values_and_where_they_came_from(tmp_path):
    trainer = VCRegTrainer(model=build("hf_resnet"), args=config(tmp_path / "a", vcreg_beta=0.5),
                           train_dataset=make_dataset())
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "a" / "README.md").read_text()
    table = _card_lines(card)
    assert table["vcreg_alpha"] == repr(RECOMMENDED["cnn"]["vcreg_alpha"]) and table["vcreg_beta"] == "0.5"
    assert table["vcreg_layers"] == f"`{RECOMMENDED['cnn']['vcreg_layers']}`"
    assert ("Settings: `vcreg_alpha` recommended for cnn models (hf_vcreg's per-family default); `vcreg_beta` set "
            "by the user; `vcreg_layers` recommended for cnn models (hf_vcreg's per-family default).") in card
    # The card's values rebuild the run's settings explicitly, whatever RECOMMENDED holds later.
    rebuilt = VCRegConfig(output_dir=str(tmp_path / "b"), vcreg_alpha=float(table["vcreg_alpha"]),
                          vcreg_beta=float(table["vcreg_beta"]), vcreg_layers=table["vcreg_layers"].strip("`"))
    assert rebuilt.vcreg_dict() == {**trainer.vcreg_resolved}
