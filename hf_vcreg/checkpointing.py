"""All-or-nothing checkpoints for any ``transformers.Trainer``: atomic saves, resume from complete ones, strict loads.

General Trainer infrastructure, independent of VCReg::

    from transformers import Trainer
    from hf_vcreg.checkpointing import AtomicCheckpointMixin, last_complete_checkpoint

    class MyTrainer(AtomicCheckpointMixin, Trainer):  # the mixin first, so that its overrides win
        ...

    MyTrainer(...).train(resume_from_checkpoint=True)  # the newest complete checkpoint-N

What it changes against the plain ``Trainer``:

* **Atomic saves.** Every checkpoint is written into ``_incomplete-checkpoint-N/checkpoint-N`` and renamed to
  ``checkpoint-N`` once complete and flushed to disk (files and folders ``fsync``-ed), so a process killed mid-save
  never leaves a half-written ``checkpoint-N``: upstream writes in place, and ``get_last_checkpoint`` would pick
  that folder up. Rotation (``save_total_limit``) and the Hub push of a checkpoint run after the rename.
* **Resume from complete checkpoints only.** ``train(resume_from_checkpoint=True)`` takes
  :func:`last_complete_checkpoint`; an explicit path whose ``trainer_state.json`` is missing or truncated is refused
  with the newest complete one named. Staging folders left by a killed process are deleted when training starts.
* **Strict loads.** Any missing or unexpected key raises before a weight is loaded. A ``PreTrainedModel`` checkpoint
  is loaded through ``from_pretrained``, which maps saved key names to the live ones (the Trainer's plain
  ``load_state_dict`` silently misses renamed keys in transformers 5.x, transformers#43701); a bare model's saved
  state dict is compared with its own; under FSDP the engine checkpoint's keys (full or sharded) are compared on
  rank 0 and the verdict broadcast, so every rank raises.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .capture import unwrap_model

__all__ = ["AtomicCheckpointMixin", "STAGING_PREFIX", "last_complete_checkpoint"]

TRAINER_STATE_NAME = "trainer_state.json"  # written last by Trainer._save_checkpoint
STAGING_PREFIX = "_incomplete-"
"""Prefix of a checkpoint's staging folder. The leading ``_`` keeps ``Trainer.push_to_hub`` from uploading it."""
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _trainer_state_step(checkpoint: str | os.PathLike) -> int | None:
    """``global_step`` of a checkpoint's ``trainer_state.json``, or ``None`` when it is missing or truncated."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose ``trainer_state.json`` parses and says step ``N``.

    ``Trainer._save_checkpoint`` writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG
    states, so a checkpoint passing this check was written completely. Unlike ``transformers``'
    ``get_last_checkpoint`` it skips a half-written directory (a process killed mid-save by a trainer that writes
    in place). ``None`` when there is no complete checkpoint.
    """
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and _trainer_state_step(path) == int(match.group(1)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the directories themselves to disk (so a power cut keeps them too)."""
    for root, _, files in os.walk(path):
        for name in [*files, "."]:
            _fsync(os.path.join(root, name))


def _fsdp_checkpoint_mismatch(checkpoint: str, model: nn.Module) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys of an FSDP checkpoint against ``model``; rank 0 reads, every rank gets them.

    Without this, the FSDP loader (``torch.distributed.checkpoint.set_model_state_dict``) raises an opaque
    ``KeyError`` for unexpected keys of a full state dict, and ignores them in a sharded (DCP) one.
    """
    mismatch = [[], []]
    if not dist.is_initialized() or dist.get_rank() == 0:
        full = os.path.join(checkpoint, f"{FSDP_MODEL_NAME}.bin")
        sharded = os.path.join(checkpoint, f"{FSDP_MODEL_NAME}_0")
        if os.path.isfile(full):
            saved = set(torch.load(full, map_location="cpu", mmap=True, weights_only=True))
        elif os.path.isdir(sharded):  # accelerate saves {"model": state_dict}: DCP keys are "model.<name>"
            from torch.distributed.checkpoint import FileSystemReader

            saved = {k.removeprefix("model.") for k in FileSystemReader(sharded).read_metadata().state_dict_metadata}
        else:
            saved = None  # not an FSDP checkpoint: the Trainer's loader says so
        if saved is not None:
            expected = set(model.state_dict())
            mismatch = [sorted(expected - saved), sorted(saved - expected)]
    if dist.is_initialized():
        dist.broadcast_object_list(mismatch, src=0)
    return mismatch[0], mismatch[1]


class AtomicCheckpointMixin:
    """``Trainer`` mixin: atomic checkpoint saves, resume from complete checkpoints only, strict loads.

    Put it before ``Trainer`` in the bases (see the module docstring). It overrides ``train`` and the private
    ``Trainer`` methods ``_save_checkpoint``, ``_get_output_dir``, ``_push_from_checkpoint`` and
    ``_load_from_checkpoint``.
    """

    _staging_root: str | None = None  # set while Trainer._save_checkpoint writes a staged checkpoint
    _deferred_push = False  # the Trainer asked to push the staged checkpoint: push the renamed one instead

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from :func:`last_complete_checkpoint`."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint-N (with a valid {TRAINER_STATE_NAME}) in "
                    f"output_dir={self.args.output_dir!r}. Start without resume_from_checkpoint, or pass a path."
                )
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and _trainer_state_step(resume_from_checkpoint) is None:
            raise ValueError(
                f"resume_from_checkpoint={str(resume_from_checkpoint)!r} is not a complete checkpoint: its "
                f"{TRAINER_STATE_NAME} is missing or truncated (a save was interrupted?). The newest complete one in "
                f"its folder is {last_complete_checkpoint(os.path.dirname(os.path.abspath(resume_from_checkpoint)))!r}."
            )
        self._remove_staged_checkpoints()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _remove_staged_checkpoints(self) -> None:
        """Delete ``_incomplete-checkpoint-*`` left by a process killed mid-save (they were never complete)."""
        out = self.args.output_dir
        if self.args.should_save and out and os.path.isdir(out):
            for name in os.listdir(out):
                if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
                    shutil.rmtree(os.path.join(out, name), ignore_errors=True)

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is not None:  # push the renamed folder, not the staged one
            self._deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` into ``_incomplete-checkpoint-N/checkpoint-N``, then one rename to ``checkpoint-N``.

        The Trainer computes the checkpoint folder from ``_get_output_dir``, which points at the staging folder while
        it saves; every rank writes there (RNG states), all wait, and the saving process renames. Rotation
        (``save_total_limit``) and the Hub push run after the rename, on the final folder.
        """
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save and os.path.isdir(staged):  # absent: another node on a shared disk renamed it
            _fsync_tree(staged)
            if os.path.exists(final):  # a checkpoint of the same step from an earlier run: replace it
                os.replace(final, os.path.join(staging_root, name + ".replaced"))
            os.replace(staged, final)
            _fsync(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
        if self._deferred_push:
            self._deferred_push = False
            super()._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load strictly: a checkpoint whose keys do not match the model raises (the Trainer's loader only warns).

        transformers models load through ``from_pretrained`` (which maps saved key names to the live ones); under
        FSDP the engine's checkpoint keys are compared first (rank 0 reads them, every rank raises), then the
        Trainer's FSDP loader runs.
        """
        target = unwrap_model(model if model is not None else self.model)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        loaded = None
        if self.is_fsdp_enabled:
            missing, unexpected = _fsdp_checkpoint_mismatch(resume_from_checkpoint, target)
        elif isinstance(target, PreTrainedModel) and os.path.isfile(weights):
            loaded, info = type(target).from_pretrained(
                resume_from_checkpoint, config=target.config, output_loading_info=True
            )
            missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
            loaded = loaded.state_dict()
        elif os.path.isfile(weights):  # a bare model (timm, nn.Module): its state dict as saved
            loaded = safetensors.torch.load_file(weights)
            expected = target.state_dict().keys()
            missing, unexpected = sorted(expected - loaded.keys()), sorted(loaded.keys() - expected)
        else:
            missing = unexpected = []
        if missing or unexpected:
            raise RuntimeError(
                f"Checkpoint {resume_from_checkpoint} does not match the model: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}. Resume with the same architecture and config."
            )
        if loaded is not None:
            target.load_state_dict(loaded)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
