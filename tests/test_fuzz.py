"""Property-based tests (hypothesis) of the penalty and the capture on random shapes, dtypes and layouts.

For random 2-D, 3-D and 4-D block outputs with a random feature axis, in float64, float32, bfloat16 and float16, stored
contiguous, permuted (non-contiguous), channels-last or strided, with or without the Huber ``delta`` and a
random row subset:

* the forward of ``VCRegFunction`` is the identity (same values, shape, dtype, strides);
* the penalty, V and K are finite, ``valid`` is ``rows >= 2``, and V, K equal ``vcreg_loss`` of the sample matrix;
* the gradient of both implementations (``"gradient"``: ``VCRegFunction``; ``"loss"``: autograd of the explicit
  penalty) equals autograd of ``vcreg_loss`` computed in float64, within the tolerance of the input dtype:
  float64 ``1e-9``, float32 ``1e-3``, bfloat16 ``2e-2``, float16 ``5e-3`` (relative to the largest gradient
  entry; float32 loses ~|mean| / std x 2^-24 to the centring, and the inputs go up to |mean| / std = 500; bf16
  outputs carry an 8-bit mantissa, 2^-8 = 0.4 %, fp16 ones an 11-bit mantissa, 2^-11 = 0.05 %, and half inputs
  are rounded before the statistics; float16 also allows 2 x 2^-24 absolute for its subnormals, see
  ``grad_tolerance``). float16 inputs stay at scale <= 1: at scale 30 the covariance gradient
  (~ d * 30^3) passes fp16's largest value, 65504, and is inf, which is an overflow for a GradScaler to skip
  (tests/test_numerics.py), not a rounding error;
* bad input raises an exception (not an ``assert``, which ``python -O`` removes) whose message names the
  offending shape / axis / dtype: ``ValueError`` for a matrix that is not 2-D, has fewer than 2 rows or no
  features, and for a feature axis out of range; ``TypeError`` for an integer tensor.

The capture: a block returning its tensor bare, in a tuple, a list, a dict or a ``ModelOutput`` hands the
transform exactly that tensor (with the right feature axis, channels-first convolutions and channels-last
linear stacks alike, in every float dtype, for one to three regularised blocks in a row) and puts the
replacement back in the same structure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from _reference import reference_gradient, sample_matrix
from hf_vcreg import covariance_loss, variance_loss, vcreg_loss
from hf_vcreg.capture import BlockCapture, feature_axis
from hf_vcreg.penalty import VCRegFunction, VCRegSpec, apply_penalty

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = list(TOLERANCE)


def grad_tolerance(dtype: torch.dtype, largest: float) -> float:
    """The allowed max |gradient error|: ``TOLERANCE`` relative to the ``largest`` reference entry, and for float16
    two spacings of its subnormals, 2 x 2^-24 (gradients under 2^-14 lose relative precision there; a real fp16
    run multiplies them by the GradScaler's scale first)."""
    return TOLERANCE[dtype] * (largest + 1e-30) + (2.0**-23 if dtype == torch.float16 else 0.0)


@st.composite
def block_outputs(draw):
    """``(x, axis, rows, spec)``: a random block output, its feature axis, a row subset (or None), a spec."""
    ndim = draw(st.integers(2, 4))
    shape = [draw(st.integers(1, 4))] + [draw(st.integers(1, 5)) for _ in range(ndim - 1)]
    axis = draw(st.integers(1, ndim - 1))
    shape[axis] = draw(st.integers(1, 7))  # d
    dtype = draw(st.sampled_from(DTYPES))
    layouts = ["contiguous", "permuted", "strided"] + (["channels_last"] if ndim == 4 else [])
    layout = draw(st.sampled_from(layouts))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-2, 1.0] + ([] if dtype == torch.float16 else [30.0])))  # see the module doc
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
    err = (xg.grad.double() - ref_grad).abs().max().item()
    allowed = grad_tolerance(x.dtype, ref_grad.abs().max().item())
    assert err <= allowed, f"max |grad - reference| = {err:.3g}, allowed {allowed:.3g}"
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
    assert (grads[0] - grads[1]).abs().max().item() <= grad_tolerance(x.dtype, grads[1].abs().max().item())
    torch.testing.assert_close(values[0], values[1], rtol=tol, atol=tol)


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    dtype=st.sampled_from(DTYPES),
)
def test_sample_matrix_functions_accept_only_2d_with_two_rows_and_a_feature(shape, dtype):
    z = torch.randn(shape).to(dtype)
    ok = len(shape) == 2 and shape[0] >= 2 and shape[1] >= 1
    for fn in (variance_loss, covariance_loss, lambda t: vcreg_loss(t)[0]):
        if ok:
            assert torch.isfinite(fn(z)) and fn(z).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            with pytest.raises(ValueError, match=re.escape(str(tuple(shape)))):
                fn(z)


@SETTINGS
@given(shape=st.lists(st.integers(0, 3), min_size=0, max_size=3), axis=st.integers(-5, 5))
def test_block_output_with_a_bad_axis_or_dtype_is_refused_with_its_shape(shape, axis):
    x = torch.randn(shape)
    spec = VCRegSpec(alpha=1.0, beta=1.0)
    shape_re = re.escape(str(tuple(shape)))
    if not -len(shape) <= axis < len(shape):
        bad, error, message = x, ValueError, rf"feature axis {axis} is out of range for shape {shape_re}: "
    elif shape[axis] == 0:
        bad, error, message = x, ValueError, rf"feature axis {axis} of shape {shape_re} is empty: no features"
    else:
        bad, error = x.long(), TypeError
        message = rf"expected a floating-point tensor, got dtype torch.int64 \(shape {shape_re}\): .*\.float\(\)"
    for implementation in ("gradient", "loss"):
        if bad is not x:  # the float tensor itself is accepted (no rows to speak of is not an error: valid False)
            valid = apply_penalty(x.detach().requires_grad_(), axis, None, spec, None, implementation)[4]
            assert bool(valid) == (x.numel() // shape[axis] >= 2)
        with pytest.raises(error, match=message):
            apply_penalty(bad, axis, None, spec, None, implementation)


# Run with ``python -O``. Only hf_vcreg.penalty (and what it imports) is loaded, not the package's __init__: under -O
# the cached .pyc files of a read-only environment do not apply, and compiling transformers again takes ~20 s.
OPTIMISED_CHECKS = """
import json, os, sys, types
import torch
package = types.ModuleType("hf_vcreg")
package.__path__ = [os.path.join(sys.argv[1], "hf_vcreg")]
sys.modules["hf_vcreg"] = package
from hf_vcreg.penalty import VCRegSpec, apply_penalty, variance_loss
assert not __debug__  # -O is on: every assert statement is gone
spec = VCRegSpec(alpha=1.0, beta=1.0)
caught = []
for call in (
    lambda: apply_penalty(torch.ones(4, 3, dtype=torch.int64), 1, None, spec, None, "gradient"),
    lambda: apply_penalty(torch.ones(4, 3), 2, None, spec, None, "loss"),
    lambda: variance_loss(torch.randn(1, 4)),
):
    try:
        call()
        caught.append(None)
    except Exception as err:
        caught.append([type(err).__name__, str(err)])
print(json.dumps(caught))
"""


def test_input_checks_still_raise_under_python_dash_O():
    """The checks are exceptions, not ``assert`` statements (which ``python -O`` strips)."""
    root = str(Path(__file__).resolve().parent.parent)
    run = subprocess.run(
        [sys.executable, "-O", "-c", OPTIMISED_CHECKS, root],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [
        [
            "TypeError",
            "expected a floating-point tensor, got dtype torch.int64 (shape (4, 3)): regularise a float block output, "
            "or convert it with .float()",
        ],
        ["ValueError", "feature axis 2 is out of range for shape (4, 3): use an axis in [-2, 1]"],
        [
            "ValueError",
            "need at least 2 samples (rows) for a covariance, got shape (1, 4): pass more rows (a larger batch)",
        ],
    ]


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


INNER = {  # the block tensor inside each container
    "tensor": lambda o: o,
    "tuple": lambda o: o[0],
    "list": lambda o: o[0],
    "dict": lambda o: o["hidden"],
    "model_output": lambda o: o.last_hidden_state,
}


class Unwrap(nn.Module):
    """Takes the block tensor back out of ``Wrap``'s container, for the next block."""

    def __init__(self, container):
        super().__init__()
        self.container = container

    def forward(self, o):
        return INNER[self.container](o)


@SETTINGS
@given(
    kind=st.sampled_from(["conv", "channels_last_mlp"]),
    container=st.sampled_from(["tensor", "tuple", "list", "dict", "model_output"]),
    b=st.integers(1, 3),
    c=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    memory=st.sampled_from(["contiguous", "channels_last"]),
    dtype=st.sampled_from(DTYPES),
    depth=st.integers(1, 3),
)
def test_capture_hands_the_transform_the_block_tensor_with_its_feature_axis_and_puts_it_back(
    kind, container, b, c, h, w, memory, dtype, depth
):
    """``depth`` regularised blocks in a row (``Wrap, Unwrap, Wrap, ...``): each one's tensor, after the
    transforms of the blocks before it, reaches the transform once, with its feature axis and dtype."""
    if kind == "conv":
        blocks, x = [Conv(c) for _ in range(depth)], torch.randn(b, c, h, w)
        if memory == "channels_last":
            blocks = [block.to(memory_format=torch.channels_last) for block in blocks]
            x = x.contiguous(memory_format=torch.channels_last)
        expected_axis = 1
    else:
        assume(h != c)  # NOTE: (B, H, W, C) with H == C is ambiguous by widths alone; then axis 1 is assumed
        blocks, x = [ChannelsLastMLP(c) for _ in range(depth)], torch.randn(b, h, w, c)
        expected_axis = 3
    blocks, x = [block.to(dtype) for block in blocks], x.to(dtype)
    stages = [m for block in blocks for m in (Wrap(block, container), Unwrap(container))][:-1]
    model = nn.Sequential(*stages).eval()  # eval: BatchNorm takes a single value per channel
    names = [str(2 * i) for i in range(depth)]  # the Wrap stages
    seen = []

    def transform(layer, tensor):
        seen.append((layer.name, layer.index, layer.axis, tensor))
        return tensor * 2

    capture = BlockCapture(model, names, transform)
    capture.install()
    plain = model(x)  # installed but inactive: untouched
    with capture.active():
        captured = model(x)
    capture.remove()
    expected, t, untouched = [], x, x
    for block in blocks:  # what each transform must receive: the block applied to the previous transform's output
        expected.append(block(t))
        t, untouched = 2 * expected[-1], block(untouched)
    assert [(name, index) for name, index, *_ in seen] == list(zip(names, range(depth)))
    for block, (_, _, axis, tensor), want in zip(blocks, seen, expected):
        assert axis == expected_axis == feature_axis(block, tensor)
        assert tensor.dtype == dtype and tensor.shape == x.shape and torch.equal(tensor, want)
    inner = INNER[container]
    assert torch.equal(inner(captured), t) and inner(captured).dtype == dtype
    assert type(captured) is type(plain)
    if container == "tuple":
        assert torch.equal(captured[1], plain[1])
    elif container == "list":
        assert captured[1] == "extra"
    elif container == "dict":
        assert captured["other"] == 3
    assert torch.equal(inner(plain), untouched)
    assert not capture.installed and torch.equal(inner(model(x)), inner(plain))


@SETTINGS
@given(case=block_outputs(), depth=st.integers(1, 3))
def test_vcreg_function_through_a_captured_block_adds_exactly_its_penalty_gradient(case, depth):
    """End to end: hook ``depth`` blocks that each pass ``x`` on; the gradient w.r.t. the input is the reference
    one with ``depth`` times the penalty (each block's penalty is that of ``x``)."""
    x, axis, rows, spec = case
    assume(rows is None)

    class Emit(nn.Module):
        def forward(self, t):
            return t * 1.0

    model = nn.Sequential(*(Emit() for _ in range(depth)))
    penalties = []

    def transform(layer, tensor):
        out, penalty, *_ = VCRegFunction.apply(tensor, axis, None, spec, None)
        penalties.append(penalty)
        return out

    capture = BlockCapture(model, [str(i) for i in range(depth)], transform)
    capture.install()
    xg = x.detach().requires_grad_()
    with capture.active():
        y = model(xg)
    assert len(penalties) == depth and y.dtype == x.dtype
    (y.sum() + sum(penalties)).backward()
    capture.remove()
    ref_grad, *_ = reference_gradient(x, axis, None, spec, torch.ones_like(x), float(depth))
    assert xg.grad.dtype == x.dtype
    assert (xg.grad.double() - ref_grad).abs().max().item() <= grad_tolerance(x.dtype, ref_grad.abs().max().item())
