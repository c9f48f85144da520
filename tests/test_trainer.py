"""VCRegTrainer: loss composition, gradient-accumulation scaling per architecture, logging, lifecycle, errors."""

import json
import logging
import os
import types

import datasets
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

from _tiny_models import build
from hf_vcreg import VCRegConfig, VCRegTrainer, vcreg_loss
from hf_vcreg.capture import BlockCapture, find_blocks

N_TRAIN = 16


def make_dataset(n=N_TRAIN, seed=0, num_labels=3, frames=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, frames, 3, 32, 32) if frames else (n, 3, 32, 32)
    data = {"pixel_values": torch.randn(shape, generator=g).numpy(), "labels": torch.randint(0, num_labels, (n,), generator=g).numpy()}
    return datasets.Dataset.from_dict(data).with_format("torch")


class OrderedTrainer(VCRegTrainer):
    """Deterministic sample order (no shuffling) so a hand-written reference can see the same micro-batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def freeze_batchnorm(model):
    """Keep BatchNorm in eval mode: batch statistics legitimately differ between batch 8 and 2 x 4."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
            m.eval()
    return model


def config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_drop_last=True,
        vcreg_alpha=1.0, vcreg_beta=1.0, vcreg_layers="blocks",  # the mechanics on every block, whatever the default
    )
    defaults.update(kw)
    return VCRegConfig(**defaults)


def params(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def train(name, tmp_path, dataset=None, trainer_cls=OrderedTrainer, **kw):
    model = freeze_batchnorm(build(name))
    trainer = trainer_cls(model=model, args=config(tmp_path, **kw), train_dataset=dataset or make_dataset())
    trainer.train()
    return model, trainer


GA_MODELS = ["hf_vit", "hf_resnet", "hf_convnext", "timm_resnet", "timm_wrapper"]


@pytest.mark.parametrize("name", GA_MODELS)
def test_grad_accumulation_matches_large_batch_with_penalty_off(name, tmp_path):
    p0 = params(freeze_batchnorm(build(name)))
    big, _ = train(name, tmp_path / "a", vcreg_alpha=0.0, vcreg_beta=0.0, max_steps=1)
    acc, _ = train(
        name, tmp_path / "b", vcreg_alpha=0.0, vcreg_beta=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    update_big, update_acc = params(big) - p0, params(acc) - p0
    assert update_big.abs().max() > 1e-4  # a real update happened
    torch.testing.assert_close(update_acc, update_big, rtol=1e-4, atol=1e-6)


def _reference_update(name, dataset, micro_batches, alpha, beta, lr=0.1, frames=False):
    """SGD step on mean over micro-batches of (task loss + mean over blocks of alpha V + beta K), by autograd."""
    model = freeze_batchnorm(build(name))
    model.train()
    outputs = []
    capture = BlockCapture(model, find_blocks(model), lambda layer, x: outputs.append((layer, x)) or x)
    capture.install()
    grads = None
    for idx in micro_batches:
        batch = dataset[idx]
        outputs.clear()
        with capture.active():
            if name.startswith("timm_") and name != "timm_wrapper":
                task = nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            else:
                task = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
        pens = []
        for layer, x in outputs:
            z = x.movedim(layer.axis, -1).reshape(-1, x.shape[layer.axis])
            pens.append(vcreg_loss(z, alpha, beta)[0])
        loss = (task + torch.stack(pens).mean()) / len(micro_batches)
        g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(model.parameters(), g)]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return -lr * torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", ["hf_vit", "hf_convnext", "timm_resnet"])
@pytest.mark.parametrize("implementation", ["gradient", "loss"])
def test_update_with_penalty_is_mean_of_per_micro_batch_gradients(name, implementation, tmp_path):
    dataset = make_dataset()
    p0 = params(freeze_batchnorm(build(name)))
    model, _ = train(
        name, tmp_path, dataset=dataset, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        vcreg_alpha=0.5, vcreg_beta=2.0, vcreg_implementation=implementation,
    )
    expected = _reference_update(name, dataset, [list(range(0, 4)), list(range(4, 8))], 0.5, 2.0)
    torch.testing.assert_close(params(model) - p0, expected, rtol=1e-4, atol=1e-6)
    # and the penalty really changed the update
    off, _ = train(name, tmp_path / "off", dataset=dataset, per_device_train_batch_size=4, gradient_accumulation_steps=2, vcreg_alpha=0.0, vcreg_beta=0.0)
    assert (params(model) - params(off)).abs().max() > 1e-5


def test_logs_task_loss_and_vcreg_terms_in_train_and_eval(tmp_path):
    dataset = make_dataset()
    model = build("hf_vit")
    trainer = OrderedTrainer(
        model=model, args=config(tmp_path, max_steps=2, vcreg_log_per_layer=True, vcreg_alpha=0.5, vcreg_beta=2.0),
        train_dataset=dataset, eval_dataset=make_dataset(8, seed=1),
    )
    trainer.train()
    first = trainer.state.log_history[0]
    expected_keys = {"loss", "task_loss", "vcreg/penalty", "vcreg/variance", "vcreg/covariance", "vcreg/skipped_layers"}
    assert expected_keys <= set(first)
    assert {"vcreg/variance/vit.layers.0", "vcreg/covariance/vit.layers.1"} <= set(first)
    assert first["loss"] == pytest.approx(first["task_loss"] + first["vcreg/penalty"], rel=1e-5)
    assert first["vcreg/penalty"] == pytest.approx(0.5 * first["vcreg/variance"] + 2.0 * first["vcreg/covariance"], rel=1e-5)
    assert first["vcreg/skipped_layers"] == 0
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_task_loss"] + metrics["eval_vcreg/penalty"], rel=1e-5)
    assert 0 <= metrics["eval_vcreg/variance"] <= 1.0 and metrics["eval_vcreg/covariance"] >= 0
    assert "eval_vcreg/variance/vit.layers.1" in metrics


@pytest.mark.parametrize("evaluate", [False, True])
def test_cpu_scratch_buffers_are_held_during_training_and_released_after(tmp_path, evaluate):
    from transformers import TrainerCallback

    from hf_vcreg import penalty

    held = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            held.append(penalty.scratch_bytes())

    model = build("hf_resnet")
    trainer = OrderedTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=make_dataset(),
                             eval_dataset=make_dataset(8, seed=1), callbacks=[Probe()])
    trainer.train()
    assert len(held) == 2 and min(held) > 0  # reused across steps: the same buffers, not fresh memory per layer
    assert held[0] == held[1] and penalty.scratch_bytes() == 0
    if evaluate:
        trainer.evaluate()
        assert penalty.scratch_bytes() == 0


def test_model_is_tagged_and_saved_without_trace_of_hf_vcreg(tmp_path):
    model, trainer = train("hf_vit", tmp_path / "run")
    assert "vcreg" in model.model_tags
    assert all(not m._forward_hooks for m in model.modules())
    trainer.save_model(str(tmp_path / "saved"))
    reference = build("hf_vit")
    reference.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "plain" / "model.safetensors"))
    for fname in os.listdir(tmp_path / "saved"):
        if fname.endswith(".json"):
            text = (tmp_path / "saved" / fname).read_text()
            assert "hf_vcreg." not in text  # no importable reference to the package in configs
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]


def test_bare_timm_model_trains_and_evaluates(tmp_path):
    model = build("timm_resnet")
    trainer = VCRegTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=make_dataset(), eval_dataset=make_dataset(8, seed=2))
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_task_loss"] + metrics["eval_vcreg/penalty"], rel=1e-5)
    assert trainer.state.log_history[0]["vcreg/penalty"] > 0


def test_video_transformer_trains(tmp_path):
    model = build("hf_videomae")
    trainer = VCRegTrainer(model=model, args=config(tmp_path, max_steps=1, per_device_train_batch_size=4), train_dataset=make_dataset(8, frames=4))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["vcreg/penalty"] > 0 and log["vcreg/skipped_layers"] == 0


def test_bf16_autocast_training_stays_finite(tmp_path):
    model, trainer = train("hf_vit", tmp_path, bf16=True, max_steps=3)
    assert torch.isfinite(params(model)).all()
    logs = [h for h in trainer.state.log_history if "vcreg/penalty" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["vcreg/penalty"])) for h in logs)


def test_non_reentrant_gradient_checkpointing_gives_the_same_update(tmp_path):
    p0 = params(build("hf_vit"))
    plain, _ = train("hf_vit", tmp_path / "a")
    ckpt, _ = train(
        "hf_vit", tmp_path / "b", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    torch.testing.assert_close(params(ckpt) - p0, params(plain) - p0, rtol=1e-4, atol=1e-6)


def test_reentrant_gradient_checkpointing_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"use_reentrant.*silently drop the VCReg gradient.*use_reentrant': False"):
        train("hf_vit", tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})


class _CheckpointedNet(nn.Module):
    """Blocks run under reentrant torch.utils.checkpoint by the model itself (as timm can do)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values):
        x = pixel_values.flatten(1)[:, :8]
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
        return self.head(x)


def test_reentrant_checkpointing_inside_the_model_raises_a_clear_error(tmp_path):
    trainer = VCRegTrainer(model=_CheckpointedNet(), args=config(tmp_path), train_dataset=make_dataset())
    with pytest.raises(RuntimeError, match=r"Block 'blocks.0' ran without autograd.*use_reentrant=False"):
        trainer.train()


def test_torch_compile_gives_the_same_update(tmp_path):
    p0 = params(build("hf_vit"))
    eager, _ = train("hf_vit", tmp_path / "a")
    compiled, _ = train("hf_vit", tmp_path / "b", torch_compile=True, torch_compile_backend="aot_eager")
    torch.testing.assert_close(params(compiled) - p0, params(eager) - p0, rtol=1e-4, atol=1e-6)


def test_batch_of_one_skips_the_penalty_and_warns_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hf_vcreg.trainer")
    model, trainer = train("hf_vit", tmp_path, per_device_train_batch_size=1, max_steps=2, vcreg_layers="vit.layernorm")
    # vit.layernorm sees (1, 17, 32): 17 rows, fine; the pooled classifier input is not regularised
    assert trainer.state.log_history[0]["vcreg/skipped_layers"] == 0
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), nn.Linear(8, 3))
    trainer = VCRegTrainer(model=flat, args=config(tmp_path / "b", per_device_train_batch_size=1, max_steps=3, vcreg_layers=r"2"), train_dataset=make_dataset())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "vcreg/skipped_layers" in h]
    assert [h["vcreg/skipped_layers"] for h in logs] == [1.0, 1.0, 1.0]
    assert [h["vcreg/penalty"] for h in logs] == [0.0, 0.0, 0.0]
    warnings = [r for r in caplog.records if "skipped layer '2'" in r.getMessage()]
    assert len(warnings) == 1
    assert torch.isfinite(params(flat)).all()


def test_trainer_rejects_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="args must be a VCRegConfig, got TrainingArguments"):
        VCRegTrainer(model=build("hf_vit"), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_trainer_rejects_model_without_blocks(tmp_path):
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ValueError, match="no blocks were detected in Sequential"):
        VCRegTrainer(model=flat, args=config(tmp_path), train_dataset=make_dataset())


def test_distributed_stats_without_process_group_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vcreg_distributed_stats=True needs a torch.distributed process group"):
        VCRegTrainer(model=build("hf_vit"), args=config(tmp_path, vcreg_distributed_stats=True))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("vcreg_alpha", -1.0, "vcreg_alpha=-1.0 is invalid: use a finite number >= 0"),
        ("vcreg_beta", float("nan"), "vcreg_beta=nan is invalid"),
        ("vcreg_gamma", 0.0, "vcreg_gamma=0.0 is invalid: use a finite number > 0"),
        ("vcreg_max_rows", 1, "vcreg_max_rows=1 is invalid: use an integer >= 2"),
        ("vcreg_implementation", "fast", "vcreg_implementation='fast' is invalid"),
        ("vcreg_delta", -0.5, "vcreg_delta=-0.5 is invalid"),
    ],
)
def test_invalid_coefficients_are_rejected_by_the_config(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VCRegConfig(output_dir=str(tmp_path), report_to=[], **{field: value})


def test_plain_trainer_and_vcreg_trainer_with_penalty_off_agree(tmp_path):
    """With alpha = beta = 0 no hooks are installed and the update is the Trainer's own (ViT: GA-correct there too)."""
    dataset = make_dataset()
    ours, _ = train("hf_vit", tmp_path / "a", dataset=dataset, vcreg_alpha=0.0, vcreg_beta=0.0)
    model = build("hf_vit")
    args = TrainingArguments(**{k: v for k, v in config(tmp_path / "b").to_dict().items() if not k.startswith("vcreg_") and k in TrainingArguments.__dataclass_fields__ and TrainingArguments.__dataclass_fields__[k].init})
    plain = Trainer(model=model, args=args, train_dataset=dataset)
    plain._get_train_sampler = lambda *a, **k: SequentialSampler(dataset)
    plain.train()
    torch.testing.assert_close(params(model), params(ours), rtol=1e-5, atol=1e-7)
