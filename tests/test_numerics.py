"""Numerics: mixed precision, huge activations, constant features, very wide layers and tiny batches.

Nothing here may put a NaN or an inf into the weights or the logs. Where the statistics are undefined (fewer
than 2 rows, or non-finite values) the layer's penalty and gradient are 0 for that step, ``vcreg/skipped_layers``
counts it, and one warning per layer says so.

Precision notes (CPU, transformers 5.24 / accelerate 1.15): ``bf16=True`` runs the forward under
``torch.autocast("cpu", torch.bfloat16)`` (block outputs are bf16; tested below through the Trainer).
``fp16=True`` is accepted on CPU but accelerate does not enable fp16 autocast there (the forward stays float32),
so the fp16 path is tested by running ``compute_loss`` and the backward under
``torch.autocast("cpu", torch.float16)`` directly, with a loss scale as a GradScaler applies it.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from _kill_train import config, dataset, trainer, weights
from torch import nn

import hf_vcreg.trainer as trainer_module
from hf_vcreg import VCRegFunction, VCRegSpec, VCRegTrainer, vcreg_loss

GAMMA, EPS = 1.0, 1e-4


class Block(nn.Module):
    """``scale * fc2(gelu(fc1(norm(x)))) + shift``: ``scale`` sets the size of this block's output (whatever the
    input's), 0 gives constant features."""

    def __init__(self, d_in: int, d_out: int, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return self.scale * self.fc2(nn.functional.gelu(self.fc1(self.norm(x)))) + self.shift


class Toy(nn.Module):
    """A bare classifier on flattened ``pixel_values``: two blocks (regularised), a normalised linear head."""

    def __init__(self, d_in=48, widths=(16, 16), scales=(1.0, 1.0), shifts=(0.0, 0.0), num_labels=3):
        super().__init__()
        dims = (d_in, *widths)
        self.blocks = nn.ModuleList(Block(dims[i], dims[i + 1], scales[i], shifts[i]) for i in range(len(widths)))
        self.head = nn.Sequential(nn.LayerNorm(widths[-1]), nn.Linear(widths[-1], num_labels))

    def forward(self, pixel_values):
        x = pixel_values.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def toy_trainer(tmp_path, seed=0, n=12, **kw):
    model_kw = {k: kw.pop(k) for k in ("widths", "scales", "shifts") if k in kw}
    torch.manual_seed(seed)
    args = config(tmp_path, max_steps=kw.pop("max_steps", 3), save_strategy="no", **kw)
    return VCRegTrainer(model=Toy(**model_kw), args=args, train_dataset=dataset(n, size=4))


def assert_finite_run(t):
    for name, w in weights(t.model).items():
        assert torch.isfinite(w).all(), f"non-finite weight {name}"
    lines = [e for e in t.state.log_history if "loss" in e]
    assert lines
    for e in lines:
        for k, v in e.items():
            assert math.isfinite(v), f"step {e['step']}: {k} = {v}"
    return lines


class DtypeSpy:
    def __init__(self, monkeypatch):
        self.dtypes = []
        original = trainer_module.apply_penalty

        def spy(x, *a, **kw):
            self.dtypes.append(x.dtype)
            return original(x, *a, **kw)

        monkeypatch.setattr(trainer_module, "apply_penalty", spy)


# --------------------------------------------------------------------------------------------- mixed precision
def test_bf16_training_on_cpu_regularises_bf16_block_outputs_with_float32_statistics(tmp_path, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    runs = {}
    for bf16 in (False, True):
        t = trainer("hf_resnet", config(tmp_path / str(bf16), bf16=bf16, max_steps=3, save_strategy="no"))
        t.train()
        runs[bf16] = assert_finite_run(t)
    assert set(spy.dtypes[: len(spy.dtypes) // 2]) == {torch.float32}
    assert set(spy.dtypes[len(spy.dtypes) // 2 :]) == {torch.bfloat16}
    # Step 1 starts from the same weights: bf16 activations change the statistics by bf16 rounding only.
    for key in ("vcreg/penalty", "vcreg/variance", "vcreg/covariance", "task_loss"):
        assert runs[True][0][key] == pytest.approx(runs[False][0][key], rel=0.05), key
    assert all(e["vcreg/skipped_layers"] == 0 for e in runs[True])


def _relative_error(grads, ref) -> float:
    num = sum((grads[n] - ref[n]).square().sum() for n in ref)
    return (num / sum(g.square().sum() for g in ref.values())).sqrt().item()


@pytest.mark.parametrize("implementation", ["gradient", "loss"])
def test_fp16_autocast_with_loss_scaling_gives_the_float32_gradient(tmp_path, implementation, monkeypatch):
    """The injected VCReg gradient is scaled by the loss scale like the task gradient, and unscales exactly."""
    spy = DtypeSpy(monkeypatch)
    batch = dict(dataset(8, size=4)[:8])
    grads = {}
    for coef in (0.0, 1.0):
        t = toy_trainer(tmp_path, vcreg_implementation=implementation, vcreg_alpha=coef, vcreg_beta=coef)
        for mode, scale in (("fp32", 1.0), ("fp16", 2.0**16)):  # 2^16: GradScaler's initial scale
            t.model.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=mode == "fp16"):
                loss = t.compute_loss(t.model, batch)
            (loss * scale).backward()
            grads[coef, mode] = {n: p.grad.double() / scale for n, p in t.model.named_parameters()}
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads[coef, mode].values())
        t._remove_hooks()
    assert spy.dtypes == [torch.float32] * 2 + [torch.float16] * 2  # the blocks really ran in fp16
    # The whole gradient, and the VCReg part of it alone (with minus without VCReg), agree with float32 to fp16
    # rounding (2^-11 ~ 5e-4 per element, accumulated over two blocks).
    assert _relative_error(grads[1.0, "fp16"], grads[1.0, "fp32"]) < 5e-3
    part = {mode: {n: grads[1.0, mode][n] - grads[0.0, mode][n] for n in grads[0.0, mode]} for mode in ("fp16", "fp32")}
    assert _relative_error(part["fp16"], part["fp32"]) < 2e-2
    assert _relative_error(part["fp32"], grads[1.0, "fp32"]) > 0.05  # and that part is not negligible


# ------------------------------------------------------------------------------------------- huge activations
@pytest.mark.parametrize("bf16", [False, True])
def test_activations_at_1e4_scale_train_without_nan_or_inf(tmp_path, bf16):
    t = toy_trainer(tmp_path, scales=(1e4, 1e4), bf16=bf16, vcreg_log_per_layer=True)
    t.train()
    lines = assert_finite_run(t)
    assert all(e["vcreg/skipped_layers"] == 0 for e in lines)
    # Variances are ~1e8: the hinge is inactive and the covariance term is huge, yet finite.
    assert all(e["vcreg/variance"] == 0.0 and e["vcreg/covariance"] > 1e4 for e in lines)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("delta", [None, 1.0])
def test_gradient_at_1e4_scale_matches_float64_autograd(dtype, rtol, delta):
    torch.manual_seed(0)
    x64 = torch.randn(64, 12, dtype=torch.float64) * 1e4 + 3e4
    x = x64.to(dtype)
    spec = VCRegSpec(alpha=1.0, beta=1.0, delta=delta)
    xg = x.clone().requires_grad_()
    _, penalty, v, k, valid = VCRegFunction.apply(xg, 1, None, spec, None)
    penalty.backward()
    ref = x.double().requires_grad_()
    vcreg_loss(ref, 1.0, 1.0, spec.gamma, spec.eps, delta)[0].backward()
    assert valid.item() and torch.isfinite(xg.grad).all() and torch.isfinite(penalty)
    torch.testing.assert_close(xg.grad.double(), ref.grad, rtol=rtol, atol=rtol * ref.grad.abs().max().item())


# ------------------------------------------------------------------------------------------ constant features
@pytest.mark.parametrize("implementation", ["gradient", "loss"])
def test_constant_features_give_the_variance_floor_and_a_finite_zero_gradient(implementation):
    x = torch.full((10, 6), 3.0, dtype=torch.float64, requires_grad=True)
    spec = VCRegSpec(alpha=1.0, beta=1.0, gamma=GAMMA, eps=EPS)
    from hf_vcreg.penalty import apply_penalty

    out, penalty, v, k, valid = apply_penalty(x, 1, None, spec, None, implementation)
    assert valid.item()
    assert v.item() == pytest.approx(GAMMA - math.sqrt(EPS), abs=1e-12) and k.item() == 0.0
    (out.sum() + penalty).backward()
    # The variance gradient is Zc-proportional: zero for constant features (and finite, thanks to eps).
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_a_block_with_constant_output_trains_with_finite_weights_and_logs(tmp_path):
    t = toy_trainer(tmp_path, scales=(1.0, 0.0), shifts=(0.0, 2.5), vcreg_log_per_layer=True)
    t.train()
    lines = assert_finite_run(t)
    for e in lines:
        assert e["vcreg/variance/blocks.1"] == pytest.approx(GAMMA - math.sqrt(EPS), rel=1e-6)
        assert e["vcreg/covariance/blocks.1"] == 0.0 and e["vcreg/skipped_layers"] == 0


# ---------------------------------------------------------------------------------------------- wide layers
@pytest.mark.parametrize("rows", [3])
def test_width_4096_with_few_rows_matches_autograd(rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 4096, dtype=torch.float64)
    spec = VCRegSpec(alpha=0.7, beta=0.3)
    xg = x.clone().requires_grad_()
    _, penalty, v, k, valid = VCRegFunction.apply(xg, 1, None, spec, None)
    penalty.backward()
    ref = x.clone().requires_grad_()
    total, v_ref, k_ref = vcreg_loss(ref, 0.7, 0.3)
    total.backward()
    assert valid.item()
    torch.testing.assert_close(penalty, total.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(xg.grad, ref.grad, rtol=1e-8, atol=1e-14)


def test_width_4096_block_trains_with_finite_weights_and_logs(tmp_path):
    t = toy_trainer(tmp_path, widths=(16, 4096), per_device_train_batch_size=2, max_steps=2)
    t.train()
    lines = assert_finite_run(t)
    assert all(e["vcreg/skipped_layers"] == 0 and e["vcreg/covariance"] > 0 for e in lines)


# ------------------------------------------------------------------------------------------------ tiny batches
def test_one_sample_batches_skip_the_penalty_log_it_and_warn_once_per_layer(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_vcreg.trainer"):
        t = toy_trainer(tmp_path, per_device_train_batch_size=1, max_steps=4)
        t.train()
    lines = assert_finite_run(t)
    assert [e["vcreg/skipped_layers"] for e in lines] == [2.0] * 4
    assert all(e["vcreg/penalty"] == 0.0 for e in lines)
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_vcreg.trainer"]
    assert len(warnings) == 2, warnings  # 4 logged steps, 2 layers: one warning per layer, not per step
    assert sorted(w.split("'")[1] for w in warnings) == ["blocks.0", "blocks.1"]
    assert all("fewer than 2 rows" in w and "100% of train steps" in w for w in warnings)
    # Skipped layers contribute nothing: the run equals one without VCReg.
    plain = toy_trainer(tmp_path / "plain", per_device_train_batch_size=1, max_steps=4, vcreg_alpha=0.0, vcreg_beta=0.0)
    plain.train()
    final, final_plain = weights(t.model), weights(plain.model)
    assert all(torch.equal(final[k], final_plain[k]) for k in final)


@pytest.mark.parametrize("implementation", ["gradient", "loss"])
def test_non_finite_statistics_skip_the_layer_and_pass_the_gradient_through(implementation):
    from hf_vcreg.penalty import apply_penalty

    x = torch.randn(8, 5)
    x[3, 2] = float("inf")
    x.requires_grad_()
    out, penalty, v, k, valid = apply_penalty(x, 1, None, VCRegSpec(alpha=1.0, beta=1.0), None, implementation)
    assert not valid.item() and penalty.item() == 0.0
    w = torch.randn(8, 5)
    (out * w).sum().add(penalty).backward()
    torch.testing.assert_close(x.grad, w)
