"""Soft labels (mixup / cutmix) and label smoothing: the task loss is the soft-target cross-entropy, never BCE.

transformers' image classifiers switch to multi-label BCE when ``labels`` are floats; VCRegTrainer computes the
soft-target cross-entropy itself for float (B, C) labels, for transformers and bare timm models alike.
"""

from __future__ import annotations


import pytest
from _examples import load_example
import timm
import torch
import torch.nn.functional as F
from _tiny_models import hf_vit

from hf_vcreg import VCRegConfig, VCRegTrainer
from hf_vcreg.task_loss import soft_target_cross_entropy


def _args(tmp_path, **kw):
    return VCRegConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False,
                       disable_tqdm=True, **kw)


def _soft_batch(seed=0, batch=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, classes, generator=g)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "labels": q / q.sum(-1, keepdim=True)}


def _expected(logits, q, smoothing=0.0):
    q = q * (1 - smoothing) + smoothing / q.shape[-1]
    return -(q * torch.log_softmax(logits.float(), -1)).sum(-1).mean()


MODELS = {"transformers_vit": hf_vit, "timm_resnet": lambda: timm.create_model("resnet18", num_classes=3)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_labels_give_soft_target_cross_entropy_not_bce(tmp_path, name, smoothing):
    torch.manual_seed(0)
    trainer = VCRegTrainer(model=MODELS[name](), args=_args(tmp_path, vcreg_alpha=0.0, vcreg_beta=0.0,
                                                             label_smoothing_factor=smoothing))
    model = trainer.model.eval()
    batch = _soft_batch()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        logits = model(pixel_values=batch["pixel_values"]).logits if name.startswith("transformers") \
            else model(batch["pixel_values"])
    expected = _expected(logits, batch["labels"], smoothing)
    bce = F.binary_cross_entropy_with_logits(logits, batch["labels"])
    assert torch.allclose(loss, expected, atol=1e-6, rtol=1e-6)
    assert abs(loss.item() - bce.item()) > 0.05  # what transformers would have computed for float labels
    assert outputs["logits"].shape == (6, 3)


def test_soft_labels_with_vcreg_add_the_penalty_to_the_soft_cross_entropy(tmp_path):
    torch.manual_seed(0)
    trainer = VCRegTrainer(model=hf_vit(), args=_args(tmp_path, vcreg_alpha=1.0, vcreg_beta=1.0, logging_steps=1))
    model = trainer.model.eval()
    batch = _soft_batch(1)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(pixel_values=batch["pixel_values"]).logits
    task = _expected(logits, batch["labels"])
    assert loss.item() > task.item() + 1e-4  # task loss + a positive penalty
    recorded = trainer._vcreg_metrics["eval"]["task_loss"][-1]
    assert torch.allclose(recorded, task, atol=1e-6)


def test_one_hot_soft_labels_equal_hard_label_cross_entropy():
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 2, 3])
    one_hot = F.one_hot(labels, 4).float()
    for s in (0.0, 0.2):
        assert torch.allclose(soft_target_cross_entropy(logits, one_hot, s), F.cross_entropy(logits, labels, label_smoothing=s))
    with pytest.raises(ValueError, match=r"soft labels of shape \(5, 3\) do not match the logits \(5, 4\)"):
        soft_target_cross_entropy(logits, one_hot[:, :3])


def test_label_smoothing_with_model_init_on_hard_labels(tmp_path):
    def model_init():
        torch.manual_seed(0)
        return hf_vit()

    trainer = VCRegTrainer(model_init=model_init, args=_args(tmp_path, vcreg_alpha=0.0, vcreg_beta=0.0,
                                                             label_smoothing_factor=0.1))
    model = trainer.model.eval()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"pixel_values": x, "labels": labels})
        logits = model(pixel_values=x).logits
    assert torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-4)


def test_pretrain_mixup_trains_on_soft_labels_with_the_soft_loss(tmp_path):
    pretrain = load_example("pretrain")
    data_args = pretrain.DataArguments(mixup_alpha=0.8, cutmix_alpha=1.0)
    mix = pretrain.batch_mixer(data_args, num_labels=3)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, soft = mix(x, y)
    assert soft.shape == (8, 3) and soft.dtype.is_floating_point and torch.allclose(soft.sum(-1), torch.ones(8))
    assert not torch.equal(mixed, x)
    torch.manual_seed(0)
    trainer = pretrain.PretrainTrainer(model=hf_vit(), args=_args(tmp_path, vcreg_alpha=0.0, vcreg_beta=0.0),
                                       batch_mix=mix)
    model = trainer.model.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(model, {"pixel_values": x, "labels": y})
    torch.manual_seed(1)
    mixed, soft = mix(x, y)  # the same draw
    with torch.no_grad():
        model.eval()  # ViT dropout is 0: eval and train logits agree
        expected = _expected(model(pixel_values=mixed).logits, soft)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
