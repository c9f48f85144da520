"""Model family: which row of :data:`hf_vcreg.config.RECOMMENDED` applies to a model.

Part of step 1 of the data flow (capture -> penalty -> trainer -> publishing): it reads the model's structure and
nothing else. Two families:

* ``"transformer"``: the model's blocks (:func:`~hf_vcreg.capture.find_blocks`; the whole model when no block is
  found) contain an attention module: ViTs, hierarchical transformers (Swin), video transformers (VideoMAE),
  hybrids with attention stages (MobileViT, CoAtNet);
* ``"cnn"``: every other model: convolutional networks (ResNet, ConvNeXt, EfficientNet, RegNet), and also
  attention-free MLP models.

An attention module is a ``torch.nn.MultiheadAttention`` or a module whose class name contains ``"Attention"``,
the naming convention of ``transformers`` (``ViTAttention``, ``SwinAttention``, ``VideoMAESelfAttention``) and of
``timm`` (``Attention``, ``WindowAttention``). Channel gates that CNNs call attention are named otherwise
(squeeze-excitation ``SEModule`` / ``SqueezeExcite``, CBAM's ``ChannelAttn``, ResNeSt's ``SplitAttn``) and do not
count. The rule looks at the model's blocks, not at the layers ``vcreg_layers`` selects, so a model has one
family whatever is regularised (and a per-family layer default can be resolved before the selection), and an
attention-pooling head on a CNN (timm's ``*_clip`` ResNets) does not make it a transformer.
"""

from __future__ import annotations

from torch import nn

from .capture import find_blocks, unwrap_model

__all__ = ["FAMILIES", "is_attention", "model_family"]

FAMILIES = ("cnn", "transformer")
"""The families :func:`model_family` returns: the keys of :data:`hf_vcreg.config.RECOMMENDED`."""


def is_attention(module: nn.Module) -> bool:
    """``True`` for ``nn.MultiheadAttention`` and for modules whose class name contains ``"Attention"``."""
    return isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__


def model_family(model: nn.Module) -> str:
    """``"transformer"`` when the model's blocks contain an attention module, else ``"cnn"`` (module docstring).

    ``model`` may be wrapped (DDP, ``torch.compile``); a ``transformers`` ``TimmWrapper`` model is read through
    its ``timm_model`` like any other submodule.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    roots = [modules[name] for name in find_blocks(model)] or [model]
    attention = any(is_attention(m) for root in roots for m in root.modules())
    return "transformer" if attention else "cnn"
