"""Publishing: the checkpoint format, the image-processor config and the model card of a VCReg run.

Step 4 of the data flow (capture -> penalty -> trainer -> publishing). Everything written here loads with
the model's own library, **without hf_vcreg installed**:

* ``transformers`` models: ``save_pretrained`` (done by ``Trainer._save``) plus a ``preprocessor_config.json``.
  When the trainer got no image processor (``processing_class``), :func:`default_image_processor` derives one
  from the model config: the image-processor class ``AutoImageProcessor`` registers for the model type, with
  its default normalisation, resized to ``config.image_size``. Pass ``processing_class=`` to record the
  preprocessing you really trained with.
* ``timm`` models (bare ``timm.create_model(...)`` or wrapped in ``TimmWrapperForImageClassification``):
  timm's hub format (:func:`save_timm_checkpoint`): ``config.json`` with ``architecture``, ``num_classes``,
  ``pretrained_cfg`` (input size, mean, std, ...) and ``model_args``, weights in ``model.safetensors`` with
  timm's own key names. Loads with ``timm.create_model("hf-hub:<repo>", pretrained=True, num_classes=K)``
  and with ``transformers`` (``AutoModelForImageClassification`` -> ``TimmWrapperForImageClassification``,
  ``AutoImageProcessor`` -> ``TimmWrapperImageProcessor``). NOTE: timm 1.0.31's ``save_for_hf`` puts
  ``num_classes`` into ``model_args``, which makes ``TimmWrapper`` fail with "got multiple values for keyword
  argument 'num_classes'"; it is removed here (``num_classes`` stays at the top level, which both read).
* ``README.md``: the model card, rendered from the Jinja2 template ``model_cards/vcreg_model_card.md``
  (shipped inside the package as ``hf_vcreg/model_cards/``) by :func:`model_card_from_trainer`.

:class:`HubPublishingMixin` puts these into a ``Trainer``: its ``_save`` writes the format and the card, and a
failed Hub request raises :class:`HubPushError`, which says what is safe on disk and how to retry.

``training_args.bin`` (the Trainer's pickled ``VCRegConfig``) still lands in checkpoints and in uploads, as
with every ``Trainer``: no loader (``from_pretrained``, ``AutoImageProcessor``, ``timm.create_model``) reads
it, so the published model loads without hf_vcreg; only ``torch.load`` of that one file needs it. The card
lists every ``vcreg_*`` value instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer import TRAINING_ARGS_NAME

from .capture import unwrap_model

__all__ = [
    "CARD_TEMPLATE",
    "HubPublishingMixin",
    "HubPushError",
    "PUBLISHED_FILES",
    "default_image_processor",
    "final_metrics",
    "model_card_from_trainer",
    "push_error",
    "record_preprocessing",
    "render_model_card",
    "label_names",
    "pushes_checkpoint",
    "save_image_processor",
    "save_timm_checkpoint",
    "stage_published_files",
    "timm_data_config",
    "timm_module",
    "vcreg_sources",
]

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "vcreg_model_card.md"
"""File name of the card template in ``hf_vcreg/model_cards/`` (source: ``model_cards/`` at the repo root)."""

PAPER_BIBTEX = """@article{zhu2023vcreg,
  title   = {Variance-Covariance Regularization Improves Representation Learning},
  author  = {Zhu, Jiachen and Evtimova, Katrina and Chen, Yubei and Shwartz-Ziv, Ravid and LeCun, Yann},
  journal = {arXiv preprint arXiv:2306.13292},
  year    = {2023}
}"""

PUBLISHED_FILES = ("README.md", "preprocessor_config.json", "config.json", "model.safetensors")
"""Files of a saved folder that make up the published model (copied from a checkpoint before a Hub push)."""

# Provenance keys of timm's default pretrained_cfg that would misdescribe newly trained weights.
_TIMM_PROVENANCE_KEYS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "origin_url",
                         "paper_ids", "paper_name", "notes", "license", "state_dict")

# Final values shown in the card, in this order: (log key, label).
_TRAIN_METRICS = (("loss", "loss (task + VCReg)"), ("task_loss", "task loss"), ("vcreg/penalty", "VCReg penalty"),
                  ("vcreg/variance", "variance term V"), ("vcreg/covariance", "covariance term K"),
                  ("accuracy", "accuracy"))


class HubPushError(RuntimeError):
    """Uploading to the Hub failed; the local folder is complete and a later ``push_to_hub()`` resumes."""


HUB_ERRORS: tuple[type[BaseException], ...] = (
    HfHubHTTPError, ConnectionError, TimeoutError,
    *(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError"),  # httpx's base: connection errors too
)
"""Exceptions of ``huggingface_hub`` for a refused, failed or unreachable request."""


def push_error(err: BaseException, output_dir: str, repo_id: str | None, creating: bool = False,
               trained_steps: int = 0) -> HubPushError:
    """The :class:`HubPushError` raised when pushing ``output_dir`` to ``repo_id`` (or creating it) failed.

    ``trained_steps``: optimizer steps run so far (0: nothing trained). It tells the story the user needs: whether
    training ran, that the folder is complete on disk (the push writes it before any network call), what failed
    and how to retry.
    """
    cause = f"{type(err).__name__}: {err}"
    if creating and not trained_steps:
        return HubPushError(
            f"Creating the Hub repo {repo_id!r} failed: {cause}. Nothing was trained or uploaded "
            "yet. Check that HF_ENDPOINT is reachable and the token (HF_TOKEN / hub_token) has write access, or set "
            "push_to_hub=False and call trainer.push_to_hub() later."
        )
    step = "creating the repo" if creating else "the upload"
    return HubPushError(
        f"Training finished ({trained_steps} steps); the checkpoint is complete at {os.path.abspath(output_dir)!r} "
        f"(weights, config, preprocessing, model card) and loads with from_pretrained. Pushing it to the Hub repo "
        f"{repo_id!r} failed in {step}: {cause}. Nothing on the Hub changed (commits are atomic). Fix the cause "
        "(is HF_ENDPOINT reachable? does the token have write access? is the repo id right?) and retry: call "
        "trainer.push_to_hub() again; files the Hub already holds are not sent twice."
    )


# ---------------------------------------------------------------------------------------------- timm format
def timm_module(model: nn.Module) -> nn.Module | None:
    """The timm model inside ``model`` (a bare timm model, or ``TimmWrapper*``'s ``timm_model``), else None."""
    base = unwrap_model(model)
    if isinstance(base, PreTrainedModel):
        base = getattr(base, "timm_model", None)
    # the MRO, not the class: FSDP2 swaps in a subclass ``FSDP<Name>`` defined in torch's module
    timm_class = base is not None and any(c.__module__.startswith("timm.") for c in type(base).__mro__)
    is_timm = timm_class and hasattr(base, "pretrained_cfg")
    return base if is_timm else None


def timm_data_config(processing_class: Any) -> dict | None:
    """``data_config`` of a ``TimmWrapperImageProcessor`` (input size, mean, std, ...), else None."""
    data_config = getattr(processing_class, "data_config", None)
    return dict(data_config) if isinstance(data_config, dict) else None


def save_timm_checkpoint(
    model: nn.Module,
    output_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    label_names: list[str] | None = None,
    data_config: dict | None = None,
) -> Path:
    """Write ``model`` (a timm model) in timm's hub format into ``output_dir``; return the ``config.json`` path.

    ``state_dict`` (optional) replaces ``model.state_dict()`` (e.g. gathered by the Trainer under FSDP); a
    ``timm_model.`` prefix (``TimmWrapper`` keys) is stripped. ``label_names`` (class index -> name) and
    ``data_config`` (timm's ``input_size``/``mean``/``std``/``interpolation``/``crop_pct``; default: the model's
    ``pretrained_cfg``) go into the config. Set ``model.pretrained_cfg`` or pass a ``TimmWrapperImageProcessor``
    as the trainer's ``processing_class`` to record the preprocessing you trained with.
    """
    from timm.models._hub import save_config_for_hf

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = model.state_dict() if state_dict is None else state_dict
    tensors = {k.removeprefix("timm_model."): v.detach().contiguous().cpu() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    model_config = {"label_names": list(label_names)} if label_names else None
    config_path = out / "config.json"
    save_config_for_hf(model, str(config_path), model_config=model_config, data_config=data_config)
    config = json.loads(config_path.read_text())
    config.get("model_args", {}).pop("num_classes", None)  # NOTE: the timm 1.0.31 / TimmWrapper clash (above)
    if config.get("model_args") == {}:
        del config["model_args"]
    for key in _TIMM_PROVENANCE_KEYS:
        config["pretrained_cfg"].pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config_path


# ------------------------------------------------------------------------------------- preprocessing
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def record_preprocessing(
    model: nn.Module,
    image_size: int,
    channels: int = 3,
    mean: float | tuple[float, ...] = 0.5,
    std: float | tuple[float, ...] = 0.5,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
) -> dict[str, Any]:
    """Record the preprocessing ``model`` was trained with, so that every later save publishes it.

    The evaluation preprocessing of the training run: resize to ``image_size / crop_pct`` (``interpolation``),
    centre-crop ``image_size`` x ``image_size``, scale to [0, 1], normalise with ``mean`` / ``std`` (one value, or
    one per channel). Written into:

    * timm models (bare or ``TimmWrapper*``): ``model.pretrained_cfg`` (``input_size``, ``mean``, ``std``,
      ``interpolation``, ``crop_pct``), hence the saved ``config.json``; ``timm.data.resolve_data_config`` and
      ``AutoImageProcessor`` (``TimmWrapperImageProcessor``) read it back.
    * transformers models: the ``preprocessor_config.json`` written at save time when the trainer has no
      ``processing_class`` (:func:`save_image_processor`): size, ``crop_pct``, ``resample``, ``image_mean``,
      ``image_std``.

    Returns the timm-style data config. Raises ValueError for a value a loader could not reproduce.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"record_preprocessing: image_size must be a positive int; got {image_size!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"record_preprocessing: interpolation {interpolation!r} is not one of {_INTERPOLATIONS}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"record_preprocessing: crop_pct must be in (0, 1]; got {crop_pct!r}")

    def per_channel(name: str, value) -> tuple[float, ...]:
        values = (value,) * channels if isinstance(value, (int, float)) else tuple(value)
        if len(values) != channels:
            raise ValueError(f"record_preprocessing: {name} needs 1 or {channels} values; got {value!r}")
        return tuple(float(v) for v in values)

    data_config = {"input_size": (channels, image_size, image_size), "mean": per_channel("mean", mean),
                   "std": per_channel("std", std), "interpolation": interpolation, "crop_pct": float(crop_pct)}
    timm_model = timm_module(model)
    if timm_model is not None:
        cfg = {**dict(timm_model.pretrained_cfg or {}), **data_config}
        for key, value in (("test_input_size", data_config["input_size"]), ("test_crop_pct", data_config["crop_pct"])):
            if key in cfg:  # timm's "test at a larger size" entries would describe another preprocessing
                cfg[key] = value
        timm_model.pretrained_cfg = cfg
        wrapper_config = getattr(unwrap_model(model), "config", None)
        if wrapper_config is not None and isinstance(getattr(wrapper_config, "pretrained_cfg", None), dict):
            wrapper_config.pretrained_cfg = {**wrapper_config.pretrained_cfg, **data_config}
    else:
        unwrap_model(model).vcreg_preprocessing = dict(data_config)
    return data_config


def _apply_preprocessing(processor: Any, data_config: dict[str, Any]) -> Any:
    """``processor`` (a transformers image processor) changed to apply ``data_config`` (record_preprocessing)."""
    from transformers.image_utils import PILImageResampling

    size = data_config["input_size"][-1]
    kwargs = {"image_mean": list(data_config["mean"]), "image_std": list(data_config["std"]),
              "resample": PILImageResampling[data_config["interpolation"].upper()], "do_normalize": True,
              "do_rescale": True, "rescale_factor": 1 / 255}
    if getattr(processor, "crop_pct", None) is not None or processor.size.get("shortest_edge"):
        kwargs["size"] = {"shortest_edge": size}  # ConvNeXt-style: resize to size / crop_pct, centre-crop size
        if hasattr(processor, "crop_pct"):
            kwargs["crop_pct"] = data_config["crop_pct"]
    else:
        kwargs["size"] = {"height": size, "width": size}
    if getattr(processor, "crop_size", None) is not None:
        kwargs["crop_size"] = {"height": size, "width": size}
    return type(processor)(**{**processor.to_dict(), **kwargs})


# ------------------------------------------------------------------------------------- image processor
def default_image_processor(config: Any):
    """An image processor for a ``transformers`` model config, for checkpoints trained without one.

    The class ``AutoImageProcessor`` maps ``type(config)`` to (the torchvision backend when available), with
    its default normalisation (ImageNet mean/std for most models), and its output size set to
    ``config.image_size`` when the config has one: ``{"height", "width"}`` sizes become ``image_size`` squared,
    a ``shortest_edge`` size (ConvNeXt: resize to ``image_size / crop_pct``, centre-crop) becomes
    ``image_size``. Raises ValueError naming the config class when transformers maps none.
    """
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    try:
        classes = IMAGE_PROCESSOR_MAPPING[type(config)]
    except KeyError:
        raise ValueError(
            f"transformers has no image processor for {type(config).__name__}; pass processing_class=<an image "
            "processor> to the trainer so that the checkpoint carries a preprocessor_config.json."
        ) from None
    candidates = [classes.get(b) for b in ("torchvision", "pil")] if isinstance(classes, dict) else [classes]
    cls = next(c for c in candidates if isinstance(c, type) and not getattr(c, "is_dummy", False))
    processor = cls()
    image_size = getattr(config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if isinstance(image_size, int):
        square = {"height": image_size, "width": image_size}
        kwargs = {"size": {"shortest_edge": image_size} if processor.size.get("shortest_edge") else square}
        if getattr(processor, "crop_size", None) is not None:
            kwargs["crop_size"] = square
        processor = cls(**kwargs)
    channels = getattr(config, "num_channels", 3)
    if channels != 3:
        logger.warning("default_image_processor: %s has num_channels=%s; the derived %s assumes RGB input.",
                       type(config).__name__, channels, cls.__name__)
    return processor


def save_image_processor(model: nn.Module, processing_class: Any, output_dir: str | os.PathLike) -> str | None:
    """Write ``preprocessor_config.json`` for a transformers model unless the folder has one; return its class.

    A ``processing_class`` given to the trainer has already been saved by the Trainer; otherwise the
    :func:`default_image_processor` of the model config is written (and logged).
    """
    path = Path(output_dir) / "preprocessor_config.json"
    if path.is_file() or processing_class is not None:
        return None
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return None
    processor = default_image_processor(config)
    recorded = getattr(unwrap_model(model), "vcreg_preprocessing", None)  # record_preprocessing
    if recorded:
        processor = _apply_preprocessing(processor, recorded)
    processor.save_pretrained(str(output_dir))
    logger.info("No processing_class given: wrote a default %s (size %s) to %s.", type(processor).__name__,
                dict(processor.size), path)
    return type(processor).__name__


# ------------------------------------------------------------------------------------------ model card
def _fmt(value: Any, exact: bool = True) -> str:
    """``value`` as a cell of a card table (GitHub-flavoured markdown) that reads back to the same value.

    Floats: the shortest text that round-trips (``repr``: ``0.0123456789``, ``1e-06``, ``nan``), or 6
    significant digits when not ``exact`` (logged metrics). Ints: their digits. ``None`` / bools: ``None``,
    ``True``, ``False``. Anything else (strings): its text in a code span, which keeps backslashes literal, with
    every ``|`` escaped as ``\\|`` (GFM splits rows on unescaped pipes, even inside code spans, and renders
    ``\\|`` as ``|``); a longer backtick fence and padding spaces when the text holds backticks or is wrapped in
    spaces, as GFM's code spans need. Reading back: un-fence, then replace every ``\\|`` by ``|``. Lists (a
    ``vcreg_layers`` list of patterns): the entries joined by ``", "``, which :func:`hf_vcreg.capture.split_patterns`
    splits back into the same list (it splits at top-level commas only).
    """
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(float(value)) if exact else f"{value:.6g}"  # float(): numpy's repr is "np.float64(...)"
    if value is None or isinstance(value, int):  # bools too
        return str(value)
    text = str(value).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text[:1] == text[-1:] == " " and text.strip()) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def final_metrics(log_history: list[dict]) -> dict[str, list[tuple[str, str, Any, int]]]:
    """Last logged value of each card metric: ``{"train"|"eval": [(key, label, value, step), ...]}``.

    Training values come from the last log entry holding each key (``loss``, ``task_loss``, ``vcreg/penalty``,
    ``vcreg/variance``, ``vcreg/covariance``, ``accuracy``), evaluation values from the ``eval_``-prefixed keys.
    """
    out: dict[str, list[tuple[str, str, Any, int]]] = {"train": [], "eval": []}
    for split, prefix in (("train", ""), ("eval", "eval_")):
        for key, label in _TRAIN_METRICS:
            for entry in reversed(log_history):
                if prefix + key in entry:
                    out[split].append((prefix + key, label, entry[prefix + key], entry.get("step", 0)))
                    break
    return out


def _dataset_name(trainer: Any, dataset: str | list[str] | None) -> str | None:
    if dataset:
        return dataset if isinstance(dataset, str) else ", ".join(dataset)
    info = getattr(getattr(trainer, "train_dataset", None), "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    config_name = getattr(info, "config_name", None)
    return f"{name} ({config_name})" if name and config_name and config_name != "default" else name


HOMEPAGE = "https://github.com/hf-vcreg/hf_vcreg"
"""The project's homepage (pyproject's ``[project.urls] Homepage``), linked from every card."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str | None) -> bool:
    """``owner/name`` that is not a local path: a Hub checkpoint id (for ``base_model``)."""
    return bool(name) and bool(_REPO_ID.match(name)) and not os.path.exists(name)


def preprocessing_line(data_config: dict | None) -> str | None:
    """One sentence describing a timm-style data config (:func:`record_preprocessing`), for the card."""
    if not data_config or "input_size" not in data_config:
        return None
    channels, height, width = data_config["input_size"]
    crop = data_config.get("crop_pct", 1.0) or 1.0
    resize = (f"resize to {width}x{height}" if crop == 1.0
              else f"resize the short side to {round(height / crop)} and centre-crop {width}x{height}")
    mean = ", ".join(f"{v:g}" for v in data_config.get("mean", ()))
    std = ", ".join(f"{v:g}" for v in data_config.get("std", ()))
    return (f"{resize} ({data_config.get('interpolation', 'bilinear')}), {channels} channels, scale to [0, 1], "
            f"normalise with mean ({mean}) and std ({std})")


def render_model_card(
    *,
    repo_id: str | None,
    library_name: str,
    vcreg_hparams: dict[str, Any],
    layer_names: list[str],
    architecture: str,
    log_history: list[dict],
    dataset: str | None = None,
    dataset_ids: list[str] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    base_model: str | None = None,
    training_hparams: dict[str, Any] | None = None,
    vcreg_sources: str | None = None,
    monitor_only: bool = False,
    template_path: str | os.PathLike | None = None,
    title: str | None = None,
    preprocessing: str | None = None,
) -> ModelCard:
    """Render the VCReg model card (metadata + text) from explicit values; see :func:`model_card_from_trainer`.

    ``library_name`` is ``"transformers"`` or ``"timm"`` (the checkpoint format). ``repo_id`` is the Hub id, or
    None for a local save: the title is then ``title`` and the commands use a ``<path-or-repo-id>`` placeholder
    (never a local absolute path). ``preprocessing`` is the sentence of :func:`preprocessing_line`. The metadata carries the tags
    ``vcreg``, ``image-classification`` (+ ``timm``), ``pipeline_tag: image-classification`` and, when an
    evaluation accuracy and a data set are known, a ``model-index`` entry. ``vcreg_sources`` is a sentence saying
    where the coefficients came from (:func:`vcreg_sources`); ``monitor_only`` says the layers were only monitored.
    """
    is_timm = library_name == "timm"
    all_tags = ["vcreg", "image-classification"] + (["timm"] if is_timm else [])
    for tag in tags or []:
        if tag not in all_tags:
            all_tags.append(tag)
    metrics = final_metrics(log_history)
    title = repo_id.rstrip("/").split("/")[-1] if repo_id else (title or "VCReg-pretrained image classifier")
    eval_results = None
    accuracy = next((m[2] for m in metrics["eval"] if m[0] == "eval_accuracy"), None)
    if accuracy is not None and dataset:
        eval_results = [EvalResult(task_type="image-classification", dataset_type=(dataset_ids or [dataset])[0],
                                   dataset_name=dataset, metric_type="accuracy", metric_value=float(accuracy))]
    card_data = ModelCardData(
        library_name=library_name,
        pipeline_tag="image-classification",
        tags=all_tags,
        license=license,
        datasets=dataset_ids or ([dataset] if dataset else None),
        base_model=base_model,
        metrics=["accuracy"] if accuracy is not None else None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )
    target = repo_id or "<path-or-repo-id>"
    template = Path(template_path) if template_path else resources.files("hf_vcreg") / "model_cards" / CARD_TEMPLATE
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        title=title,
        repo_id=target,
        local=repo_id is None,
        homepage=HOMEPAGE,
        preprocessing=preprocessing,
        timm_id=f"hf-hub:{repo_id}" if repo_id else "hf-hub:<repo-id>",
        is_timm=is_timm,
        architecture=architecture,
        vcreg_hparams=[(k, _fmt(v)) for k, v in vcreg_hparams.items()],
        layer_names=layer_names,
        dataset=dataset,
        metrics={split: [(label, key, _fmt(value, exact=False), step) for key, label, value, step in rows]
                 for split, rows in metrics.items()},
        training_hparams=[(k, _fmt(v)) for k, v in (training_hparams or {}).items()],
        vcreg_sources=vcreg_sources,
        monitor_only=monitor_only,
        bibtex=PAPER_BIBTEX,
    )


def vcreg_sources(args: Any, family: str | None, recommended: list[str]) -> str:
    """Where ``vcreg_alpha`` / ``vcreg_beta`` / ``vcreg_layers`` came from, as a sentence for the card.

    Each is "recommended for <family> models" (left unset: :data:`hf_vcreg.config.RECOMMENDED`) or "set by the
    user"; a monitor-only run (``vcreg_monitor_only``) applied neither, which the sentence says instead.
    """
    if getattr(args, "vcreg_monitor_only", False):
        return "Monitor-only run (`vcreg_monitor_only`): `vcreg_alpha` and `vcreg_beta` were not applied."
    parts = [f"`{name}` " + (f"recommended for {family} models (hf_vcreg's per-family default)" if name in recommended
                             else "set by the user") for name in ("vcreg_alpha", "vcreg_beta", "vcreg_layers")]
    return "Settings: " + "; ".join(parts) + "."


def model_card_from_trainer(trainer: Any, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
    """The card of a ``VCRegTrainer`` run (duck-typed: ``args``, ``model``, ``state``, ``vcreg_layer_names``, and
    ``vcreg_resolved`` / ``vcreg_family`` / ``vcreg_recommended``: the values used and where they came from).

    ``kwargs`` are those of ``Trainer.create_model_card`` / ``push_to_hub``: ``dataset`` or ``dataset_name``
    (display name; default: the train data set's ``info.dataset_name``), ``dataset_tags`` (Hub data set ids for
    the metadata), ``tags``, ``license``, ``finetuned_from`` (``base_model``; default: the config's
    ``_name_or_path`` when it is a Hub id), ``model_name`` (the title of a card without a repo id); others
    (``language``, ``tasks``, ...) are ignored.
    """
    args = trainer.args
    model = unwrap_model(trainer.model)
    timm_model = timm_module(model)
    if repo_id is None:  # never the output folder's name or path: the Hub id, else a placeholder in the commands
        repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id or None
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if timm_model is not None:
        arch_name = timm_model.pretrained_cfg.get("architecture", type(timm_model).__name__)
        architecture = f"timm `{arch_name}`"
        data_config = dict(timm_model.pretrained_cfg)
    else:
        arch_name = name_or_path.rstrip("/").split("/")[-1] if looks_like_repo_id(name_or_path) else type(model).__name__
        architecture = f"transformers `{type(model).__name__}`"
        data_config = getattr(model, "vcreg_preprocessing", None)
    base_model = kwargs.get("finetuned_from") or (name_or_path if looks_like_repo_id(name_or_path) else None)
    dataset_tags = kwargs.get("dataset_tags")
    tags = kwargs.get("tags")
    tags = ([tags] if isinstance(tags, str) else list(tags or [])) + list(getattr(model, "model_tags", None) or [])
    return render_model_card(
        repo_id=repo_id,
        library_name="timm" if timm_model is not None else "transformers",
        vcreg_hparams=getattr(trainer, "vcreg_resolved", None) or args.vcreg_dict(),
        vcreg_sources=vcreg_sources(args, getattr(trainer, "vcreg_family", None),
                                    list(getattr(trainer, "vcreg_recommended", []))),
        monitor_only=bool(getattr(args, "vcreg_monitor_only", False)),
        layer_names=list(getattr(trainer, "vcreg_layer_names", []) or []),
        architecture=architecture,
        log_history=list(trainer.state.log_history),
        dataset=_dataset_name(trainer, kwargs.get("dataset") or kwargs.get("dataset_name")),
        dataset_ids=[dataset_tags] if isinstance(dataset_tags, str) else dataset_tags,
        tags=tags,
        license=kwargs.get("license"),
        base_model=base_model,
        title=kwargs.get("model_name") or f"{arch_name} pretrained with VCReg",
        preprocessing=preprocessing_line(data_config),
        training_hparams={
            "learning_rate": args.learning_rate,
            "train_batch_size (per device)": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "global_step": trainer.state.global_step,
            "seed": args.seed,
        },
    )


def label_names(model: nn.Module, train_dataset: Any = None) -> list[str] | None:
    """Class names in index order: a transformers config's ``id2label``, else the train set's ``label`` ClassLabel."""
    config = getattr(unwrap_model(model), "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label:
        return [str(id2label[i]) for i in sorted(id2label)]
    feature = (getattr(train_dataset, "features", None) or {}).get("label")
    return list(feature.names) if getattr(feature, "names", None) else None


def pushes_checkpoint(trainer: Any, save_dir: str) -> bool:
    """Whether ``Trainer._push_from_checkpoint`` will upload ``output_dir`` after this checkpoint save.

    Mirrors its conditions: ``push_to_hub``, ``hub_strategy != "end"``, process zero, a checkpoint folder (not
    ``output_dir`` itself), and no upload still running (unless ``hub_always_push``).
    """
    args = trainer.args
    if not args.push_to_hub or args.hub_strategy == "end" or not trainer.is_world_process_zero():
        return False
    if os.path.abspath(save_dir) == os.path.abspath(args.output_dir):
        return False
    running = getattr(trainer, "push_in_progress", None)
    return args.hub_always_push or running is None or running.is_done()


def stage_published_files(
    checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike, names: tuple[str, ...] = PUBLISHED_FILES
) -> list[str]:
    """Copy the files ``names`` present in ``checkpoint_dir`` into ``output_dir``; return the names copied."""
    copied = []
    for name in names:
        src = Path(checkpoint_dir) / name
        if src.is_file() and Path(checkpoint_dir).resolve() != Path(output_dir).resolve():
            shutil.copy(src, Path(output_dir) / name)
            copied.append(name)
    return copied


# ------------------------------------------------------------------------------------------ the Trainer mixin
class HubPublishingMixin:
    """``Trainer`` mixin: saves in the model library's own format with the VCReg card; Hub failures raise clearly.

    Put it before ``Trainer`` in the bases. Overrides ``_save`` (private: the one place every save goes through,
    checkpoints included) and ``_finish_current_push`` (private: where a failed background checkpoint push
    surfaces), and the public ``create_model_card``, ``init_hf_repo`` and ``push_to_hub``. The card reads the
    trainer duck-typed (see :func:`model_card_from_trainer`).
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save in the library's standard format (timm models: timm's hub format) + preprocessor config + card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        timm_model = timm_module(self.model)
        if timm_model is None:
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            labels = label_names(self.model, self.train_dataset)
            data_config = timm_data_config(self.processing_class)
            save_timm_checkpoint(timm_model, output_dir, state_dict, labels, data_config)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if not self.args.should_save:
            return
        if timm_model is None:
            save_image_processor(self.model, self.processing_class, output_dir)
        self.model_card().save(os.path.join(output_dir, "README.md"))
        if pushes_checkpoint(self, output_dir):  # the Trainer copies only config + weights over
            stage_published_files(output_dir, self.args.output_dir, ("README.md", "preprocessor_config.json"))

    def model_card(self, **kwargs):
        """This run's VCReg model card (a ``huggingface_hub.ModelCard``), see :func:`model_card_from_trainer`."""
        return model_card_from_trainer(self, **{**getattr(self, "_card_kwargs", {}), **kwargs})

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, dataset_name=None) -> None:
        """Write the VCReg card to ``output_dir/README.md``; the arguments are remembered for later saves."""
        model_name = model_name if model_name != Path(self.args.output_dir).absolute().name else None
        given = dict(license=license, tags=tags, finetuned_from=finetuned_from, dataset_tags=dataset_tags,
                     dataset=dataset or dataset_name, model_name=model_name)
        self._card_kwargs = {**getattr(self, "_card_kwargs", {}), **{k: v for k, v in given.items() if v is not None}}
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            self.model_card().save(os.path.join(self.args.output_dir, "README.md"))

    def _hub_repo_name(self) -> str:
        return self.args.hub_model_id or f"{Path(self.args.output_dir).absolute().name} (from output_dir)"

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        try:
            super().init_hf_repo(token, private)
        except HUB_ERRORS as err:
            state = getattr(self, "state", None)  # None while Trainer.__init__ creates the repo
            raise push_error(err, self.args.output_dir, self._hub_repo_name(), creating=True,
                             trained_steps=getattr(state, "global_step", 0)) from err

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """``Trainer.push_to_hub``, local first: the complete checkpoint (weights, config, preprocessing, card) is
        written to ``output_dir`` before any network call; a failure then raises :class:`HubPushError` saying what
        is on disk, what failed and how to retry (a retry resumes)."""
        card_keys = ("license", "tags", "finetuned_from", "dataset_tags", "dataset", "dataset_name", "model_name")
        self.create_model_card(**{k: kwargs[k] for k in card_keys if kwargs.get(k) is not None})
        kwargs.pop("dataset_name", None)  # ours: remembered above (Trainer.create_model_card has no such argument)
        self.save_model(_internal_call=True)
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        except HubPushError:
            raise
        except HUB_ERRORS as err:
            repo_id = getattr(self, "hub_model_id", None) or self._hub_repo_name()
            raise push_error(err, self.args.output_dir, repo_id, trained_steps=self.state.global_step) from err

    def _finish_current_push(self) -> None:
        super()._finish_current_push()
        running = getattr(self, "push_in_progress", None)
        failed = [job for job in getattr(running, "jobs", None) or [] if job.done() and job.exception() is not None]
        for job in failed:
            logger.warning("A checkpoint push to the Hub failed (%s); the next push_to_hub() uploads the whole "
                           "output_dir again.", job.exception())
        if failed:
            running.jobs = [job for job in running.jobs if job not in failed]
