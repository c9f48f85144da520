"""Non-reentrant activation checkpointing whose checkpoint encloses the regularised blocks.

transformers' ``gradient_checkpointing`` checkpoints a layer's ``forward`` only, so the VCReg hook stays outside.
timm's ``set_grad_checkpointing``, ``torch.utils.checkpoint`` called by a model, and accelerate's FSDP
``activation_checkpointing`` put the whole block call, hook included, inside the checkpoint: the backward recomputes
the block and its hook must save the same tensors again (it used to fail with "A different number of tensors was
saved during the original forward and recomputation"). Under FSDP2: ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_vcreg import VCRegTrainer

_spec = importlib.util.spec_from_file_location("_ddp_worker", Path(__file__).with_name("_ddp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


class CheckpointedCNN(worker.TinyCNN):
    """``TinyCNN`` whose blocks run under non-reentrant ``torch.utils.checkpoint`` (as timm models do)."""

    checkpointing = True

    def forward(self, pixel_values):
        x = self.stem(pixel_values)
        for block in self.blocks:
            y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
            x = x + y
        return self.head(self.embed(x.mean(dim=(2, 3))))


def _train(model, tmp_path, impl="gradient", layers=r"blocks\.\d+,embed"):
    scenario = dict(batch=4, steps=2, impl=impl, dist=False, layers=layers)
    trainer = VCRegTrainer(model=model, args=worker.make_config(str(tmp_path), scenario, ddp_backend=None),
                           train_dataset=worker.make_dataset(8))
    trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("impl", ["gradient", "loss"])
def test_checkpoint_enclosing_the_hooked_blocks_gives_the_same_update(tmp_path, impl):
    torch.manual_seed(worker.MODEL_SEED)
    plain = CheckpointedCNN()
    checkpointed = CheckpointedCNN()
    checkpointed.load_state_dict(plain.state_dict())
    plain.checkpointing = False
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    expected, plain_trainer = _train(plain, tmp_path / "plain", impl)
    got, trainer = _train(checkpointed, tmp_path / "checkpointed", impl)
    assert _max_diff(got, expected) == 0.0  # measured: bitwise
    assert _max_diff(expected, initial) > 1e-2
    assert trainer._vcreg_records == []  # the recomputation's penalties are not kept
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged == [h for h in plain_trainer.state.log_history if "loss" in h]  # one record per forward, not two


def test_timm_grad_checkpointing_gives_the_same_update(tmp_path):
    plain = worker.build_model("timm_vit")
    checkpointed = worker.build_model("timm_vit")
    checkpointed.set_grad_checkpointing(True)  # timm: non-reentrant torch.utils.checkpoint around every block
    expected, _ = _train(plain, tmp_path / "plain", layers="blocks")
    got, _ = _train(checkpointed, tmp_path / "checkpointed", layers="blocks")
    assert _max_diff(got, expected) < 1e-6, _max_diff(got, expected)
    assert _max_diff(expected, worker.build_model("timm_vit").state_dict()) > 1e-2
