"""Resuming from a checkpoint that does not match the model is refused, before any weight is loaded.

The Trainer's own loader only warns about missing / unexpected keys (``load_state_dict(strict=False)``), and
``from_pretrained`` fills missing weights with fresh ones: a resume onto another architecture (one block more or
less) would train on silently. ``VCRegTrainer._load_from_checkpoint`` raises instead, naming the keys. One process
here, for a transformers model (``from_pretrained`` path) and a bare ``nn.Module`` (its saved state dict); the same
under FSDP2 in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hf_vcreg import VCRegTrainer

_spec = importlib.util.spec_from_file_location("_ddp_worker", Path(__file__).with_name("_ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

LAYERS = {"vit": "blocks", "cnn": r"blocks\.\d+"}
BLOCK = {"vit": "vit.layers.2.", "cnn": "blocks.2."}


def _trainer(kind: str, depth: int, output_dir: Path) -> VCRegTrainer:
    scenario = dict(batch=4, steps=1, impl="gradient", dist=False, layers=LAYERS[kind])
    args = worker.make_config(str(output_dir), scenario, ddp_backend=None, save_strategy="steps", save_steps=1)
    return VCRegTrainer(model=worker.build_model(kind, depth=depth), args=args, train_dataset=worker.make_dataset(8))


def _checkpoint(kind: str, depth: int, tmp_path: Path) -> str:
    trainer = _trainer(kind, depth, tmp_path / f"{kind}_depth{depth}")
    trainer.train()
    return str(tmp_path / f"{kind}_depth{depth}" / "checkpoint-1")


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_resume_from_checkpoint_of_another_depth_is_refused_before_loading(tmp_path, kind, case):
    # missing: a 3-block model resumes a 2-block checkpoint; unexpected: a 2-block model resumes a 3-block one.
    saved_depth, model_depth = (2, 3) if case == "missing" else (3, 2)
    checkpoint = _checkpoint(kind, saved_depth, tmp_path)
    trainer = _trainer(kind, model_depth, tmp_path / "resumed")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="does not match the model") as err:
        trainer.train(resume_from_checkpoint=checkpoint)
    message = str(err.value)
    missing, unexpected = message.split("missing keys ")[1].split(", unexpected keys ")
    named, empty = (missing, unexpected) if case == "missing" else (unexpected, missing)
    assert f"'{BLOCK[kind]}" in named and empty.startswith("[]"), message
    assert "Resume with the same architecture and config" in message
    assert trainer.state.global_step == 0
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded
