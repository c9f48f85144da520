"""The penalty functions: exact formulas, the analytic gradient against autograd, dtype handling."""

import math

import pytest
import torch

from _reference import reference_gradient
from hf_vcreg import covariance_loss, covariance_matrix, variance_loss, vcreg_loss
from hf_vcreg.penalty import VCRegFunction, VCRegSpec, explicit_penalty

SHAPES = [((37, 5), 1), ((4, 9, 6), 2), ((3, 6, 4, 5), 1), ((2, 4, 3, 7), 3), ((2, 3, 2, 3, 4), 1)]


def test_variance_and_covariance_match_hand_computed_values():
    z = torch.tensor([[1.0, 2.0], [3.0, 1.0], [5.0, 6.0]])
    # column means 3, 3; centred [[-2,-1],[0,-2],[2,3]]; C = [[8, 8], [8, 14]] / 2 = [[4, 4], [4, 7]]
    torch.testing.assert_close(covariance_matrix(z), torch.tensor([[4.0, 4.0], [4.0, 7.0]]))
    gamma, eps = 3.0, 1e-4
    expected_v = (max(0, gamma - math.sqrt(4 + eps)) + max(0, gamma - math.sqrt(7 + eps))) / 2
    assert variance_loss(z, gamma=gamma, eps=eps).item() == pytest.approx(expected_v, rel=1e-6)
    # K = (4^2 + 4^2) / (d (d - 1)) = 32 / 2
    assert covariance_loss(z).item() == pytest.approx(16.0, rel=1e-6)
    # Huber with delta = 1: h(4) = 2*1*4 - 1 = 7, twice, / 2
    assert covariance_loss(z, delta=1.0).item() == pytest.approx(7.0, rel=1e-6)
    total, v, k = vcreg_loss(z, alpha=0.5, beta=0.25, gamma=gamma, eps=eps)
    assert total.item() == pytest.approx(0.5 * expected_v + 0.25 * 16.0, rel=1e-6)


def test_single_feature_has_zero_covariance_term():
    assert covariance_loss(torch.randn(10, 1)).item() == 0.0


def test_statistics_are_float32_for_half_inputs():
    z = torch.randn(64, 8).to(torch.bfloat16)
    assert covariance_matrix(z).dtype == torch.float32
    assert variance_loss(z).dtype == torch.float32
    torch.testing.assert_close(covariance_matrix(z), covariance_matrix(z.float()))


def test_sample_matrix_must_be_2d_with_two_rows():
    with pytest.raises(ValueError, match=r"\(n, d\) sample matrix, got shape \(2, 3, 4\)"):
        variance_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        covariance_loss(torch.randn(1, 4))


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("delta", [None, 0.05])
@pytest.mark.parametrize("subset", [False, True])
def test_gradient_function_equals_autograd_of_explicit_loss_float64(shape, axis, delta, subset):
    torch.manual_seed(hash((shape, axis, delta, subset)) % 1000)
    x = (torch.randn(*shape, dtype=torch.float64) * 0.7 + 0.3).requires_grad_()
    n = x.numel() // shape[axis]
    rows = torch.randperm(n)[: max(2, n // 2)].sort().values if subset else None
    spec = VCRegSpec(alpha=0.7, beta=1.3, gamma=1.0, eps=1e-4, delta=delta, weight=0.5)
    w = torch.randn_like(x)
    y, p, v, k, valid = VCRegFunction.apply(x, axis, rows, spec, None)
    ((y * w).sum() + 3.0 * p).backward()
    expected = reference_gradient(x, axis, rows, spec, w)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
    assert bool(valid)
    # the forward is the identity and the logged values are the explicit ones
    assert torch.equal(y, x)
    z = x.detach().movedim(axis, -1).reshape(-1, shape[axis])
    z = z[rows] if rows is not None else z
    pen, v_ref, k_ref = vcreg_loss(z, 0.7, 1.3, 1.0, 1e-4, delta)
    assert p.item() == pytest.approx(0.5 * pen.item(), rel=1e-12)
    assert (v.item(), k.item()) == pytest.approx((v_ref.item(), k_ref.item()), rel=1e-12)


@pytest.mark.parametrize("delta", [None, 0.1])
def test_gradient_function_passes_finite_difference_gradcheck(delta):
    torch.manual_seed(0)
    x = (torch.randn(11, 4, dtype=torch.float64) * 0.5).requires_grad_()
    spec = VCRegSpec(alpha=0.9, beta=2.0, delta=delta)
    assert torch.autograd.gradcheck(lambda t: VCRegFunction.apply(t, 1, None, spec, None)[1], (x,))


def test_covariance_gradient_is_not_scaled_by_n_minus_one():
    """The public reference backward multiplies the covariance gradient by (n - 1); ours is the true one."""
    torch.manual_seed(1)
    n = 20
    x = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    spec = VCRegSpec(alpha=0.0, beta=1.0)
    _, p, *_ = VCRegFunction.apply(x, 1, None, spec, None)
    p.backward()
    ours = x.grad.clone()
    x.grad = None
    covariance_loss(x).backward()
    ratio = ours.norm() / x.grad.norm()
    assert ratio.item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("shape,axis", SHAPES[:3])
def test_explicit_and_gradient_implementations_agree(shape, axis):
    torch.manual_seed(2)
    spec = VCRegSpec(alpha=0.3, beta=0.8, delta=0.2, weight=0.25)
    x1 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, p1, *_ = VCRegFunction.apply(x1, axis, None, spec, None)
    y2, p2, *_ = explicit_penalty(x2, axis, None, spec, None)
    (y1.sum() + p1).backward()
    (y2.sum() + p2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    assert p1.item() == pytest.approx(p2.item(), rel=1e-12)


def test_fewer_than_two_rows_skip_the_layer():
    x = torch.randn(1, 8, requires_grad=True)
    spec = VCRegSpec(alpha=1.0, beta=1.0)
    y, p, v, k, valid = VCRegFunction.apply(x, 1, None, spec, None)
    (y.sum() + p).backward()
    assert not bool(valid) and p.item() == 0.0
    assert not v.requires_grad and not k.requires_grad and p.requires_grad  # as on the regular path
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # only the identity path


def test_non_finite_representation_skips_the_layer_without_nan_gradient():
    x = torch.randn(16, 4)
    x[3, 1] = float("inf")
    x.requires_grad_()
    y, p, v, k, valid = VCRegFunction.apply(x, 1, None, VCRegSpec(alpha=1.0, beta=1.0), None)
    (y.sum() + p).backward()
    assert not bool(valid) and p.item() == 0.0
    assert torch.isfinite(x.grad).all()


def test_bf16_autocast_keeps_float32_statistics_and_bf16_gradient_rounding():
    torch.manual_seed(3)
    x32 = torch.randn(256, 64)
    spec = VCRegSpec(alpha=1.0, beta=10.0)
    x16 = x32.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, p, v, k, valid = VCRegFunction.apply(x16, 1, None, spec, None)
    assert p.dtype == torch.float32 and y.dtype == torch.bfloat16
    p.backward()
    ref = x16.detach().float().requires_grad_()
    pen, _, _ = vcreg_loss(ref, 1.0, 10.0)
    pen.backward()
    rel = (x16.grad.float() - ref.grad).norm() / ref.grad.norm()
    assert rel.item() < 1e-2  # bf16 has an 8-bit mantissa: relative rounding 2^-8 = 0.004 per element
