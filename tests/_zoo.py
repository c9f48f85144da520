"""The model zoos: one model of every timm module family and every transformers image / video classification class,
built on the meta device (no memory, no weights), with the stages and blocks hf_vcreg selects in each.

``python tests/_zoo.py`` rewrites ``docs/architectures.md`` (``tests/test_zoo.py`` checks that the committed file is
current); ``python tests/_zoo.py --pick`` rebuilds every timm model (~1,400, minutes) and prints the smallest one per
module family, the :data:`TIMM_SMALLEST` table below.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_vcreg.capture import BlockCapture, _pixel_input, _resolve, layer_map

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"

# module family -> its model with the fewest parameters (``python tests/_zoo.py --pick``, timm 1.0.31)
TIMM_SMALLEST = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window16_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_legacy_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}
# Models issue 13 named as failing, and the README's examples, beside the smallest of their family.
TIMM_EXTRA = [
    "resnet10t", "resnet18", "resnest14d", "vgg11", "darknet17", "cspresnet50", "fastvit_t8", "nextvit_small",
    "vovnet39a", "legacy_xception", "xception41", "levit_128s", "halonet26t", "efficientformerv2_s0", "coat_lite_tiny",
    "twins_pcpvt_small", "visformer_small", "convnext_atto", "efficientnet_b0", "regnetx_002", "swin_tiny_patch4_window7_224",
]
# Classes whose default config cannot build them: the smallest change that does.
HF_CONFIG = {
    "PerceiverForImageClassificationFourier": {"num_cross_attention_heads": 1},
    "PerceiverForImageClassificationConvProcessing": {"num_cross_attention_heads": 1},
}
VIDEO = ("videomae", "timesformer", "vivit")

# A selected module must not be (inside) one of these: stems, embeddings, final norms, heads.
NOT_SELECTABLE = re.compile(
    r"(?i)(.*(stem|embed|head|classifier|pooler|pre_logits|fc_norm|final_conv).*|layernorm|post_layernorm|norm)"
)


@dataclass
class Row:
    library: str  # "timm" or "transformers"
    family: str  # timm module / transformers model type
    model: str  # timm model name / transformers class
    source: str = ""
    stages: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)  # what the library lists (feature_info / config depths)
    left_out: list[str] = field(default_factory=list)  # metadata entries not selected (stems, final convs)
    error: str | None = None  # why the model cannot be built here
    classes: dict[str, str] = field(default_factory=dict)  # selected module -> its class name
    widths: dict[str, int] = field(default_factory=dict)  # the metadata's feature width per stage
    matrices: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (rows, features) of a meta forward
    width_mismatch: list[str] = field(default_factory=list)  # stages whose output has the width but not as features
    forward_error: str | None = None  # why the meta-device forward did not run


def timm_models() -> list[tuple[str, str]]:
    import timm

    rows = [(family, TIMM_SMALLEST.get(family, "")) for family in timm.list_modules()]
    known = {name: family for family in timm.list_modules() for name in timm.list_models(module=family)}
    rows += [(known.get(name, "?"), name) for name in TIMM_EXTRA if name not in TIMM_SMALLEST.values()]
    return rows


def hf_classes() -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    out = []
    for mapping in (auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, auto.MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES):
        for key, classes in mapping.items():
            out += [(key, c) for c in ((classes,) if isinstance(classes, str) else classes)]
    return out


def timm_row(family: str, name: str) -> Row:
    import timm

    row = Row("timm", family, name)
    if not name:
        row.error = "no model picked for this family: run `python tests/_zoo.py --pick` and update TIMM_SMALLEST"
        return row
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
    _fill(row, model)
    _meta_forward(row, model, (torch.empty(2, *model.pretrained_cfg["input_size"], device="meta"),))
    names = dict(model.named_modules())
    for entry in getattr(model, "feature_info", []) or []:
        resolved = _resolve(entry["module"], names) if entry.get("module") else None
        label = resolved if resolved is not None else f"{entry.get('module')!r} (no such module)"
        if label not in row.metadata:
            row.metadata.append(label)
    row.left_out = [m for m in row.metadata if not _covered(m, row.stages)]
    return row


def hf_row(key: str, cls_name: str) -> Row:
    import transformers

    row = Row("transformers", key, cls_name)
    try:
        cls = getattr(transformers, cls_name)
        config = transformers.AutoConfig.for_model(key, **HF_CONFIG.get(cls_name, {}))
        with torch.device("meta"):
            model = cls(config)
    except ImportError as err:  # an optional dependency (Dinat: natten)
        row.error = str(err).strip().splitlines()[0].split(". ")[0] + "."
        return row
    model.eval()
    _fill(row, model)
    spec = _pixel_input(model, model.config)
    if spec is None:
        row.forward_error = "its forward takes no pixel_values"
    else:
        _meta_forward(row, model, {spec[0]: torch.empty(spec[1], device="meta")})
    cfg = getattr(model.config, "vision_config", None) or model.config
    depths = getattr(cfg, "depths", None) or getattr(cfg, "num_hidden_layers", None)
    if isinstance(depths, (list, tuple)):
        row.metadata = [f"stage {i} ({d} blocks)" for i, d in enumerate(depths)]
    elif isinstance(depths, int):
        row.metadata = [f"layer {i}" for i in range(depths)]
    return row


def _fill(row: Row, model: torch.nn.Module) -> None:
    found = layer_map(model)
    row.source, row.stages, row.blocks, row.widths = found.source, found.stages, found.blocks, found.widths
    row.classes = {n: type(model.get_submodule(n)).__name__ for n in row.stages + row.blocks}


def _meta_forward(row: Row, model: torch.nn.Module, inputs: dict | tuple) -> None:
    """One meta-device forward: each stage's sample matrix ``(rows, features)``, and whether the features are the
    metadata's width whenever the output holds a tensor of that width."""
    raw: dict[str, list[tuple[int, ...]]] = {}

    def record(layer, x):
        z = x.movedim(layer.axis, -1)
        row.matrices[layer.name] = (z.numel() // z.shape[-1], z.shape[-1])
        return x

    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: raw.__setitem__(n, [tuple(t.shape) for t in (out if isinstance(out, (tuple, list))
                                                                             else [out]) if isinstance(t, torch.Tensor)]))
        for n in row.stages]
    capture = BlockCapture(model, row.stages, record, widths=row.widths)
    capture.install()
    try:
        with torch.no_grad(), capture.active():
            model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    except Exception as err:  # noqa: BLE001 - recorded in the doc: data-dependent ops do not run on meta tensors
        row.forward_error = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    finally:
        capture.remove()
        for handle in handles:
            handle.remove()
    for name, width in row.widths.items():
        has_width = any(len(shape) >= 2 and width in (shape[1], shape[-1]) for shape in raw.get(name, []))
        if has_width and name in row.matrices and row.matrices[name][1] != width:
            row.width_mismatch.append(f"{name}: {row.matrices[name][1]} features, metadata says {width}")


def _covered(module: str, stages: list[str]) -> bool:
    return any(module == s or module.startswith(s + ".") or s.startswith(module + ".") for s in stages)


def problems(row: Row) -> list[str]:
    """What is wrong with a row's selection (empty when nothing is)."""
    if row.error:
        return []
    out = []
    if not row.stages or not row.blocks:
        out.append("nothing selected")
    for name in row.stages + row.blocks:
        bad = [p for p in name.split(".") if NOT_SELECTABLE.fullmatch(p)]
        if bad:
            out.append(f"{name}: a stem / embedding / norm / head ({bad[0]})")
        elif re.search(r"Embed|Stem|Head|Pooler|Classifier", row.classes.get(name, "")):
            out.append(f"{name}: a stem / embedding / head ({row.classes[name]})")
    if row.library == "timm" and row.metadata:
        # feature_info entries left out may only be the leading (stem) and trailing (final conv / norm / head) ones
        covered = [i for i, m in enumerate(row.metadata) if m not in row.left_out]
        middle = [m for i, m in enumerate(row.metadata) if m in row.left_out and covered and covered[0] < i < covered[-1]]
        out += [f"feature_info stage {m} is not selected" for m in middle]
    out += [f"feature axis: {m}" for m in row.width_mismatch]
    return out


def all_rows(timm_only: bool = False) -> list[Row]:
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    rows = [timm_row(f, n) for f, n in timm_models()]
    if not timm_only:
        rows += [hf_row(k, c) for k, c in hf_classes()]
    return rows


def _names(names: list[str], limit: int = 4) -> str:
    if not names:
        return ""
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def render(rows: list[Row]) -> str:
    import timm
    import transformers

    timm_rows = [r for r in rows if r.library == "timm"]
    hf_rows = [r for r in rows if r.library == "transformers"]
    lines = [
        "# Architectures: the layers `vcreg_layers` selects",
        "",
        "<!-- Generated by `python tests/_zoo.py`; tests/test_zoo.py checks that it is current. Do not edit. -->",
        "",
        "`vcreg_layers` takes a keyword or regular expressions:",
        "",
        "* unset (the default): the placement recommended for the model's family (`hf_vcreg.config.RECOMMENDED`: "
        "`\"last\"` for CNNs, `\"blocks\"` for transformers, chosen by the evidence suite);",
        "* `\"blocks\"`: every residual / transformer block inside the stages;",
        "* `\"stages\"`: every stage (feature level, hidden-state layer): the output of each resolution of a CNN;",
        "* `\"last\"`: the last block only;",
        "* patterns: regular expressions matched in full against module names: a list (`--vcreg_layers 'layer1\\.\\d+'"
        " 'layer4'` on the command line, a JSON list, a Python list), or one string split at its top-level commas "
        "(a comma inside `{}`, `[]` or `()` stays in the pattern: `vit\\.layers\\.[0-9]{1,2}` is one pattern).",
        "",
        "What the keywords mean per kind of model:",
        "",
        "| kind | example | `\"stages\"` | `\"blocks\"` |",
        "|---|---|---|---|",
        "| CNN | timm `resnet18` | `layer1` ... `layer4` (4) | `layer1.0`, `layer1.1`, ... `layer4.1` (8) |",
        "| CNN | transformers ResNet | `resnet.encoder.stages.0` ... `.3` | `resnet.encoder.stages.0.layers.0`, ... |",
        "| ViT | timm `vit_*`, transformers ViT | `blocks.0` ... `blocks.11` | the same modules (a ViT's stages are its blocks) |",
        "| hierarchical transformer | timm Swin | `layers.0` ... `layers.3` (4) | `layers.0.blocks.0`, ... (12 for Swin-T) |",
        "| hierarchical transformer | transformers Swin | `swin.encoder.layers.0` ... `.3` | `swin.encoder.layers.0.blocks.0`, ... |",
        "",
        "Where they come from (the *source* column): timm models: `feature_info` (every feature level; the stem "
        "entries, those timm's `group_matcher` calls stem or named `stem*` / `act1` / `conv_stem`, and a final "
        "conv / norm are left out); transformers models: the modules whose outputs are the model's `hidden_states`, "
        "traced on a meta-device twin of the model (else the class in `_can_record_outputs`), the embedding output "
        "left out; else (*structure*) the structural search of `hf_vcreg/capture.py` (repeated composite modules). "
        "The blocks of a stage are the members of its list of blocks (`blocks`, `layers`, a `Sequential` stage's "
        "children); a stage with one block, or of plain layers (VGG), is its own block. A stage that is a `ModuleList` "
        "(timm Twins, CoaT) never runs as a module: its last block stands for it. A stem, patch embedding, "
        "final norm or head is never selected by a keyword.",
        "",
        f"Checked by `tests/test_zoo.py` on timm {timm.__version__} and transformers {transformers.__version__}: "
        f"{len(timm_rows)} timm models (the smallest of each of the {len({r.family for r in timm_rows})} module "
        f"families, plus named ones) and {len(hf_rows)} transformers classes (every image and video "
        "classification class), built on the meta device. Each runs one meta-device forward (shapes only) through "
        "the hooks: the *features per stage* column is the `d` of each stage's `(n, d)` sample matrix, the axis "
        "taken from the metadata's width where it gives one (timm `feature_info` channels, transformers "
        "`hidden_sizes` / `hidden_size`), and from the tensor in a tuple output that has that width (timm TNT).",
        "",
    ]
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["Not buildable here (the test lists them):", ""]
        lines += [f"* {r.library} `{r.model}`: {r.error}" for r in failed]
        lines.append("")
    lines += [
        "## timm",
        "",
        "| family | model | source | stages | blocks | stage names | features per stage | feature_info entries "
        "left out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in timm_rows:
        lines.append(f"| {r.family} | `{r.model}` | {r.source or '-'} | {len(r.stages)} | {len(r.blocks)} | "
                     f"{_names(r.stages)} | {_features(r)} | {_names(r.left_out)} |")
    lines += [
        "",
        "## transformers",
        "",
        "| model type | class | source | stages | blocks | stage names | block names | features per stage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in hf_rows:
        lines.append(f"| {r.family} | `{r.model}` | {r.source or '-'} | {len(r.stages)} | {len(r.blocks)} | "
                     f"{_names(r.stages, 3)} | {_names(r.blocks, 3)} | {_features(r)} |")
    no_forward = [r for r in rows if r.forward_error and not r.error]
    if no_forward:
        lines += ["", "Selected but not run on the meta device (no features column; the selection above still holds):",
                  ""]
        lines += [f"* {r.library} `{r.model}`: {r.forward_error}" for r in no_forward]
    return "\n".join(lines) + "\n"


def _features(row: Row, limit: int = 6) -> str:
    """The feature width ``d`` of each stage's ``(n, d)`` sample matrix in a meta-device forward."""
    if not row.matrices:
        return "-"
    ds = [str(row.matrices[s][1]) if s in row.matrices else "?" for s in row.stages]
    return ", ".join(ds[:limit]) + (", ..." if len(ds) > limit else "")


def pick() -> dict[str, str]:
    import timm

    warnings.filterwarnings("ignore")
    out = {}
    for family in timm.list_modules():
        sizes = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - a model that does not build is not the pick
                continue
            sizes.append((sum(p.numel() for p in model.parameters()), name))
        if sizes:
            out[family] = min(sizes)[1]
    return out


if __name__ == "__main__":
    if "--pick" in sys.argv:
        print("TIMM_SMALLEST = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in pick().items()) + "}")
    else:
        DOC.write_text(render(all_rows()))
        print(f"wrote {DOC}")
