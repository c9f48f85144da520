"""Capture: which modules of a model are "blocks", and how a block's output becomes an ``(n, d)`` sample matrix.

Step 1 of the data flow (capture -> penalty -> trainer -> publishing). Nothing here knows about VCReg's
formulas: this file finds blocks, installs forward hooks on them and describes each output tensor as a
sample matrix (which axis holds the features, which rows are used).

Blocks are found structurally, never by a hard-coded path (``transformers`` 5.x renamed ``vit.encoder.layer``
to ``vit.layers``):

* a ``nn.ModuleList`` / ``nn.Sequential`` whose children (at least two) all share one class and each hold at
  least two parameterised modules is a list of blocks (ViT layers, ConvNeXt / ResNet / Swin stages,
  EfficientNet stages, timm ``blocks``);
* sibling attributes of one class, each holding at least two parameterised modules (and, if they are
  containers, homogeneous ones), are blocks too (timm ResNet ``layer1..layer4``, timm RegNet ``s1..s4``);
* the search stops at the first (outermost) level found on each path of the module tree, so a hierarchical
  CNN contributes its stages and a plain transformer its layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "BlockCapture",
    "CapturedLayer",
    "feature_axis",
    "find_blocks",
    "sample_rows",
    "samples_view",
    "select_layers",
    "unwrap_model",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel`` (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_composite(module: nn.Module) -> bool:
    """A block holds at least two parameterised modules (attention + MLP, conv + norm, ...)."""
    count = 0
    for m in module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            count += 1
            if count >= 2:
                return True
    return False


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _homogeneous_children(module: nn.Module) -> bool:
    """A ModuleList / Sequential of >= 2 children, all of one class, all composite."""
    children = list(module.children())
    return (
        _is_container(module)
        and len(children) >= 2
        and len({type(c) for c in children}) == 1
        and all(_is_composite(c) for c in children)
    )


def _block_groups(module: nn.Module) -> list[list[str]]:
    """Groups of child names of ``module`` that are blocks (see the module docstring)."""
    if _homogeneous_children(module):
        return [[name for name, _ in module.named_children()]]
    by_class: dict[type, list[str]] = {}
    for name, child in module.named_children():
        by_class.setdefault(type(child), []).append(name)
    groups = []
    for names in by_class.values():
        members = [getattr(module, n) for n in names]
        if len(names) >= 2 and all(
            _is_composite(m) and (_homogeneous_children(m) or not _is_container(m)) for m in members
        ):
            groups.append(names)
    return groups


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks, outermost level first found, in forward (registration) order.

    Returns an empty list when nothing block-like exists (e.g. a flat ``nn.Sequential`` of layers); callers
    then ask the user for explicit patterns.
    """
    model = unwrap_model(model)
    found: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        groups = _block_groups(module)
        in_group = {name for group in groups for name in group}
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if name in in_group:
                found.append(qualified)
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return found


def _candidate_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Composite modules a user may want to name in a pattern (for error messages)."""
    names = [n for n, m in unwrap_model(model).named_modules() if n and _is_composite(m)]
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def select_layers(model: nn.Module, layers: str | Sequence[str] = "blocks") -> list[str]:
    """Resolve a layer selection to module names.

    Args:
        model: the model (wrappers are stripped).
        layers: ``"blocks"`` (every block, see :func:`find_blocks`), ``"last"`` (the final block only), or
            regular expressions (a comma-separated string or a list) matched in full against module names,
            e.g. ``"vit\\.layers\\.(3|7|11)"``.

    Raises:
        ValueError: no block is detected, or a pattern matches no module; the message lists candidates.
    """
    model = unwrap_model(model)
    if isinstance(layers, str) and layers in ("blocks", "last"):
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(
                f"vcreg_layers={layers!r}: no blocks were detected in {type(model).__name__} (no list of repeated "
                "composite modules). Name the modules to regularise with regular expressions instead, e.g. "
                f"vcreg_layers='features\\.\\d+'. Candidates: {_candidate_names(model)}"
            )
        return blocks if layers == "blocks" else blocks[-1:]
    patterns = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    if not patterns:
        raise ValueError(f"vcreg_layers={layers!r} is empty: use 'blocks', 'last' or module-name patterns.")
    names = [n for n, _ in model.named_modules() if n]
    selected: list[str] = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"vcreg_layers pattern '{pattern}' is not a valid regular expression: {err}") from err
        matched = [n for n in names if regex.fullmatch(n)]
        if not matched:
            blocks = find_blocks(model)
            use_blocks = "'blocks' (every detected block) or " if blocks else ""
            raise ValueError(
                f"vcreg_layers={layers!r} is invalid: pattern '{pattern}' matches no module of "
                f"{type(model).__name__} (patterns are matched in full against module names). Fix: use {use_blocks}"
                f"a regular expression that matches one of these module names in full. Detected blocks: {blocks}; "
                f"other candidates: {_candidate_names(model)}"
            )
        selected.extend(m for m in matched if m not in selected)
    order = {n: i for i, n in enumerate(names)}
    return sorted(selected, key=order.__getitem__)


def _module_widths(module: nn.Module) -> set[int]:
    """Feature widths a module can emit: conv out channels, linear out features, norm widths."""
    widths = set()
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths.add(m.out_channels)
        elif isinstance(m, nn.Linear):
            widths.add(m.out_features)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            widths.add(getattr(m, "num_features", None) or m.num_channels)
        elif isinstance(m, nn.LayerNorm):
            widths.add(m.normalized_shape[-1])
    return widths


def feature_axis(module: nn.Module, x: torch.Tensor) -> int:
    """The axis of ``x`` (a block output) that holds features; every other axis indexes samples.

    ``(B, D)`` and token sequences ``(B, N, D)`` use the last axis. Maps of 4 or more dimensions are
    channels-first ``(B, C, H, W)`` / ``(B, C, T, H, W)`` unless the block's widths (conv channels, linear
    outputs, norm sizes) say the last axis is the feature axis (timm Swin's NHWC stages).
    """
    if x.dim() <= 2:
        return x.dim() - 1
    widths = _module_widths(module)
    last, first = x.shape[-1], x.shape[1]
    if x.dim() == 3:
        return 1 if (first in widths and last not in widths) else 2
    return x.dim() - 1 if (last in widths and first not in widths) else 1


def samples_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` with the feature axis moved last: a view of shape ``(*sample_dims, d)`` (no copy)."""
    return x.movedim(axis, -1)


def sample_rows(n: int, max_rows: int | None, seed: int, device: torch.device) -> torch.Tensor | None:
    """Indices of the rows used for the statistics: ``None`` (all rows) or a random subset of ``max_rows``.

    The subset is a pure function of ``seed`` so that a resumed run draws the same rows as an uninterrupted one.
    """
    if max_rows is None or n <= max_rows:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:max_rows].sort().values.to(device)


@dataclass
class CapturedLayer:
    """One regularised module: its name, index and (after the first forward) its feature axis."""

    name: str
    index: int
    module: nn.Module
    axis: int | None = None


def _split_output(output) -> tuple[torch.Tensor | None, Callable]:
    """The representation tensor inside a block's output and a function that puts a replacement back."""
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):

        def put_first(new):
            rest = list(output[1:])
            if isinstance(output, list):
                return [new, *rest]
            return (new, *rest) if type(output) is tuple else type(output)(new, *rest)  # namedtuple

        return output[0], put_first
    if isinstance(output, dict):
        for key, value in output.items():
            if isinstance(value, torch.Tensor):

                def put(new, key=key):
                    return output.__class__(**{**output, key: new})

                return value, put
    return None, lambda new: new


@dataclass
class BlockCapture:
    """Forward hooks on the selected modules; while :meth:`active`, each output goes through ``transform``.

    ``transform(layer, tensor) -> tensor`` may return the tensor unchanged (explicit-loss mode records it) or
    a new tensor (the identity-forward autograd function of the gradient mode). Outside :meth:`active` the
    hooks do nothing, so plain ``model(x)`` calls are unaffected, with one exception: a forward that runs inside
    a backward pass is the recomputation of a non-reentrant activation checkpoint that encloses the hooked module
    (timm's ``set_grad_checkpointing``, accelerate's FSDP ``activation_checkpointing``). It must save the same
    tensors as the original forward did, so the hook applies ``transform`` again, with :attr:`replaying` set (the
    caller keeps nothing from it: the original forward's graph is the one the backward uses).
    """

    model: nn.Module
    names: list[str]
    transform: Callable[[CapturedLayer, torch.Tensor], torch.Tensor]
    layers: list[CapturedLayer] = field(init=False)
    _handles: list = field(init=False, default_factory=list)
    _active: bool = field(init=False, default=False)
    replaying: bool = field(init=False, default=False)

    def __post_init__(self):
        modules = dict(unwrap_model(self.model).named_modules())
        self.layers = [CapturedLayer(name, i, modules[name]) for i, name in enumerate(self.names)]

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._make_hook(layer)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: CapturedLayer):
        def hook(module, args, output):
            # -1: no backward is running here (torch._C._current_graph_task_id, as DeepSpeed's ZeRO-3 uses it)
            replay = not self._active and torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1
            if not (self._active or replay):
                return None
            tensor, put = _split_output(output)
            if tensor is None or not tensor.is_floating_point():
                return None
            if layer.axis is None:
                layer.axis = feature_axis(module, tensor)
            self.replaying = replay
            try:
                return put(self.transform(layer, tensor))
            finally:
                self.replaying = False

        return hook

    def active(self) -> "_Active":
        return _Active(self)


class _Active:
    def __init__(self, capture: BlockCapture):
        self.capture = capture

    def __enter__(self):
        self.capture._active = True
        return self.capture

    def __exit__(self, *exc):
        self.capture._active = False
        return False
