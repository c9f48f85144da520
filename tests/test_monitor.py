"""Monitor-only mode: the VCReg statistics are logged, the training is bit for bit the plain run's."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from torch.utils.data import SequentialSampler

from _tiny_models import build
from hf_vcreg import VCRegConfig, VCRegTrainer, covariance_loss, variance_loss

STAT_KEYS = ("vcreg/variance", "vcreg/covariance")


def make_dataset(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g).numpy(),
            "labels": torch.randint(0, 3, (n,), generator=g).numpy()}
    return datasets.Dataset.from_dict(data).with_format("torch")


class OrderedTrainer(VCRegTrainer):
    """Batches in data set order, so the first step's batch is known to the independent computation."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def run(name, tmp_path, dataset, **kw):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=0.05,
                  optim="sgd", lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                  use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, seed=0)
    model = build(name)
    trainer = OrderedTrainer(model=model, args=VCRegConfig(**{**values, **kw}), train_dataset=dataset,
                             eval_dataset=make_dataset(8, seed=1))
    trainer.train()
    return model, trainer


def independent_statistics(name, layer_names, batch):
    """V and K of each named module's output on ``batch``, for the untrained model, with plain forward hooks."""
    model = build(name)
    model.train()
    modules = dict(model.named_modules())
    outputs = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n in layer_names]
    with torch.no_grad():
        model(pixel_values=batch)
    for h in handles:
        h.remove()
    stats = {}
    for n, out in outputs.items():
        x = out[0] if isinstance(out, tuple) else out
        z = x.movedim(1, -1) if x.dim() == 4 else x  # CNN maps (B, C, H, W): channels; tokens (B, N, D): last axis
        z = z.reshape(-1, z.shape[-1])
        stats[n] = (variance_loss(z).item(), covariance_loss(z).item())
    return stats


@pytest.mark.parametrize("name,coefficients", [
    ("hf_vit", {"vcreg_alpha": 5.0, "vcreg_beta": 5.0}),  # set, and not applied
    ("hf_resnet", {"vcreg_alpha": 0.0, "vcreg_beta": 0.0}),  # off, and the layers are still hooked
])
def test_monitor_only_trains_bit_for_bit_like_the_plain_run_and_logs_the_statistics(name, coefficients, tmp_path):
    dataset = make_dataset()
    plain, plain_trainer = run(name, tmp_path / "plain", dataset, vcreg_alpha=0.0, vcreg_beta=0.0)
    monitor, trainer = run(name, tmp_path / "monitor", dataset, vcreg_monitor_only=True, vcreg_log_per_layer=True,
                           vcreg_layers="blocks", **coefficients)
    assert plain_trainer.vcreg_layer_names == [] and len(trainer.vcreg_layer_names) == 2
    plain_state, monitor_state = plain.state_dict(), monitor.state_dict()
    assert plain_state.keys() == monitor_state.keys()
    assert all(torch.equal(plain_state[k], monitor_state[k]) for k in plain_state)  # weights and BN buffers
    assert any(not torch.equal(plain_state[k], build(name).state_dict()[k]) for k in plain_state)  # it trained
    steps = [h for h in trainer.state.log_history if "task_loss" in h]
    plain_steps = [h for h in plain_trainer.state.log_history if "task_loss" in h]
    assert len(steps) == 3
    for logged, reference in zip(steps, plain_steps):
        assert "vcreg/penalty" not in logged
        assert logged["loss"] == reference["loss"] == pytest.approx(logged["task_loss"], rel=1e-6)
        assert logged["vcreg/skipped_layers"] == 0
        assert all(math.isfinite(logged[k]) for k in STAT_KEYS)
    # Step 1 sees the untrained model and the first batch: its statistics, computed here independently.
    expected = independent_statistics(name, trainer.vcreg_layer_names, dataset[:8]["pixel_values"])
    first = steps[0]
    for layer, (v, k) in expected.items():
        assert first[f"vcreg/variance/{layer}"] == pytest.approx(v, rel=1e-5)
        assert first[f"vcreg/covariance/{layer}"] == pytest.approx(k, rel=1e-4, abs=1e-9)
    assert first["vcreg/variance"] == pytest.approx(sum(v for v, _ in expected.values()) / 2, rel=1e-5)
    assert first["vcreg/covariance"] == pytest.approx(sum(k for _, k in expected.values()) / 2, rel=1e-4)
    assert first["vcreg/covariance"] > 0 and first["vcreg/variance"] > 0
    metrics = trainer.evaluate()
    assert "eval_vcreg/penalty" not in metrics and metrics["eval_loss"] == pytest.approx(metrics["eval_task_loss"])
    assert all(math.isfinite(metrics[f"eval_{k}"]) for k in STAT_KEYS)
    assert all(not m._forward_hooks for m in monitor.modules())


def test_monitor_statistics_use_the_penalty_runs_rows(tmp_path):
    """With ``vcreg_max_rows`` the monitor uses the same row subsets as a penalised run (same seed, same step)."""
    dataset = make_dataset()
    common = dict(vcreg_max_rows=12, vcreg_log_per_layer=True, max_steps=1)
    _, monitor = run("hf_vit", tmp_path / "monitor", dataset, vcreg_monitor_only=True, **common)
    _, penalised = run("hf_vit", tmp_path / "penalised", dataset, vcreg_alpha=1.0, vcreg_beta=1.0,
                       vcreg_implementation="loss", **common)
    _, all_rows = run("hf_vit", tmp_path / "all", dataset, vcreg_monitor_only=True, vcreg_log_per_layer=True,
                      max_steps=1)
    m, p, a = (t.state.log_history[0] for t in (monitor, penalised, all_rows))
    keys = [k for k in m if k.startswith("vcreg/variance") or k.startswith("vcreg/covariance")]
    assert len(keys) == 6  # the two means and two layers x two terms
    assert all(m[k] == pytest.approx(p[k], rel=1e-6) for k in keys)  # the first step's model is the same
    assert any(m[k] != pytest.approx(a[k], rel=1e-3) for k in keys)  # and 12 rows are not all 17 x 8


def test_monitor_only_allows_reentrant_checkpointing_and_is_a_strict_bool(tmp_path):
    # Without a gradient there is nothing for reentrant checkpointing to drop: the penalty's refusal does not apply.
    args = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = VCRegTrainer(model=build("hf_vit"), args=VCRegConfig(vcreg_monitor_only=True, **args))
    assert trainer.vcreg_layer_names == ["vit.layers.0", "vit.layers.1"]
    with pytest.raises(ValueError, match=r"use_reentrant"):
        VCRegTrainer(model=build("hf_vit"), args=VCRegConfig(**args))
    with pytest.raises(ValueError, match=r"^vcreg_monitor_only='true' is invalid: use a bool: true or false"):
        VCRegConfig(output_dir=str(tmp_path), vcreg_monitor_only="true")
