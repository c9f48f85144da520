"""Property-based tests (hypothesis) of the penalty and the capture on random shapes, dtypes and layouts.

For random 2-D, 3-D and 4-D block outputs with a random feature axis, in float64, float32 and bfloat16, stored
contiguous, permuted (non-contiguous), channels-last or strided, with or without the Huber ``delta`` and a
random row subset:

* the forward of ``VCRegFunction`` is the identity (same values, shape, dtype, strides);
* the penalty, V and K are finite, ``valid`` is ``rows >= 2``, and V, K equal ``vcreg_loss`` of the sample matrix;
* the gradient of both implementations (``"gradient"``: ``VCRegFunction``; ``"loss"``: autograd of the explicit
  penalty) equals autograd of ``vcreg_loss`` computed in float64, within the tolerance of the input dtype:
  float64 ``1e-9``, float32 ``1e-3``, bfloat16 ``2e-2`` (relative to the largest gradient entry; float32 loses
  ~|mean| / std x 2^-24 to the centring, and the inputs go up to |mean| / std = 500; bf16 outputs
  carry an 8-bit mantissa, 2^-8 = 0.4 %, and bf16 inputs are rounded before the statistics);
* bad input (not 2-D, fewer than 2 rows, no features, a feature axis out of range, an integer tensor) raises an
  ``AssertionError`` whose message names the offending shape / axis / dtype.

The capture: a block returning its tensor bare, in a tuple, a list, a dict or a ``ModelOutput`` hands the
transform exactly that tensor (with the right feature axis, channels-first convolutions and channels-last
linear stacks alike) and puts the replacement back in the same structure.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from _reference import reference_gradient, sample_matrix
from hf_vcreg import BlockCapture, VCRegFunction, VCRegSpec, covariance_loss, variance_loss, vcreg_loss
from hf_vcreg.capture import feature_axis
from hf_vcreg.penalty import apply_penalty

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 2e-2}


@st.composite
def block_outputs(draw):
    """``(x, axis, rows, spec)``: a random block output, its feature axis, a row subset (or None), a spec."""
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 4))] + [draw(st.integers(1, 5)) for _ in range(ndim - 1)]
    axis = draw(st.integers(1, ndim - 1))
    shape[axis] = draw(st.integers(1, 7))  # d
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    layouts = ["contiguous", "permuted", "strided"] + (["channels_last"] if ndim == 4 else [])
    layout = draw(st.sampled_from(layouts))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if layout == "permuted":
        perm = draw(st.permutations(range(ndim)))
        base = torch.randn([shape[p] for p in perm], generator=gen, dtype=torch.float64)
        x = base.permute([perm.index(i) for i in range(ndim)])
    elif layout == "strided":
        x = torch.randn([*shape[:-1], 2 * shape[-1]], generator=gen, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * scale + draw(st.sampled_from([0.0, 5.0]))
    if draw(st.booleans()):  # a constant feature (zero variance)
        x.select(axis, 0).fill_(2.0)
    x = x.to(dtype)  # .to keeps the strides of a non-contiguous tensor
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert tuple(x.shape) == tuple(shape)
    n = x.numel() // shape[axis]
    rows = None
    if n >= 3 and draw(st.booleans()):
        k = draw(st.integers(2, n - 1))
        rows = torch.randperm(n, generator=gen)[:k].sort().values
    spec = VCRegSpec(
        alpha=draw(st.sampled_from([0.0, 0.5, 2.0])),
        beta=draw(st.sampled_from([0.0, 0.3, 1.5])),
        gamma=draw(st.sampled_from([0.5, 1.0, 4.0])),
        eps=draw(st.sampled_from([1e-4, 1e-2])),
        delta=draw(st.sampled_from([None, 0.05, 1.0])),
        weight=draw(st.sampled_from([1.0, 0.25])),
    )
    return x, axis, rows, spec


GRADIENT_CASES = dict(
    case=block_outputs(),
    implementation=st.sampled_from(["gradient", "loss"]),
    c=st.sampled_from([1.0, 3.0]),
    w_scale=st.sampled_from([0.0, 1.0]),  # 0: the penalty's gradient alone
)


@SETTINGS
@given(**GRADIENT_CASES)
def test_penalty_gradient_matches_float64_autograd_on_random_shapes_dtypes_layouts(case, implementation, c, w_scale):
    check_penalty_gradient(case, implementation, c, w_scale)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(**GRADIENT_CASES)
def test_penalty_gradient_matches_float64_autograd_many_random_examples(case, implementation, c, w_scale):
    check_penalty_gradient(case, implementation, c, w_scale)


def check_penalty_gradient(case, implementation, c, w_scale):
    x, axis, rows, spec = case
    gen = torch.Generator().manual_seed(x.numel())
    w = (w_scale * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype)
    xg = x.detach().requires_grad_()
    out, penalty, v, k, valid = apply_penalty(xg, axis, rows, spec, None, implementation)
    n_rows = sample_matrix(x, axis, rows).shape[0]
    # identity forward
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out.detach(), x)
    # the same memory layout (the stride of a size-1 axis means nothing and may differ)
    assert [s for s, n in zip(out.stride(), x.shape) if n > 1] == [s for s, n in zip(x.stride(), x.shape) if n > 1]
    assert bool(valid) == (n_rows >= 2)
    assert all(torch.isfinite(t).all() for t in (penalty, v, k))
    ((out * w).sum() + c * penalty).backward()
    ref_grad, ref_total, ref_v, ref_k = reference_gradient(x, axis, rows, spec, w, c)
    tol = TOLERANCE[x.dtype]
    assert torch.isfinite(xg.grad).all() and xg.grad.dtype == x.dtype and xg.grad.shape == x.shape
    scale = ref_grad.abs().max().item() + 1e-30
    err = (xg.grad.double() - ref_grad).abs().max().item()
    assert err <= tol * scale, f"max |grad - reference| = {err:.3g}, allowed {tol * scale:.3g}"
    if ref_total is None:
        assert penalty.item() == 0.0
        return
    stat_tol = tol * (1 + abs(ref_total.item()))
    assert penalty.item() == pytest.approx(spec.weight * ref_total.item(), abs=stat_tol * spec.weight, rel=tol)
    assert v.item() == pytest.approx(ref_v.item(), abs=stat_tol, rel=tol)
    assert k.item() == pytest.approx(ref_k.item(), abs=stat_tol, rel=tol)


@SETTINGS
@given(case=block_outputs())
def test_gradient_and_loss_implementations_agree_on_random_inputs(case):
    x, axis, rows, spec = case
    grads, values = [], []
    for implementation in ("gradient", "loss"):
        xg = x.detach().requires_grad_()
        out, penalty, v, k, valid = apply_penalty(xg, axis, rows, spec, None, implementation)
        (out.sum() + penalty).backward()
        grads.append(xg.grad.double())
        # V and K of an invalid layer (fewer than 2 rows) are unspecified; its penalty is 0 in both
        values.append(torch.stack([penalty.detach(), v, k]).double() if valid else penalty.detach().double())
    tol = TOLERANCE[x.dtype]
    scale = grads[1].abs().max().item() + 1e-30
    assert (grads[0] - grads[1]).abs().max().item() <= tol * scale
    torch.testing.assert_close(values[0], values[1], rtol=tol, atol=tol)


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_sample_matrix_functions_accept_only_2d_with_two_rows_and_a_feature(shape, dtype):
    z = torch.randn(shape).to(dtype)
    ok = len(shape) == 2 and shape[0] >= 2 and shape[1] >= 1
    for fn in (variance_loss, covariance_loss, lambda t: vcreg_loss(t)[0]):
        if ok:
            assert torch.isfinite(fn(z)) and fn(z).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            with pytest.raises(AssertionError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
                fn(z)


@SETTINGS
@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=3), axis=st.integers(-5, 5))
def test_block_output_with_a_bad_axis_or_dtype_is_refused_with_its_shape(shape, axis):
    x = torch.randn(shape)
    spec = VCRegSpec(alpha=1.0, beta=1.0)
    for implementation in ("gradient", "loss"):
        if -len(shape) <= axis < len(shape):
            apply_penalty(x.requires_grad_(), axis, None, spec, None, implementation)
            with pytest.raises(AssertionError, match=r"expected a floating-point tensor, got dtype torch.int64"):
                apply_penalty(x.long(), axis, None, spec, None, implementation)
        else:
            with pytest.raises(AssertionError, match=rf"feature axis {axis} is out of range for shape"):
                apply_penalty(x, axis, None, spec, None, implementation)


# ------------------------------------------------------------------------------------------------- the capture
class Conv(nn.Module):
    """Channels-first conv block."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.norm(self.conv(x))


class ChannelsLastMLP(nn.Module):
    """A (B, H, W, C) block: linear layers on the last axis (timm Swin's NHWC stages)."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return self.fc(self.norm(x))


class Wrap(nn.Module):
    """Puts its block's output into ``container``."""

    def __init__(self, block, container):
        super().__init__()
        self.block, self.container = block, container

    def forward(self, x):
        y = self.block(x)
        return {
            "tensor": lambda: y,
            "tuple": lambda: (y, torch.ones(2)),
            "list": lambda: [y, "extra"],
            "dict": lambda: {"hidden": y, "other": 3},
            "model_output": lambda: BaseModelOutput(last_hidden_state=y),
        }[self.container]()


@SETTINGS
@given(
    kind=st.sampled_from(["conv", "channels_last_mlp"]),
    container=st.sampled_from(["tensor", "tuple", "list", "dict", "model_output"]),
    b=st.integers(1, 3),
    c=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    memory=st.sampled_from(["contiguous", "channels_last"]),
)
def test_capture_hands_the_transform_the_block_tensor_with_its_feature_axis_and_puts_it_back(
    kind, container, b, c, h, w, memory
):
    if kind == "conv":
        block, x = Conv(c), torch.randn(b, c, h, w)
        if memory == "channels_last":
            block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        expected_axis = 1
    else:
        assume(h != c)  # NOTE: (B, H, W, C) with H == C is ambiguous by widths alone; then axis 1 is assumed
        block, x = ChannelsLastMLP(c), torch.randn(b, h, w, c)
        expected_axis = 3
    model = nn.Sequential(Wrap(block, container)).eval()  # eval: BatchNorm takes a single value per channel
    seen = []

    def transform(layer, tensor):
        seen.append((layer.name, layer.axis, tensor))
        return tensor * 2

    capture = BlockCapture(model, ["0"], transform)
    capture.install()
    plain = model(x)  # installed but inactive: untouched
    with capture.active():
        captured = model(x)
    capture.remove()
    assert len(seen) == 1
    name, axis, tensor = seen[0]
    inner = {"tensor": lambda o: o, "tuple": lambda o: o[0], "list": lambda o: o[0], "dict": lambda o: o["hidden"],
             "model_output": lambda o: o.last_hidden_state}[container]
    assert name == "0" and axis == expected_axis == feature_axis(block, tensor)
    torch.testing.assert_close(tensor, inner(plain))
    torch.testing.assert_close(inner(captured), 2 * inner(plain))
    assert type(captured) is type(plain)
    if container == "tuple":
        assert torch.equal(captured[1], plain[1])
    elif container == "list":
        assert captured[1] == "extra"
    elif container == "dict":
        assert captured["other"] == 3
    assert not capture.installed and torch.equal(inner(model(x)), inner(plain))


@SETTINGS
@given(case=block_outputs())
def test_vcreg_function_through_a_captured_block_adds_exactly_its_penalty_gradient(case):
    """End to end: hook a block emitting ``x``; the gradient w.r.t. the block input is the reference one."""
    x, axis, rows, spec = case
    assume(rows is None)

    class Emit(nn.Module):
        def forward(self, t):
            return t * 1.0

    model = nn.Sequential(Emit())
    penalties = []

    def transform(layer, tensor):
        out, penalty, *_ = VCRegFunction.apply(tensor, axis, None, spec, None)
        penalties.append(penalty)
        return out

    capture = BlockCapture(model, ["0"], transform)
    capture.install()
    xg = x.detach().requires_grad_()
    with capture.active():
        y = model(xg)
    (y.sum() + penalties[0]).backward()
    capture.remove()
    ref_grad, *_ = reference_gradient(x, axis, None, spec, torch.ones_like(x), 1.0)
    tol = TOLERANCE[x.dtype]
    assert (xg.grad.double() - ref_grad).abs().max().item() <= tol * (ref_grad.abs().max().item() + 1e-30)
