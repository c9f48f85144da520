"""Capture: which modules of a model are its stages and blocks, and how an output becomes an ``(n, d)`` sample matrix.

Step 1 of the data flow (capture -> penalty -> trainer -> publishing). Nothing here knows about VCReg's
formulas: this file finds the layers to regularise, installs forward hooks on them and describes each output
tensor as a sample matrix (which axis holds the features, which rows are used).

Layers are found from the libraries' own metadata first (:func:`layer_map`), never by a hard-coded path:

* timm: ``feature_info`` (one entry per feature level), the stem entries left out (timm's ``group_matcher`` stem,
  ``stem*`` / ``act1`` / ``conv_stem`` names) and a final conv / norm / head entry too;
* transformers: the modules whose outputs are the model's ``hidden_states``, traced on a meta-device twin of the
  model (else the class its ``_can_record_outputs`` names), the embedding output left out.

The structural search is the fallback (a bare ``nn.Module``, a timm model without a usable ``feature_info``, a
transformers model whose twin cannot run):

* a ``nn.ModuleList`` / ``nn.Sequential`` whose children (at least two) all share one class and each hold at
  least two parameterised modules is a list of blocks (ViT layers, ConvNeXt / ResNet / Swin stages,
  EfficientNet stages, timm ``blocks``);
* sibling attributes of one class, each holding at least two parameterised modules (and, if they are
  containers, homogeneous ones), are blocks too (timm ResNet ``layer1..layer4``, timm RegNet ``s1..s4``);
* the search stops at the first (outermost) level found on each path of the module tree, and drops stems, patch
  embeddings, final norms and heads by name.

The stages found either way are ``vcreg_layers="stages"``; the blocks inside them (:func:`_stage_blocks`) are
``"blocks"``. ``docs/architectures.md`` lists both for every timm module family and transformers vision class.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "BlockCapture",
    "CapturedLayer",
    "feature_axis",
    "find_blocks",
    "find_stages",
    "layer_map",
    "layer_widths",
    "LayerMap",
    "split_patterns",
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


def _structural_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the outermost repeated composite modules (the module docstring's structural rules)."""
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


# A module is a stem / embedding / head / final norm when one component of its name matches _NOT_A_STAGE, or (timm
# feature_info entries) when its top-level name is a single layer of the model (``conv1``, ``bn1``, ``act1``, ``norm``).
_NOT_A_STAGE = re.compile(
    r"(?i).*(stem|embed|pre_layrnorm|pre_layernorm|head|classifier|pooler|pre_logits|fc_norm|final_conv"
    r"|layernorm$|^norm\d*$|^layer_norm$).*"
)
_EMBEDDING_CLASS = re.compile(r"Embed|Stem")
"""Class names of patch embeddings and stems (``PatchEmbed``, ``SwiftFormerEmbeddings``, ``ConvStem``)."""
_TOP_LEVEL_LAYER = re.compile(r"(?i)(conv|bn|act|norm|relu|pool|maxpool|fc|global_pool|aggregate)[\w]*")


def _is_stem_or_head(name: str, top_level_layers: bool = False) -> bool:
    """``name`` is a stem, embedding, final norm or head; ``top_level_layers``: also any top-level single layer."""
    parts = name.split(".")
    return (
        not name
        or any(_NOT_A_STAGE.fullmatch(p) for p in parts)
        or (top_level_layers and bool(_TOP_LEVEL_LAYER.fullmatch(parts[0])))
        or parts[-1] in ("norm", "layernorm", "layer_norm", "final_layernorm", "post_layernorm")
    )


def _parameter_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if next(m.parameters(recurse=False), None) is not None)


@dataclass
class LayerMap:
    """The model's stages and blocks, and where they were read from.

    ``source`` is ``"timm feature_info"``, ``"transformers hidden_states"``, ``"transformers _can_record_outputs"``
    or ``"structure"`` (the fallback search of the module docstring).
    """

    stages: list[str]
    blocks: list[str]
    source: str
    widths: dict[str, int] = field(default_factory=dict)
    """Feature width of the layers whose width the metadata gives: timm ``feature_info`` channels (``num_chs``),
    transformers ``hidden_sizes`` per stage or ``hidden_size`` of an isotropic model (ViT)."""


def _is_timm(module: nn.Module) -> bool:
    return (hasattr(module, "pretrained_cfg") or hasattr(module, "default_cfg")) and type(module).__module__.startswith(
        "timm."
    )


def _resolve(name: str, names: dict[str, nn.Module]) -> str | None:
    """The module ``name`` of a timm ``feature_info`` entry means: ``name`` itself, else the one module whose name
    ends with it (gemma4 ``blocks.0`` for ``encoder.blocks.0``), else the one whose name extends each non-numeric
    component (twins ``block.0`` for ``blocks.0``). ``None`` when that is ambiguous or absent."""
    if name in names:
        return name
    for regex in (
        re.compile(r"(?:[\w.]*\.)?" + re.escape(name)),
        re.compile(r"\.".join(re.escape(p) + ("" if p.isdigit() else r"\w*") for p in name.split("."))),
    ):
        matches = [n for n in names if regex.fullmatch(n)]
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None


def _timm_stem_matcher(model: nn.Module) -> Callable[[str], bool]:
    try:
        stem = model.group_matcher(coarse=True).get("stem")
    except Exception:  # noqa: BLE001 - a few timm models have no (working) group_matcher
        return lambda name: False
    if isinstance(stem, str):
        regex = re.compile(stem)
        return lambda name: bool(regex.match(name) or regex.match(name + "."))
    return lambda name: False


def _timm_stages(model: nn.Module) -> tuple[list[str], dict[str, int]] | None:
    """The non-stem ``feature_info`` modules of a timm model and their channels (``num_chs``)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info:
        return None
    names = dict(model.named_modules())
    is_stem = _timm_stem_matcher(model)
    stages: list[str] = []
    widths: dict[str, int | None] = {}
    for entry in info:
        raw = entry.get("module") if isinstance(entry, dict) else None
        name = _resolve(raw, names) if raw else None
        if name is None or is_stem(name) or _is_stem_or_head(name, top_level_layers=True):
            continue
        chs = entry.get("num_chs")
        if name in stages:  # listed twice (CoaT's parallel_blocks) with two widths: no width
            widths[name] = widths[name] if widths[name] == chs else None
            continue
        stages.append(name)
        widths[name] = chs if isinstance(chs, int) else None
    return (stages, {k: v for k, v in widths.items() if v}) if stages else None


def _pixel_input(model: nn.Module, config) -> tuple[str, tuple[int, ...]] | None:
    """The pixel argument of ``model.forward`` and a batch-2 shape for it read from ``config``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    key = next((k for k in ("pixel_values", "pixel_values_videos") if k in params), None)
    if key is None:
        return None
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or getattr(config, "image_size", None) or 224
    if isinstance(size, dict):
        size = (size.get("height", 224), size.get("width", 224))
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = getattr(vision, "num_channels", 3)
    frames = getattr(vision, "num_frames", None) or getattr(config, "num_frames", None)
    if key == "pixel_values_videos" or frames:
        return key, (2, frames or 8, channels, *size[:2])
    return key, (2, channels, *size[:2])


def _hidden_state_modules(model: nn.Module) -> list[str] | None:
    """Names of the modules whose outputs are ``model``'s ``hidden_states``, traced on a meta-device twin.

    The twin (``type(model)(model.config)`` built on the meta device: no memory, no compute) runs one forward with
    ``output_hidden_states=True``. Each hidden state is the output tensor of a chain of nested modules (a layer's
    last op, the layer, the stage returning it unchanged, ...); the module recorded is the outermost one of the
    chain that contains no other hidden state's producer (the stage, not the encoder that returns the last one).
    A first entry at another depth than the others is the embedding output and is left out. ``None`` when
    the twin cannot be built or run (inputs other than pixels, data-dependent shapes), or when fewer than all but
    two hidden states are the output of a module (the model reshapes them first: the caller falls back).
    """
    config = getattr(model, "config", None)
    spec = _pixel_input(model, config) if config is not None else None
    if spec is None:
        return None
    key, shape = spec
    try:
        with torch.device("meta"):
            twin = type(model)(config)
        twin.eval()
        chains: dict[int, list[str]] = {}
        keep: list[torch.Tensor] = []  # a freed tensor's id would be reused
        handles = []
        for name, module in twin.named_modules():

            def hook(mod, args, output, name=name):
                tensor, _ = _split_output(output)
                if tensor is not None:
                    keep.append(tensor)
                    chains.setdefault(id(tensor), []).append(name)  # hooks run innermost first

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                out = twin(**{key: torch.empty(shape, device="meta")}, output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        hidden = getattr(out, "hidden_states", None)
    except Exception:  # noqa: BLE001 - any failure means "no trace": the caller falls back
        return None
    if not hidden:
        return None
    found = [chains[id(h)] for h in hidden if id(h) in chains]
    if len(found) < max(len(hidden) - 2, 2):
        return None
    inner = [chain[0] for chain in found]

    def contains(outer: str, other: str) -> bool:
        return outer == "" or other.startswith(outer + ".")

    names = []
    for i, chain in enumerate(found):
        others = [n for j, n in enumerate(inner) if j != i]
        names.append(next(n for n in reversed(chain) if n == chain[0] or not any(contains(n, o) for o in others)))
    depths = [n.count(".") for n in names[1:]]
    if depths and names[0].count(".") != max(set(depths), key=depths.count):
        names = names[1:]  # the embedding output (``vit.embeddings``, ``encoder.convolution``)
    return names


def _recorded_class_modules(model: nn.Module) -> list[str] | None:
    """Modules of the class that ``transformers`` records as ``hidden_states`` (``_can_record_outputs``)."""
    target = (getattr(type(model), "_can_record_outputs", None) or {}).get("hidden_states")
    target = getattr(target, "target_class", target)
    if not isinstance(target, type):
        return None
    return [n for n, m in model.named_modules() if type(m) is target] or None


def _transformers_stages(model: nn.Module) -> tuple[list[str], str] | None:
    traced = _hidden_state_modules(model)
    source = "transformers hidden_states"
    if not traced:
        traced, source = _recorded_class_modules(model), "transformers _can_record_outputs"
    if not traced:
        return None
    names = []
    for name in traced:
        if name not in names and not _is_stem_or_head(name):
            names.append(name)
    # an ancestor of another producer (the root returning its last layer's tensor, an encoder's final norm) is not a stage
    names = [n for n in names if not any(o != n and (n == "" or o.startswith(n + ".")) for o in names)]
    return (names, source) if names else None


_BLOCK_LISTS = ("blocks", "layers", "layer", "block", "transformer_encoder", "transformer_blocks")
"""Names of the child containers that hold a stage's blocks (timm, transformers)."""


def _stage_blocks(stage: nn.Module) -> list[str]:
    """Relative names of the blocks inside a stage: the composite members of its list of blocks, else ``[""]``.

    A container stage (``nn.Sequential`` / ``nn.ModuleList``) holds its blocks directly (timm ResNet ``layer1``,
    EfficientNet ``blocks.0``); other stages hold them in a container child named like :data:`_BLOCK_LISTS`
    (``blocks`` of timm ConvNeXt and Swin stages, ``layers`` of transformers ResNet / ConvNeXt stages), or as
    sibling attributes of one class (timm RegNet ``b1``, ``b2``). A stage with one block, or made of plain layers
    (VGG), is its own block.
    """

    def members(container: nn.Module) -> list[str]:
        return [n for n, c in container.named_children() if _is_composite(c)]

    if _is_container(stage):
        kids = members(stage)
        if len(kids) >= 2:
            return kids
        if len(kids) == 1 and _is_container(getattr(stage, kids[0])):
            return [f"{kids[0]}.{n}" if n else kids[0] for n in _stage_blocks(getattr(stage, kids[0]))]
        return [""]
    for name in _BLOCK_LISTS:
        child = getattr(stage, name, None)
        if isinstance(child, nn.Module) and _is_container(child) and members(child):
            return [f"{name}.{k}" for k in members(child)]
    for group in _block_groups(stage):  # sibling attributes of one class (b1, b2, ...), not parallel branches
        if (len(group) >= 2 and not any(n.startswith("branch") for n in group)
                and all(_parameter_count(getattr(stage, n)) >= 4 for n in group)):
            return group
    return [""]


def _with_siblings(model: nn.Module, stages: list[str], is_stem: Callable[[str], bool]) -> list[str]:
    """``stages`` plus their composite siblings when they are all numbered members of one container.

    timm lists one block per feature level (EfficientNet ``blocks.1, blocks.2, blocks.4``; Hiera ``blocks.2``,
    ``blocks.9``), and transformers' BEiT reports its last layer only through the final norm: every composite,
    non-stem member of that container holds blocks.
    """
    parents = {s.rpartition(".")[0] for s in stages}
    if len(parents) != 1 or not all(s.rpartition(".")[2].isdigit() for s in stages):
        return stages
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    if not _is_container(container):
        return stages
    out = []
    for name, child in container.named_children():
        qualified = f"{parent}.{name}" if parent else name
        if qualified in stages or (name.isdigit() and _is_composite(child) and not is_stem(qualified)):
            out.append(qualified)
    return out


def layer_map(model: nn.Module) -> LayerMap:
    """The stages and blocks of ``model``: library metadata first, the structural search second.

    * a timm model (or one inside the model, such as ``TimmWrapper``'s ``timm_model``): the ``feature_info``
      modules, without the stem entries (timm's ``group_matcher`` stem, ``stem*`` / ``act1`` / ``conv_stem``) and
      without a final conv / norm / head entry;
    * a transformers ``PreTrainedModel``: the modules whose outputs are its ``hidden_states`` (traced on a meta-device
      twin, else the class listed in ``_can_record_outputs``), without the embedding entry;
    * anything else: the structural search of the module docstring.

    Blocks are the blocks inside each stage (:func:`_stage_blocks`); a stage without blocks is its own block.
    Stems, patch embeddings, final norms and heads are never selected. The result is cached per model while its
    module tree is unchanged (the trainer asks three times: family, selection, widths).
    """
    model = unwrap_model(model)
    signature = tuple((name, id(module)) for name, module in model.named_modules())
    cached = _LAYER_MAPS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    result = _layer_map(model)
    try:
        _LAYER_MAPS[model] = (signature, result)
    except TypeError:  # pragma: no cover - a module that cannot be weakly referenced
        pass
    return result


_LAYER_MAPS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LayerMap]]" = weakref.WeakKeyDictionary()


def _layer_map(model: nn.Module) -> LayerMap:
    found = None
    widths: dict[str, int] = {}
    for prefix, module in model.named_modules():
        if _is_timm(module):
            result = _timm_stages(module)
            if result:
                stages, widths = result
                members = _with_siblings(module, stages, _timm_stem_matcher(module))
                found = (stages, members, "timm feature_info", prefix, module)
            break
    if found is None:
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedModel = ()
        for prefix, module in model.named_modules():
            if isinstance(module, PreTrainedModel):
                result = _transformers_stages(module)
                if result:  # Beit's last hidden state is the final norm's output: its last layer is a sibling
                    stages = _with_siblings(module, result[0], lambda name: _is_stem_or_head(name))
                    found = (stages, stages, result[1], prefix, module)
                    widths = _config_widths(module, stages)
                break
    if found is None:
        stages = [n for n in _structural_blocks(model) if not _is_stem_or_head(n)]
        found = (stages, stages, "structure", "", model)
    stages, members, source, prefix, root = found

    def not_embedding(name: str) -> bool:  # SwiftFormer's downsampling SwiftFormerEmbeddings between its stages
        return not _EMBEDDING_CLASS.search(type(root.get_submodule(name)).__name__)

    stages, members = [s for s in stages if not_embedding(s)], [m for m in members if not_embedding(m)]

    def called(name: str) -> str:  # a ModuleList never runs (its owner iterates it): its last member's output it is
        module = root.get_submodule(name)
        while isinstance(module, nn.ModuleList) and len(module):
            name = f"{name}.{len(module) - 1}"
            module = module[-1]
        return name

    blocks = []
    for member in members:
        for rel in _stage_blocks(root.get_submodule(member)):
            blocks.append(f"{member}.{rel}" if rel else member)

    def qualify(names: list[str]) -> list[str]:
        return [f"{prefix}.{n}" if prefix else n for n in names]

    widths = {called(k): v for k, v in widths.items()}
    stages = [called(s) for s in stages]
    widths = dict(zip(qualify(list(widths)), widths.values()))
    return LayerMap(stages=qualify(stages), blocks=qualify(blocks), source=source, widths=widths)


def _config_widths(model: nn.Module, stages: list[str]) -> dict[str, int]:
    """Stage widths from a transformers config: ``hidden_sizes`` (one per stage), else the ``hidden_size`` of an
    isotropic model (one without ``depths`` / ``hidden_sizes`` / ``embed_dim``, whose stages all have that width)."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    sizes = getattr(config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and len(sizes) == len(stages) and all(isinstance(s, int) for s in sizes):
        return dict(zip(stages, sizes))
    size = getattr(config, "hidden_size", None)
    hierarchical = any(getattr(config, k, None) is not None for k in ("depths", "hidden_sizes", "embed_dim"))
    if isinstance(size, int) and not hierarchical:
        return dict.fromkeys(stages, size)
    return {}


def layer_widths(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """The metadata's feature width of each of ``names`` that has one (stages; blocks that are stages)."""
    widths = layer_map(model).widths
    return {n: widths[n] for n in names if n in widths}


def find_stages(model: nn.Module) -> list[str]:
    """Qualified names of the model's stages (feature levels / hidden-state layers), see :func:`layer_map`."""
    return list(layer_map(model).stages)


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks in forward order, see :func:`layer_map`.

    Returns an empty list when nothing block-like exists (e.g. a flat ``nn.Sequential`` of layers); callers
    then ask the user for explicit patterns.
    """
    return list(layer_map(model).blocks)


def _candidate_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Composite modules a user may want to name in a pattern (for error messages)."""
    names = [n for n, m in unwrap_model(model).named_modules() if n and _is_composite(m)]
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


KEYWORDS = ("blocks", "stages", "last")
"""The ``vcreg_layers`` keywords: every block, every stage, the last block."""


def split_patterns(value: str | Sequence[str]) -> list[str]:
    """``vcreg_layers`` as a list of stripped, non-empty entries.

    A string is split at its top-level commas only: a comma inside ``{}``, ``[]`` or ``()`` belongs to the pattern
    (``vit\\.layers\\.[0-9]{1,2}`` stays one pattern). So is every entry of a list. Module names never contain
    commas, so a top-level comma cannot be part of a useful pattern.
    """
    if not isinstance(value, str):
        return [p for entry in value if isinstance(entry, str) for p in split_patterns(entry)]
    parts, depth, current, escaped = [], 0, [], False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def select_layers(model: nn.Module, layers: str | Sequence[str] = "blocks") -> list[str]:
    """Resolve a layer selection to module names.

    Args:
        model: the model (wrappers are stripped).
        layers: ``"blocks"`` (every block inside the stages, see :func:`layer_map`), ``"stages"`` (every stage /
            feature level), ``"last"`` (the final block only), or regular expressions (a list, or a string split at
            its top-level commas) matched in full against module names, e.g. ``"vit\\.layers\\.(3|7|11)"``.

    Raises:
        ValueError: no block is detected, or a pattern matches no module; the message lists candidates.
    """
    model = unwrap_model(model)
    patterns = split_patterns(layers)
    if len(patterns) == 1 and patterns[0] in KEYWORDS:
        keyword = patterns[0]
        found = layer_map(model)
        names = list(found.stages if keyword == "stages" else found.blocks)  # a copy: the map is cached
        if not names:
            raise ValueError(
                f"vcreg_layers={layers!r}: no blocks were detected in {type(model).__name__} (no list of repeated "
                "composite modules). Name the modules to regularise with regular expressions instead, e.g. "
                f"vcreg_layers='features\\.\\d+'. Candidates: {_candidate_names(model)}"
            )
        return names[-1:] if keyword == "last" else names
    if not patterns:
        raise ValueError(f"vcreg_layers={layers!r} is empty: use 'blocks', 'stages', 'last' or module-name patterns.")
    names = [n for n, _ in model.named_modules() if n]
    selected: list[str] = []
    for pattern in patterns:
        if pattern in KEYWORDS:
            raise ValueError(
                f"vcreg_layers={layers!r} is invalid: the keyword {pattern!r} cannot be combined with patterns. Fix: "
                f"use {pattern!r} alone, or name every module with regular expressions."
            )
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"vcreg_layers pattern '{pattern}' is not a valid regular expression: {err}. Fix: escape literal "
                "dots and brackets, e.g. 'vit\\.layers\\.(3|7)'."
            ) from err
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


def feature_axis(module: nn.Module, x: torch.Tensor, width: int | None = None) -> int:
    """The axis of ``x`` (a block output) that holds features; every other axis indexes samples.

    ``width`` (the metadata's feature width: timm ``feature_info`` channels, transformers ``hidden_sizes``) decides
    when exactly one of axis 1 and the last axis has that size. Otherwise: ``(B, D)`` and token sequences
    ``(B, N, D)`` use the last axis; maps of 4 or more dimensions are channels-first ``(B, C, H, W)`` /
    ``(B, C, T, H, W)`` unless the block's widths (conv channels, linear outputs, norm sizes) say the last axis is
    the feature axis (timm Swin's NHWC stages).
    """
    if x.dim() <= 2:
        return x.dim() - 1
    if width is not None:
        matches = [axis for axis in (1, x.dim() - 1) if x.shape[axis] == width]
        if len(matches) == 1:
            return matches[0]
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
    width: int | None = None  # the metadata's feature width, when known (layer_map().widths)


def _split_output(output, width: int | None = None) -> tuple[torch.Tensor | None, Callable]:
    """The representation tensor inside a block's output and a function that puts a replacement back.

    A tuple / list: its first tensor, or with ``width`` the first floating tensor with an axis 1 or last axis of
    that size (timm TNT's ``(pixel_embed, patch_embed)``, CrossViT's two branches).
    """
    if isinstance(output, torch.Tensor):
        return output, lambda new: new
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        index = 0
        if width is not None:
            index = next((i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
                          and t.dim() >= 2 and width in (t.shape[1], t.shape[-1])), 0)

        def put(new):
            items = list(output)
            items[index] = new
            if isinstance(output, list):
                return items
            return tuple(items) if type(output) is tuple else type(output)(*items)  # namedtuple

        return output[index], put
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
    widths: dict[str, int] | None = None  # metadata feature widths (layer_widths): which tensor, which axis
    layers: list[CapturedLayer] = field(init=False)
    _handles: list = field(init=False, default_factory=list)
    _active: bool = field(init=False, default=False)
    replaying: bool = field(init=False, default=False)

    def __post_init__(self):
        modules = dict(unwrap_model(self.model).named_modules())
        widths = self.widths or {}
        self.layers = [CapturedLayer(name, i, modules[name], width=widths.get(name)) for i, name in enumerate(self.names)]

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
            tensor, put = _split_output(output, layer.width)
            if tensor is None or not tensor.is_floating_point():
                return None
            if layer.axis is None:
                layer.axis = feature_axis(module, tensor, layer.width)
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
