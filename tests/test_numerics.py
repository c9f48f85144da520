"""Numerics: mixed precision, huge activations, constant features, very wide layers and tiny batches.

Nothing here may put a NaN or an inf into the weights or the logs (training, evaluation and summary entries: every
Trainer run below also evaluates). Where the statistics are undefined (fewer than 2 rows, or non-finite values)
the layer's penalty and gradient are 0 for that step, ``vcreg/skipped_layers`` counts it, and one warning per
layer says so.

Precision notes (CPU, transformers 5.24 / accelerate 1.15): ``bf16=True`` runs the forward under
``torch.autocast("cpu", torch.bfloat16)`` (block outputs are bf16; tested below through the Trainer).
``fp16=True`` is accepted on CPU but does nothing there: accelerate enables fp16 autocast and a GradScaler only
off the CPU (see ``test_fp16_with_a_real_cpu_grad_scaler_skips_the_vcreg_overflow_step_and_backs_off``), so the
fp16 path is tested by running ``compute_loss`` and the backward under ``torch.autocast("cpu", torch.float16)``
directly: with a fixed loss scale, and in a loop with a real ``torch.amp.GradScaler("cpu")``.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from _kill_train import config, dataset, trainer, weights
from torch import nn

import hf_vcreg.trainer as trainer_module
from hf_vcreg import VCRegTrainer, vcreg_loss
from hf_vcreg.penalty import VCRegFunction, VCRegSpec

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


def evaluating(max_steps: int) -> dict:
    """Config fields for one evaluation, at the last step (``eval_dataset`` must be given too)."""
    return dict(eval_strategy="steps", eval_steps=max_steps)


def toy_trainer(tmp_path, seed=0, n=12, model=None, **kw):
    """A ``Toy`` (or ``model``) trainer on ``n`` 4x4 images, evaluated on 8 others at its last step."""
    model_kw = {k: kw.pop(k) for k in ("widths", "scales", "shifts") if k in kw}
    torch.manual_seed(seed)
    max_steps = kw.pop("max_steps", 3)
    args = config(tmp_path, **{"max_steps": max_steps, "save_strategy": "no", **evaluating(max_steps), **kw})
    return VCRegTrainer(
        model=model or Toy(**model_kw), args=args, train_dataset=dataset(n, size=4),
        eval_dataset=dataset(8, seed=1, size=4),
    )


def assert_finite_run(t):
    """Finite weights, every value of every log entry (training, evaluation, summary) a finite number, and at least
    one evaluation entry (with its VCReg terms). Returns the training lines (those with ``loss``)."""
    for name, w in weights(t.model).items():
        assert torch.isfinite(w).all(), f"non-finite weight {name}"
    for e in t.state.log_history:
        for k, v in e.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), f"step {e.get('step')}: {k} = {v!r}"
    lines = [e for e in t.state.log_history if "loss" in e]
    assert lines
    evals = [e for e in t.state.log_history if "eval_loss" in e]
    assert evals, "no evaluation entry in the log history"
    assert all("eval_vcreg/penalty" in e and "eval_vcreg/skipped_layers" in e for e in evals), evals
    return lines


def test_assert_finite_run_checks_evaluation_and_summary_entries_too():
    good = {"loss": 1.0, "vcreg/penalty": 0.5, "step": 1}
    evaluation = {"eval_loss": 1.0, "eval_vcreg/penalty": 0.1, "eval_vcreg/skipped_layers": 0.0, "step": 1}

    def run(*log):
        return SimpleNamespace(model=nn.Linear(2, 2), state=SimpleNamespace(log_history=list(log)))

    assert assert_finite_run(run(good, evaluation)) == [good]
    with pytest.raises(AssertionError, match=r"step 1: eval_vcreg/penalty = nan"):
        assert_finite_run(run(good, {**evaluation, "eval_vcreg/penalty": math.nan}))
    with pytest.raises(AssertionError, match=r"step 1: train_loss = inf"):
        assert_finite_run(run(good, evaluation, {"train_loss": math.inf, "step": 1}))
    with pytest.raises(AssertionError, match="no evaluation entry"):
        assert_finite_run(run(good))


class DtypeSpy:
    """Records the dtype of every block output the penalty sees, and of its penalty, V and K."""

    def __init__(self, monkeypatch):
        self.dtypes, self.stat_dtypes = [], set()
        original = trainer_module.apply_penalty

        def spy(x, *a, **kw):
            self.dtypes.append(x.dtype)
            out = original(x, *a, **kw)
            self.stat_dtypes.update(t.dtype for t in out[1:4])
            return out

        monkeypatch.setattr(trainer_module, "apply_penalty", spy)


# --------------------------------------------------------------------------------------------- mixed precision
def test_bf16_training_on_cpu_regularises_bf16_block_outputs_with_float32_statistics(tmp_path, monkeypatch):
    spy = DtypeSpy(monkeypatch)
    runs = {}
    for bf16 in (False, True):
        args = config(tmp_path / str(bf16), bf16=bf16, max_steps=3, save_strategy="no", **evaluating(3))
        t = trainer("hf_resnet", args, eval_dataset=dataset(8, seed=1))
        t.train()
        runs[bf16] = assert_finite_run(t)
    assert set(spy.dtypes[: len(spy.dtypes) // 2]) == {torch.float32}
    assert set(spy.dtypes[len(spy.dtypes) // 2 :]) == {torch.bfloat16}
    assert spy.stat_dtypes == {torch.float32}
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


@pytest.mark.parametrize("implementation", ["gradient", "loss"])
def test_fp16_with_a_real_cpu_grad_scaler_skips_the_vcreg_overflow_step_and_backs_off(
    tmp_path, implementation, monkeypatch
):
    """fp16 forward and backward with a real dynamic ``torch.amp.GradScaler("cpu")`` around the VCReg penalty.

    Why not through the Trainer: with ``VCRegConfig(fp16=True, use_cpu=True)``, accelerate 1.15's
    ``Accelerator.__init__`` takes its fp16 branch (``native_amp = True``, a GradScaler from ``get_grad_scaler``)
    only ``if mixed_precision == "fp16" and self.device.type != "cpu"``; on the CPU it leaves ``native_amp=False``
    and ``scaler=None``, so ``Trainer.train`` neither autocasts the forward to float16 nor scales the loss: the
    run is plain float32 (the block outputs the penalty sees are float32). There is no fp16 Trainer path on the
    CPU to test. The first assertions pin that: if they fail, accelerate supports it and a Trainer-level fp16
    test belongs here (like the bf16 one).

    The loop: growth every 2 good steps from 2^16; at the fourth step (index 3) the first block's output is scaled by 1e3 for one
    step, which makes its VCReg gradient (~ C Zc, cubic in the scale) overflow float16 under the 2^17 loss scale.
    The scaler must find the inf, skip that step (weights untouched) and halve the scale; training then goes on.
    Without VCReg the same step at the same scale does not overflow: the overflow is the penalty's gradient, scaled
    by the loss scale like the task gradient.
    """
    spy = DtypeSpy(monkeypatch)
    cpu_fp16 = toy_trainer(tmp_path / "trainer", fp16=True, vcreg_implementation=implementation)
    assert cpu_fp16.accelerator.mixed_precision == "fp16"
    assert cpu_fp16.accelerator.scaler is None and not cpu_fp16.accelerator.native_amp
    cpu_fp16.train()
    assert_finite_run(cpu_fp16)
    assert set(spy.dtypes) == {torch.float32}  # fp16=True on the CPU: float32 block outputs
    spy.dtypes.clear()
    batch = dict(dataset(8, size=4)[:8])
    history, final_scale = {}, {}
    for coef, steps in ((0.5, 6), (0.0, 4)):
        t = toy_trainer(tmp_path, vcreg_implementation=implementation, vcreg_alpha=coef, vcreg_beta=coef)
        optimizer = torch.optim.SGD(t.model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=2)
        history[coef] = []
        for step in range(steps):
            t.model.blocks[0].scale = 1e3 if step == 3 else 1.0
            before, scale = weights(t.model), scaler.get_scale()
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = t.compute_loss(t.model, batch)
            assert torch.isfinite(loss)  # the forward is fine; only the scaled backward overflows
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            taken = any(not torch.equal(before[k], w) for k, w in weights(t.model).items())
            history[coef].append((scale / 2**16, taken))
        t._remove_hooks()
        final_scale[coef] = scaler.get_scale() / 2**16
        assert all(torch.isfinite(w).all() for w in weights(t.model).values())
    # (loss scale / 2^16, step taken): grown after 2 good steps, the overflow step skipped and the scale halved,
    # grown again after 2 more good steps
    assert history[0.5] == [(1, True), (1, True), (2, True), (2, False), (1, True), (1, True)]
    assert final_scale[0.5] == 2
    assert history[0.0] == [(1, True), (1, True), (2, True), (2, True)] and final_scale[0.0] == 4
    assert set(spy.dtypes) == {torch.float16}  # every regularised block output was float16
    assert spy.stat_dtypes == {torch.float32}  # the statistics were not


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


class SpikyBlock(Block):
    """A ``Block`` with one more output feature: a copy of feature 0, or, while ``spiking``, feature 0 times 1e30
    (``"overflow"``: finite in float32, but its variance, ~1e59, is not) or ``+inf`` (``"inf"``)."""

    def __init__(self, d_in: int, d_out: int, spike: str):
        super().__init__(d_in, d_out)
        self.spike, self.spiking = spike, False

    def forward(self, x):
        y = super().forward(x)
        extra = y[:, :1]
        if self.spiking:
            extra = extra * 1e30 if self.spike == "overflow" else torch.full_like(extra, math.inf)
        return torch.cat([y, extra], dim=1)


class SpikyToy(Toy):
    """``Toy`` whose ``blocks.0`` is a ``SpikyBlock`` that spikes on the training forwards numbered in ``spikes``
    (from 1). The extra feature is dropped before ``blocks.1``: the task loss never sees it."""

    def __init__(self, spike: str, spikes: set[int]):
        super().__init__()
        self.blocks[0] = SpikyBlock(48, 16, spike)
        self.spikes, self.forwards = spikes, 0

    def forward(self, pixel_values):
        self.forwards += self.training
        self.blocks[0].spiking = self.training and self.forwards in self.spikes
        x = self.blocks[0](pixel_values.flatten(1))[:, :-1]
        return self.head(self.blocks[1](x))


@pytest.mark.parametrize("implementation", ["gradient", "loss"])
@pytest.mark.parametrize("spike", ["overflow", "inf"])
def test_a_block_with_non_finite_statistics_on_some_steps_is_skipped_logged_and_warned_once(
    tmp_path, caplog, implementation, spike
):
    with caplog.at_level(logging.WARNING, logger="hf_vcreg.trainer"):
        t = toy_trainer(
            tmp_path, model=SpikyToy(spike, spikes={2, 4}), max_steps=5, vcreg_implementation=implementation,
            vcreg_log_per_layer=True, vcreg_layers=r"blocks\.\d",  # blocks of two classes: name them
        )
        t.train()
    lines = assert_finite_run(t)
    assert t.vcreg_layer_names == ["blocks.0", "blocks.1"] and t.model.forwards == 5
    assert [e["vcreg/skipped_layers"] for e in lines] == [0.0, 1.0, 0.0, 1.0, 0.0]
    weight, alpha, beta = t._vcreg_spec.weight, t.args.vcreg_alpha, t.args.vcreg_beta
    for e in lines:
        v1, k1 = e["vcreg/variance/blocks.1"], e["vcreg/covariance/blocks.1"]
        if e["step"] in (2, 4):  # blocks.0 skipped: 0 in its own log, out of the means, out of the penalty
            assert e["vcreg/variance/blocks.0"] == 0.0 and e["vcreg/covariance/blocks.0"] == 0.0
            assert e["vcreg/variance"] == pytest.approx(v1, rel=1e-6)
            assert e["vcreg/covariance"] == pytest.approx(k1, rel=1e-6)
            assert e["vcreg/penalty"] == pytest.approx(weight * (alpha * v1 + beta * k1), rel=1e-5)
        else:
            assert e["vcreg/covariance/blocks.0"] > 0.0
            v0, k0 = e["vcreg/variance/blocks.0"], e["vcreg/covariance/blocks.0"]
            assert e["vcreg/penalty"] == pytest.approx(weight * (alpha * (v0 + v1) + beta * (k0 + k1)), rel=1e-5)
        assert e["loss"] == pytest.approx(e["task_loss"] + e["vcreg/penalty"], rel=1e-5)
    evaluation = [e for e in t.state.log_history if "eval_loss" in e]
    assert [e["eval_vcreg/skipped_layers"] for e in evaluation] == [0.0]  # no spike outside training
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_vcreg.trainer"]
    assert len(warnings) == 1, warnings  # 2 skipped steps: one warning for the layer, not one per step
    assert warnings[0].startswith("VCReg skipped layer 'blocks.0' in 100% of train steps")
    assert "or not finite" in warnings[0]


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
