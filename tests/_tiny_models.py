"""Tiny, randomly initialised vision models for tests (no downloads), keyed by name.

Each builder returns ``(model, example_input)``. Sizes are the smallest that keep every stage non-trivial.
"""

from __future__ import annotations

import timm
import torch
import transformers as T

IMG = 32


def _img(batch=2, size=IMG):
    return torch.randn(batch, 3, size, size)


def hf_vit(num_labels=3):
    cfg = T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
        patch_size=8, num_labels=num_labels,
    )
    return T.ViTForImageClassification(cfg)


def hf_deit(num_labels=3):
    cfg = T.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
        patch_size=8, num_labels=num_labels,
    )
    return T.DeiTForImageClassification(cfg)


def hf_beit(num_labels=3):
    cfg = T.BeitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
        patch_size=8, num_labels=num_labels, use_mean_pooling=True,
    )
    return T.BeitForImageClassification(cfg)


def hf_dinov2(num_labels=3):
    cfg = T.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=IMG, patch_size=8,
        num_labels=num_labels,
    )
    return T.Dinov2ForImageClassification(cfg)


def hf_swin(num_labels=3):
    cfg = T.SwinConfig(
        image_size=IMG, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=num_labels,
    )
    return T.SwinForImageClassification(cfg)


def hf_convnext(num_labels=3):
    cfg = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=num_labels)
    return T.ConvNextForImageClassification(cfg)


def hf_resnet(num_labels=3):
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels)
    return T.ResNetForImageClassification(cfg)


def hf_regnet(num_labels=3):
    cfg = T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=num_labels)
    return T.RegNetForImageClassification(cfg)


def hf_videomae(num_labels=3):
    cfg = T.VideoMAEConfig(
        image_size=IMG, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
    )
    return T.VideoMAEForVideoClassification(cfg)


def timm_vit(num_labels=3):
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=num_labels
    )


def timm_resnet(num_labels=3):
    return timm.create_model("resnet18", num_classes=num_labels)


def timm_convnext(num_labels=3):
    return timm.create_model("convnext_atto", num_classes=num_labels)


def timm_efficientnet(num_labels=3):
    return timm.create_model("efficientnet_b0", num_classes=num_labels)


def timm_regnet(num_labels=3):
    return timm.create_model("regnetx_002", num_classes=num_labels)


def timm_wrapper(num_labels=3):
    cfg = T.TimmWrapperConfig.from_dict(
        {"architecture": "resnet18", "num_classes": num_labels, "model_args": {}, "pretrained_cfg": {}}
    )
    cfg.num_labels = num_labels
    return T.TimmWrapperForImageClassification(cfg)


BUILDERS = {
    "hf_vit": hf_vit,
    "hf_deit": hf_deit,
    "hf_beit": hf_beit,
    "hf_dinov2": hf_dinov2,
    "hf_swin": hf_swin,
    "hf_convnext": hf_convnext,
    "hf_resnet": hf_resnet,
    "hf_regnet": hf_regnet,
    "hf_videomae": hf_videomae,
    "timm_vit": timm_vit,
    "timm_resnet": timm_resnet,
    "timm_convnext": timm_convnext,
    "timm_efficientnet": timm_efficientnet,
    "timm_regnet": timm_regnet,
    "timm_wrapper": timm_wrapper,
}


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    if name == "hf_videomae":
        return torch.randn(batch, 4, 3, IMG, IMG)
    return _img(batch)


def build(name: str, seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    return BUILDERS[name](num_labels)
