"""Model families of the evidence protocol and where the penalty can go in each (placements).

A :class:`Family` builds a randomly initialised classifier for 28x28 grey images, names the module whose output
holds the penultimate features (the input of the classifier, after pooling), its training hyper-parameters, and
its placements: module names computed from the built model, passed to ``VCRegConfig(vcreg_layers=...)`` as exact
(escaped) patterns, so the protocol does not depend on the library's layer keywords.

- ``blocks``: every residual / transformer block;
- ``stages``: the stage outputs (CNNs only: for a plain ViT they are the blocks);
- ``last``: the final block only;
- ``subset``: the second half of the blocks (ViTs only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FAMILIES", "Family", "MoonsMLP", "PLACEMENTS", "layers_pattern"]

PLACEMENTS = ("blocks", "stages", "last", "subset")


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _cls_token(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: key in `FAMILIES` and in the results.
        source: ``"transformers"`` or ``"timm"`` (timm models are bare ``nn.Module`` classifiers).
        config: keyword arguments of the builder (recorded in the results).
        feature_module: the module whose output, after ``pool``, is the penultimate feature vector.
        pool: ``(B, ...) -> (B, d)`` applied to that output (flatten, CLS token, ...).
        blocks: regular expression matching every block's name in full.
        stages: regular expression matching every stage's name in full, or None (no stages apart from blocks);
            skipped when the stages are the blocks (one block per stage).
        subset: whether the ``subset`` placement (second half of the blocks) exists.
        learning_rate: peak AdamW learning rate (cosine schedule with the profile's warm-up).
        batch_size: training batch size.
    """

    name: str
    source: str
    config: dict
    builder: Callable[..., nn.Module]
    feature_module: str
    pool: Callable[[torch.Tensor], torch.Tensor]
    blocks: str
    stages: str | None
    subset: bool
    learning_rate: float
    batch_size: int

    def build(self, num_labels: int, seed: int) -> nn.Module:
        """A randomly initialised classifier with ``num_labels`` outputs; ``seed`` fixes the initialisation."""
        from transformers import set_seed

        set_seed(seed)
        return self.builder(num_labels=num_labels, **self.config)

    def placements(self, model: nn.Module) -> dict[str, list[str]]:
        """``{placement: module names}`` of ``model`` (in forward order) for the placements this family has."""
        names = [n for n, _ in model.named_modules() if n]
        blocks = [n for n in names if re.fullmatch(self.blocks, n)]
        if len(blocks) < 2:
            raise ValueError(f"family {self.name!r}: pattern {self.blocks!r} matches {blocks}; expected every block")
        out = {"blocks": blocks}
        if self.stages is not None:
            stages = [n for n in names if re.fullmatch(self.stages, n)]
            if any(sum(b.startswith(f"{st}.") for b in blocks) > 1 for st in stages):
                out["stages"] = stages  # else one block per stage: the blocks' outputs, no placement of its own
        out["last"] = blocks[-1:]
        if self.subset:
            out["subset"] = blocks[len(blocks) // 2 :]
        return out


def layers_pattern(names: list[str]) -> str:
    """``vcreg_layers`` value selecting exactly ``names``: escaped names joined by commas."""
    return ",".join(re.escape(n) for n in names)


# ---------------------------------------------------------------------------------------------- builders
def _hf_resnet(num_labels: int, **config) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(num_labels=num_labels, **config))


def _hf_vit(num_labels: int, **config) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(num_labels=num_labels, **config))


def _timm_resnet(num_labels: int, layers: list[int], channels: list[int], **config) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers, num_classes=num_labels, channels=tuple(channels), **config)


def _timm_vit(num_labels: int, **config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(num_classes=num_labels, **config)


FAMILIES: dict[str, Family] = {
    "cnn": Family(
        name="cnn",
        source="transformers",
        config=dict(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2],
                    layer_type="basic"),
        builder=_hf_resnet,
        feature_module="resnet.pooler",
        pool=_flatten,
        blocks=r"resnet\.encoder\.stages\.\d+\.layers\.\d+",
        stages=r"resnet\.encoder\.stages\.\d+",
        subset=False,
        learning_rate=4e-3,
        batch_size=256,
    ),
    "vit": Family(
        name="vit",
        source="transformers",
        config=dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
        builder=_hf_vit,
        feature_module="vit.layernorm",
        pool=_cls_token,
        blocks=r"vit\.layers\.\d+",
        stages=None,
        subset=True,
        learning_rate=2e-3,
        batch_size=128,
    ),
    "timm_cnn": Family(
        name="timm_cnn",
        source="timm",
        config=dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], in_chans=1, stem_width=16),
        builder=_timm_resnet,
        feature_module="global_pool",
        pool=_flatten,
        blocks=r"layer\d\.\d+",
        stages=r"layer\d",
        subset=False,
        learning_rate=4e-3,
        batch_size=256,
    ),
    "timm_vit": Family(
        name="timm_vit",
        source="timm",
        config=dict(img_size=28, patch_size=7, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        builder=_timm_vit,
        feature_module="fc_norm",  # after the model's own token pooling: (B, D)
        pool=_flatten,
        blocks=r"blocks\.\d+",
        stages=None,
        subset=True,
        learning_rate=2e-3,
        batch_size=128,
    ),
}


class MoonsMLP(nn.Module):
    """3-layer MLP for 2-D points: two hidden Linear+ReLU blocks (``hidden.0``, ``hidden.1``) and a linear head."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden = nn.ModuleList(
            [nn.Sequential(nn.Linear(2, width), nn.ReLU()), nn.Sequential(nn.Linear(width, width), nn.ReLU())]
        )
        self.head = nn.Linear(width, 2)

    def forward(self, pixel_values):
        h = pixel_values
        for block in self.hidden:
            h = block(h)
        return self.head(h)
