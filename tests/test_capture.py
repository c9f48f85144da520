"""Capture: the block table for every supported architecture, sample-matrix shapes, selection and errors."""

import re

import pytest
import torch
from torch import nn

from _tiny_models import build, example_input
from hf_vcreg.capture import (
    BlockCapture,
    feature_axis,
    find_blocks,
    find_stages,
    sample_rows,
    select_layers,
    split_patterns,
)

# name -> (stages, [(n rows, d features) per stage for a batch of 2]). The stages come from the libraries' metadata:
# transformers' hidden_states (traced on a meta-device twin), timm's feature_info (stem entries left out).
CAPTURE_TABLE = {
    "hf_vit": (["vit.layers.0", "vit.layers.1"], [(34, 32), (34, 32)]),
    "hf_deit": (["deit.layers.0", "deit.layers.1"], [(36, 32), (36, 32)]),
    "hf_beit": (["beit.layers.0", "beit.layers.1"], [(34, 32), (34, 32)]),
    "hf_dinov2": (["dinov2.encoder.layer.0", "dinov2.encoder.layer.1"], [(34, 32), (34, 32)]),
    "hf_swin": (["swin.encoder.layers.0", "swin.encoder.layers.1"], [(128, 32), (128, 32)]),
    "hf_convnext": (["convnext.encoder.stages.0", "convnext.encoder.stages.1"], [(128, 8), (32, 16)]),
    "hf_resnet": (["resnet.encoder.stages.0", "resnet.encoder.stages.1"], [(128, 8), (32, 16)]),
    "hf_regnet": (["regnet.encoder.stages.0", "regnet.encoder.stages.1"], [(128, 8), (32, 16)]),
    "hf_videomae": (["videomae.encoder.layer.0", "videomae.encoder.layer.1"], [(64, 32), (64, 32)]),
    "timm_vit": (["blocks.0", "blocks.1"], [(34, 32), (34, 32)]),
    "timm_resnet": (["layer1", "layer2", "layer3", "layer4"], [(128, 64), (32, 128), (8, 256), (2, 512)]),
    "timm_convnext": (["stages.0", "stages.1", "stages.2", "stages.3"], [(128, 40), (32, 80), (8, 160), (2, 320)]),
    "timm_efficientnet": (  # feature_info lists the last block group of each resolution
        ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
        [(512, 16), (128, 24), (32, 40), (8, 112), (2, 320)],
    ),
    "timm_regnet": (["s1", "s2", "s3", "s4"], [(128, 24), (32, 56), (8, 152), (2, 368)]),
    "timm_wrapper": (
        ["timm_model.layer1", "timm_model.layer2", "timm_model.layer3", "timm_model.layer4"],
        [(128, 64), (32, 128), (8, 256), (2, 512)],
    ),
}

# name -> blocks (vcreg_layers="blocks", the default): the blocks inside the stages above. ViTs: the same modules.
BLOCK_TABLE = {
    "hf_vit": ["vit.layers.0", "vit.layers.1"],
    "hf_swin": ["swin.encoder.layers.0.blocks.0", "swin.encoder.layers.1.blocks.0"],
    "hf_resnet": ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"],
    "timm_vit": ["blocks.0", "blocks.1"],
    "timm_resnet": [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)],
    "timm_convnext": [f"stages.{s}.blocks.{b}" for s, depth in enumerate((2, 2, 6, 2)) for b in range(depth)],
    "timm_efficientnet": ["blocks.0"] + [f"blocks.{s}.{b}" for s, depth in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 4))
                                         for b in range(depth)] + ["blocks.6"],
    "timm_regnet": ["s1", "s2"] + [f"s3.b{i}" for i in range(1, 5)] + [f"s4.b{i}" for i in range(1, 8)],
    "timm_wrapper": [f"timm_model.layer{s}.{b}" for s in range(1, 5) for b in range(2)],
}


def _forward(name, model, x):
    if name.startswith("hf_") or name == "timm_wrapper":
        return model(pixel_values=x)
    return model(x)


def _shapes(name, model, names):
    seen = {}

    def record(layer, x):
        z = x.movedim(layer.axis, -1)
        seen[layer.name] = (z.numel() // z.shape[-1], z.shape[-1])
        return x

    capture = BlockCapture(model, names, record)
    capture.install()
    with torch.no_grad(), capture.active():
        _forward(name, model, example_input(name))
    capture.remove()
    assert all(not m._forward_hooks for m in model.modules())
    return [seen[n] for n in names]


@pytest.mark.parametrize("name", sorted(CAPTURE_TABLE))
def test_capture_table(name):
    stages, shapes = CAPTURE_TABLE[name]
    model = build(name).eval()
    assert find_stages(model) == stages
    assert select_layers(model, "stages") == stages
    assert _shapes(name, model, stages) == shapes


@pytest.mark.parametrize("name", sorted(BLOCK_TABLE))
def test_blocks_are_the_blocks_inside_the_stages(name):
    model = build(name).eval()
    blocks = find_blocks(model)
    assert blocks == BLOCK_TABLE[name]
    assert select_layers(model, "blocks") == blocks and select_layers(model, "last") == blocks[-1:]
    stages = find_stages(model)
    # every block lies in a stage, except EfficientNet's block groups 3 and 5 that feature_info does not list
    outside = [b for b in blocks if not any(b == s or b.startswith(s + ".") for s in stages)]
    assert outside == ([f"blocks.{s}.{b}" for s, d in ((3, 3), (5, 4)) for b in range(d)] if name == "timm_efficientnet" else [])
    # every block's output is a sample matrix of its stage's width (the stage's last block is the stage's output;
    # transformers' Swin stage 0 ends with its patch merging: 4x fewer tokens, twice the width)
    if name == "hf_swin":
        assert _shapes(name, model, blocks) == [(512, 16), (128, 32)]
        return
    widths = dict(zip(stages, (d for _, d in CAPTURE_TABLE.get(name, (stages, [(0, 0)] * len(stages)))[1])))
    block_shapes = _shapes(name, model, blocks)
    for stage, width in widths.items():
        inside = [shape for b, shape in zip(blocks, block_shapes) if b == stage or b.startswith(stage + ".")]
        assert inside and inside[-1][1] == width, (stage, inside)


def test_timm_swin_nhwc_stages_use_the_last_axis():
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=16, window_size=7
    )
    out = {}
    capture = BlockCapture(model, find_stages(model), lambda layer, x: out.setdefault(layer.name, (x.shape, layer.axis)) and x)
    capture.install()
    with torch.no_grad(), capture.active():
        model(torch.randn(2, 3, 56, 56))
    assert out == {"layers.0": (torch.Size([2, 14, 14, 16]), 3), "layers.1": (torch.Size([2, 7, 7, 32]), 3)}


def test_hooks_do_nothing_outside_active():
    model = build("hf_vit").eval()
    calls = []
    capture = BlockCapture(model, find_blocks(model), lambda layer, x: calls.append(layer.name) or x)
    capture.install()
    model(pixel_values=example_input("hf_vit"))
    assert calls == []
    with capture.active():
        model(pixel_values=example_input("hf_vit"))
    assert calls == ["vit.layers.0", "vit.layers.1"]


def test_select_layers_last_and_patterns():
    model = build("hf_vit")
    assert select_layers(model, "last") == ["vit.layers.1"]
    assert select_layers(model, r"vit\.layers\.0, vit\.layernorm") == ["vit.layers.0", "vit.layernorm"]
    assert select_layers(model, [r"vit\.layers\.\d+"]) == ["vit.layers.0", "vit.layers.1"]


def test_unknown_pattern_lists_candidates():
    pattern = r"encoder\.block\.\d+"
    with pytest.raises(ValueError, match=re.escape(f"pattern '{pattern}' matches no module") + r".*vit\.layers\.0"):
        select_layers(build("hf_vit"), pattern)


def test_invalid_regex_is_reported():
    with pytest.raises(ValueError, match=r"pattern 'layers\[' is not a valid regular expression"):
        select_layers(build("hf_vit"), "layers[")


def test_model_without_blocks_asks_for_patterns():
    flat = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    assert find_blocks(flat) == []
    with pytest.raises(ValueError, match="no blocks were detected in Sequential.*vcreg_layers="):
        select_layers(flat, "blocks")


def test_feature_axis_prefers_channels_first_for_maps_and_last_for_tokens():
    conv = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16))
    assert feature_axis(conv, torch.randn(2, 16, 7, 7)) == 1
    assert feature_axis(conv, torch.randn(2, 7, 7, 16)) == 3
    assert feature_axis(nn.Linear(4, 8), torch.randn(2, 5, 8)) == 2
    assert feature_axis(nn.Linear(4, 8), torch.randn(2, 8)) == 1


def test_sample_rows_is_seeded_sorted_and_capped():
    a = sample_rows(1000, 100, seed=7, device=torch.device("cpu"))
    b = sample_rows(1000, 100, seed=7, device=torch.device("cpu"))
    c = sample_rows(1000, 100, seed=8, device=torch.device("cpu"))
    assert a.shape == (100,) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 100
    assert sample_rows(50, 100, seed=7, device=torch.device("cpu")) is None
    assert sample_rows(50, None, seed=7, device=torch.device("cpu")) is None


def test_patterns_with_commas_inside_quantifiers_and_groups_stay_whole():
    assert split_patterns(r"vit\.layers\.[0-9]{1,2}") == [r"vit\.layers\.[0-9]{1,2}"]
    assert split_patterns(r"a{1,2}, (b|c),[d,e] ,f\,g") == ["a{1,2}", "(b|c)", "[d,e]", r"f\,g"]
    assert split_patterns([r"x\.\d{1,2}, y", "z"]) == [r"x\.\d{1,2}", "y", "z"]
    model = build("hf_vit")
    assert select_layers(model, r"vit\.layers\.[0-9]{1,2}") == ["vit.layers.0", "vit.layers.1"]
    assert select_layers(model, [r"vit\.layers\.[0-9]{1,2}", "vit.layernorm"]) == [
        "vit.layers.0", "vit.layers.1", "vit.layernorm"]


def test_stages_and_last_keywords():
    model = build("timm_resnet")
    assert select_layers(model, "stages") == ["layer1", "layer2", "layer3", "layer4"]
    assert select_layers(model, ["stages"]) == select_layers(model, "stages")
    assert select_layers(model, "last") == ["layer4.1"]
    with pytest.raises(ValueError, match=r"the keyword 'blocks' cannot be combined with patterns"):
        select_layers(model, ["blocks", r"layer1"])


def test_structural_fallback_leaves_out_stems_and_heads():
    class Net(nn.Module):  # a bare nn.Module: no library metadata
        def __init__(self):
            super().__init__()
            block = lambda c: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())  # noqa: E731
            self.stem = nn.Sequential(block(4), block(4))
            self.body = nn.Sequential(block(4), block(4), block(4))
            self.head = nn.Linear(4, 2)

    from hf_vcreg.capture import layer_map

    found = layer_map(Net())
    assert found.source == "structure"
    # stem and body: sibling Sequentials of one class, found as stages; the stem is left out by name
    assert found.stages == ["body"]
    assert found.blocks == ["body.0", "body.1", "body.2"]
