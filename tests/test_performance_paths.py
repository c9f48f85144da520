"""The fast paths of ``VCRegFunction`` give the gradient of the written loss.

Paths pinned here (see benchmarks/PERFORMANCE.md for why they exist):

* the symmetric blocked Gram ``Zc^T Zc`` (CPU, ``n >= 4 d``, ``d >= 128``: each off-diagonal block once);
* the feature-last backward without a centred copy (``Zc G = Z G - 1 mu^T G``, one ``addmm``);
* the channels-first backward on maps of ``H W >= 16`` (``G X_b - (G mu) 1^T``, one ``baddbmm``);
* the generic backward (channels-first maps, row subsets, non-contiguous tensors);
* the ``n < d`` path (fewer rows than features: K from ``||Zc Zc^T||_F``, the backward from the ``n x n`` Gram);
* the half-precision matmul path used under CUDA autocast (tensor cores, float32 accumulation), run here on the
  CPU through the same code with the half-precision products emulated exactly in float32.

No timing assertions: speed is measured by benchmarks/overhead.py and benchmarks/scaling.py.
"""

import pytest
import torch

from _reference import reference_gradient
import hf_vcreg.penalty as penalty
from hf_vcreg.penalty import VCRegFunction, VCRegSpec


def _reference(x, axis, rows, spec, w):
    """Gradient of ``sum(x * w) + 3 * weight * penalty`` (float64 autograd) and the weighted penalty."""
    grad, total, _, _ = reference_gradient(x, axis, rows, spec, w)
    return grad, spec.weight * total


def _ours(x, axis, rows, spec, w, autocast=False):
    x = x.detach().clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        y, p, v, k, valid = VCRegFunction.apply(x, axis, rows, spec, None)
    ((y * w.to(y.dtype)).sum() + 3.0 * p).backward()
    assert bool(valid)
    return x.grad, p.detach()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("d,k", [(128, 2), (192, 3), (320, 4), (100, 1)])
def test_blocked_gram_equals_full_product_float64(d, k):
    torch.manual_seed(d)
    n = 4 * d + 3
    zc = torch.randn(n, d, dtype=torch.float64)
    assert penalty.gram_blocks(n, d, zc.device) == k  # the block count the rule picks for this width
    torch.testing.assert_close(penalty._gram(zc, torch.float64), zc.T @ zc, rtol=1e-12, atol=1e-12)


def test_blocked_gram_is_exactly_symmetric():
    zc = torch.randn(900, 192)
    c = penalty._gram(zc, torch.float32)
    assert torch.equal(c, c.T)


SPEC = VCRegSpec(alpha=0.7, beta=1.3, gamma=1.0, eps=1e-4, weight=0.5)

# (shape, axis): feature-last tokens wide enough for the blocked Gram; a channels-first map; a video map
# (channels last); channels-first video, sequence (B, C, L) and a map too small for the batched backward (H W < 16)
WIDE = [((6, 100, 128), 2), ((5, 128, 6, 5), 1), ((2, 3, 4, 5, 128), 4), ((2, 48, 2, 4, 4), 1), ((4, 40, 20), 1),
        ((30, 40, 3, 3), 1)]


@pytest.mark.parametrize("shape,axis", WIDE)
@pytest.mark.parametrize("delta", [None, 0.02])
@pytest.mark.parametrize("subset", [False, True])
def test_fast_paths_equal_autograd_float64(shape, axis, delta, subset):
    torch.manual_seed(7)
    # a mean far from 0 exercises the backward's mean row (Z G - 1 mu^T G) and the forward's centring
    x = torch.randn(*shape, dtype=torch.float64) * 0.6 + 4.0
    n = x.numel() // shape[axis]
    rows = torch.randperm(n)[: n // 2].sort().values if subset else None
    spec = VCRegSpec(alpha=0.7, beta=1.3, delta=delta, weight=0.5)
    w = torch.randn_like(x)
    grad, p = _ours(x, axis, rows, spec, w)
    expected, p_ref = _reference(x, axis, rows, spec, w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-12)


@pytest.mark.parametrize("shape,batched", [((4, 40, 4, 5), True), ((4, 40, 3, 5), False), ((4, 40, 20), True)])
def test_channels_first_backward_uses_one_batched_matmul_on_maps_of_16_or_more(monkeypatch, shape, batched):
    """Channels-first maps with ``H W >= 16`` get ``G X_b - (G mu) 1^T`` from one ``baddbmm`` (no centred copy);
    smaller maps (``H W = 15`` here) take the generic path. Both equal float64 autograd."""
    calls = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    torch.manual_seed(11)
    x = torch.randn(*shape, dtype=torch.float64) * 0.5 + 1.5
    w = torch.randn_like(x)
    grad, _ = _ours(x, 1, None, SPEC, w)
    expected, _ = _reference(x, 1, None, SPEC, w)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    spatial = x[0, 0].numel()
    assert calls == ([torch.Size((shape[0], shape[1], spatial))] if batched else [])


def test_channels_first_backward_centres_maps_with_a_large_mean():
    """Beyond |mu| = 100 sigma the channels-first backward takes the centred path too (float32, 300 sigma)."""
    torch.manual_seed(12)
    x = torch.randn(16, 64, 8, 8) + 300.0
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros_like(x)
    grad, _ = _ours(x, 1, None, spec, w)
    expected, _ = _reference(x, 1, None, spec, w)
    assert _rel(grad, expected) < 5e-5


def test_non_contiguous_input_and_gradient_take_the_generic_path_float64():
    torch.manual_seed(8)
    base = torch.randn(130, 6, 128, dtype=torch.float64) + 1.0
    x = base.transpose(0, 1)  # (6, 130, 128), feature last but not contiguous
    assert not x.is_contiguous()
    w = torch.randn(130, 6, 128, dtype=torch.float64).transpose(0, 1)  # a non-contiguous incoming gradient
    xr = x.detach().clone().requires_grad_()
    y, p, *_ = VCRegFunction.apply(xr, 2, None, SPEC, None)
    ((y * w).sum() + 3.0 * p).backward()
    expected, _ = _reference(x, 2, None, SPEC, w)
    torch.testing.assert_close(xr.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_scale", [1.0, 3.0, 1024.0])
def test_constant_feature_gets_exactly_zero_penalty_gradient(dtype, loss_scale):
    """A constant feature's true gradient is exactly 0 (Zc = 0). The feature-last fast path (Z G - 1 mu^T G) would
    leave rounding noise there, so a zero spread sends it to the centred path (found by the slow fuzz test: a
    (4, 1) column of 2.0, loss scale 3)."""
    x = torch.cat([torch.full((64, 1), 2.0, dtype=dtype), torch.randn(64, 3, dtype=dtype)], dim=1)
    x.requires_grad_()
    spec = VCRegSpec(alpha=0.5, beta=0.3, gamma=0.5, eps=0.01)
    y, p, v, k, valid = VCRegFunction.apply(x, 1, None, spec, None)
    ((y * 0).sum() + loss_scale * p).backward()
    assert bool(valid) and torch.count_nonzero(x.grad[:, 0]) == 0 and torch.count_nonzero(x.grad[:, 1:]) > 0
    # the same on a channels-first map (the batched-matmul backward): channel 0 constant
    maps = torch.randn(8, 4, 4, 4, dtype=dtype)
    maps[:, 0] = 2.0
    maps.requires_grad_()
    y, p, v, k, valid = VCRegFunction.apply(maps, 1, None, spec, None)
    ((y * 0).sum() + loss_scale * p).backward()
    assert bool(valid) and torch.count_nonzero(maps.grad[:, 0]) == 0 and torch.count_nonzero(maps.grad[:, 1:]) > 0


@pytest.mark.parametrize("shape,axis", [((64, 65, 192), 2), ((16, 256, 4, 4), 1)])
def test_float32_gradient_matches_float64_to_float32_rounding(shape, axis):
    """The CPU goal's shapes (small ViT tokens; a ResNet stage) in float32: errors at float32 rounding."""
    torch.manual_seed(9)
    x = torch.randn(*shape) * 0.5 + 2.0
    mix = torch.randn(shape[axis], shape[axis]) / shape[axis] ** 0.5  # correlated features: a real covariance term
    x = (x.movedim(axis, -1) @ mix + 2.0).movedim(-1, axis).contiguous()
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros_like(x)  # the penalty's gradient alone (a large task gradient would hide its error)
    grad, p = _ours(x, axis, None, spec, w)
    expected, p_ref = _reference(x, axis, None, spec, w)
    assert _rel(grad, expected) < 2e-5  # measured 2e-6 (tokens, uncentred backward) and 5e-7 (maps)
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-5)


@pytest.mark.parametrize("mean_over_std,bound", [(30.0, 2e-5), (300.0, 5e-5)])
def test_float32_backward_centres_features_with_a_large_mean(mean_over_std, bound):
    """Beyond |mu| = 100 sigma the uncentred backward (error ~ eps |mu| / sigma) gives way to a centred copy:
    at 300 sigma the error stays 2e-5 (uncentred: 1.3e-4); what is left comes from the float32 forward."""
    torch.manual_seed(0)
    x = torch.randn(16, 65, 192) + mean_over_std
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros_like(x)
    grad, _ = _ours(x, 2, None, spec, w)
    expected, _ = _reference(x, 2, None, spec, w)
    assert _rel(grad, expected) < bound


def test_cpu_bf16_autocast_on_wide_tokens_is_within_bf16_rounding():
    torch.manual_seed(10)
    x = (torch.randn(32, 65, 192) + 0.5).to(torch.bfloat16)
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros(x.shape)
    grad, p = _ours(x, 2, None, spec, w, autocast=True)
    expected, p_ref = _reference(x.float(), 2, None, spec, w)
    assert grad.dtype == torch.bfloat16 and p.dtype == torch.float32
    assert _rel(grad, expected) < 1e-2  # bf16: 8-bit mantissa, relative rounding 2^-8 per element
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-5)  # statistics stay float32 on the CPU


@pytest.mark.parametrize("shape,axis,subset", [((8, 65, 192), 2, False), ((6, 128, 5, 5), 1, False),
                                               ((8, 65, 192), 2, True)])
def test_half_precision_matmul_path_is_within_bf16_rounding(monkeypatch, shape, axis, subset):
    """The CUDA-autocast path (bf16 Zc and G, float32 accumulation), emulated on the CPU."""
    monkeypatch.setattr(penalty, "_matmul_dtype", lambda x: torch.bfloat16)
    torch.manual_seed(11)
    x = torch.randn(*shape) * 0.7 + 3.0  # a large mean: the bf16 copy must be centred before rounding
    n = x.numel() // shape[axis]
    rows = torch.randperm(n)[: n // 3].sort().values if subset else None
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros_like(x)
    grad, p = _ours(x, axis, rows, spec, w)
    expected, p_ref = _reference(x, axis, rows, spec, w)
    assert grad.dtype == torch.float32
    assert _rel(grad, expected) < 1e-2
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-2)


def test_half_precision_matmuls_are_actually_used(monkeypatch):
    """Under the half-precision path both matmuls receive bf16 operands (and return float32)."""
    monkeypatch.setattr(penalty, "_matmul_dtype", lambda x: torch.bfloat16)
    seen = []
    original = penalty._mm

    def spy(a, b, out_dtype):
        seen.append((a.dtype, b.dtype, out_dtype))
        return original(a, b, out_dtype)

    monkeypatch.setattr(penalty, "_mm", spy)
    x = torch.randn(4, 65, 192, requires_grad=True)
    y, p, *_ = VCRegFunction.apply(x, 2, None, SPEC, None)
    (y.sum() + p).backward()
    assert seen and all(a == b == torch.bfloat16 and o == torch.float32 for a, b, o in seen)


# (shape, axis, rows kept): fewer rows than features, so the n x n Gram replaces the d x d one
FEW_ROWS = [((24, 96), 1, None), ((20, 64, 1, 1), 1, None), ((3, 4, 80), 2, None), ((6, 5, 40), 2, 30),
            ((2, 48, 3, 3), 1, 17)]


@pytest.mark.parametrize("shape,axis,keep", FEW_ROWS)
def test_fewer_rows_than_features_path_equals_autograd_float64(monkeypatch, shape, axis, keep):
    torch.manual_seed(13)
    calls = []
    original = VCRegFunction._dual
    monkeypatch.setattr(VCRegFunction, "_dual", staticmethod(lambda *a: calls.append(a[1].shape) or original(*a)))
    x = torch.randn(*shape, dtype=torch.float64) * 0.8 + 2.0
    x = x + x.movedim(axis, -1)[..., :1].movedim(-1, axis)  # a shared component: strongly correlated features
    n = x.numel() // shape[axis]
    rows = torch.randperm(n)[:keep].sort().values if keep else None
    spec = VCRegSpec(alpha=0.7, beta=1.3, gamma=2.0, weight=0.5)
    w = torch.randn_like(x)
    grad, p = _ours(x, axis, rows, spec, w)
    expected, p_ref = _reference(x, axis, rows, spec, w)
    assert calls == [((keep or n), shape[axis])]  # the n < d path ran
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-10)


def test_fewer_rows_than_features_float32_and_bf16_are_within_rounding():
    torch.manual_seed(14)
    x = torch.randn(64, 512, 1, 1) + 0.5  # a pooled ResNet-18 stage output: n = 64 < d = 512
    x = x + 0.3 * x[:, :1]
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=0.25)
    w = torch.zeros_like(x)
    expected, p_ref = _reference(x, 1, None, spec, w)
    grad, p = _ours(x, 1, None, spec, w)
    assert _rel(grad, expected) < 1e-5 and p.item() == pytest.approx(p_ref.item(), rel=1e-5)
    x16 = x.bfloat16()  # bf16 activations: the loss scale reaches the n x n factors before the matmul
    expected16, p_ref16 = _reference(x16.float(), 1, None, spec, w)
    grad16, p16 = _ours(x16, 1, None, spec, w.bfloat16())
    assert grad16.dtype == torch.bfloat16 and _rel(grad16, expected16) < 1e-2
    assert p16.item() == pytest.approx(p_ref16.item(), rel=1e-5)  # statistics stay float32


def test_fewer_rows_than_features_keeps_only_n_by_n_statistics():
    x = torch.randn(16, 200, requires_grad=True)
    y, p, *_ = VCRegFunction.apply(x, 1, None, SPEC, None)
    held = [v for v in vars(p.grad_fn).values() if isinstance(v, torch.Tensor)]
    held += [t for v in vars(p.grad_fn).values() if isinstance(v, tuple) for t in v if isinstance(t, torch.Tensor)]
    assert max(t.numel() for t in held) == 16 * 16 < 200 * 200 and p.grad_fn.g is None


def test_gradient_function_keeps_no_activation_sized_buffer():
    """Between forward and backward only the block output itself (already kept by the next layer) and
    d x d / d-sized statistics are held: no float32 copy of the activation stays alive."""
    x = torch.randn(16, 65, 96, requires_grad=True)
    y, p, *_ = VCRegFunction.apply(x, 2, None, SPEC, None)
    node = p.grad_fn
    assert len(node.saved_tensors) == 1 and node.saved_tensors[0].data_ptr() == x.data_ptr()
    held = [v for v in vars(node).values() if isinstance(v, torch.Tensor)]
    assert held and max(t.numel() for t in held) == 96 * 96


@pytest.mark.parametrize("shape,bad", [((40, 130), float("nan")), ((10, 50), float("inf")), ((300, 20), float("-inf"))])
def test_invalid_layer_backward_returns_the_incoming_gradient_unchanged(shape, bad):
    """Both paths (n < d: the n x n Gram; n >= d: the d x d one) skip a layer with a non-finite sample."""
    x = torch.randn(*shape)
    x[5, 7] = bad
    x.requires_grad_()
    w = torch.randn_like(x)
    y, p, v, k, valid = VCRegFunction.apply(x, 1, None, SPEC, None)
    ((y * w).sum() + p).backward()
    assert not bool(valid) and p.item() == 0.0
    assert torch.equal(x.grad, w)


def test_statistics_matmuls_stay_float32_on_the_cpu_even_under_autocast():
    """No float32-output half matmul exists on the CPU, so CPU autocast keeps float32 statistics."""
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert penalty._matmul_dtype(x) is None
    assert penalty._matmul_dtype(x) is None


def test_cpu_scratch_is_reused_sized_to_the_largest_layer_and_released():
    """Transient Zc / Zc G live in two reused per-thread buffers (no fresh pages per call), never in the outputs."""
    penalty.release_scratch()
    big, small = torch.randn(8, 64, 6, 6, requires_grad=True), torch.randn(4, 32, 3, 3, requires_grad=True)
    for x in (big, small, big):
        y, p, *_ = VCRegFunction.apply(x, 1, None, SPEC, None)
        (y.sum() + p).backward()
    assert penalty.scratch_bytes() == 2 * big.numel() * 4  # slots 0 (Zc) and 1 (Zc G), float32
    grads = big.grad.clone()
    penalty.release_scratch()
    assert penalty.scratch_bytes() == 0
    big.grad = None
    for x in (big, small, big):
        y, p, *_ = VCRegFunction.apply(x, 1, None, SPEC, None)
        (y.sum() + p).backward()
    torch.testing.assert_close(big.grad, grads, rtol=0, atol=0)  # the reused buffers changed nothing


def test_scratch_is_per_thread_and_safe_under_inference_mode():
    import threading

    torch.manual_seed(16)
    xs = [torch.randn(6, 48, 5, 5, dtype=torch.float64) + i for i in range(4)]
    expected = [_reference(x, 1, None, SPEC, torch.ones_like(x))[0] for x in xs]
    got, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(20):  # interleave with the other threads' calls
                g, _ = _ours(xs[i], 1, None, SPEC, torch.ones_like(xs[i]))
            got[i] = g
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    penalty.release_scratch()
    x = torch.randn(4, 64, 4, 4) + 1.0
    with torch.inference_mode():  # a buffer made here is an inference tensor: the next normal call must not use it
        VCRegFunction.apply(x, 1, None, SPEC, None)
    g, _ = _ours(x, 1, None, SPEC, torch.ones_like(x))
    assert _rel(g, _reference(x, 1, None, SPEC, torch.ones_like(x))[0]) < 1e-5


@pytest.mark.parametrize(
    "shape,axis,keep,bad",
    [((6, 100, 128), 2, None, None), ((5, 128, 6, 5), 1, None, None), ((8, 65, 96), 2, 200, None),
     ((20, 64, 1, 1), 1, None, None), ((40, 130), 1, None, float("nan")), ((10, 50), 1, None, float("inf"))],
)
def test_device_branches_without_host_sync_equal_autograd(monkeypatch, shape, axis, keep, bad):
    """The GPU code (validity as a device tensor, masks instead of branches, the loss scale multiplied into the
    small factors) run on the CPU by declaring the CPU not host-readable: same gradients as autograd."""
    monkeypatch.setattr(penalty, "_host_readable", lambda t: False)
    torch.manual_seed(15)
    x = torch.randn(*shape, dtype=torch.float64) * 0.7 + 1.5
    if bad is not None:
        x[3, 2] = bad
    n = x.numel() // shape[axis]
    rows = torch.randperm(n)[:keep].sort().values if keep else None
    spec = VCRegSpec(alpha=0.7, beta=1.3, gamma=2.0, weight=0.5)
    w = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    y, p, v, k, valid = VCRegFunction.apply(xr, axis, rows, spec, None)
    assert p.grad_fn.host_known is False  # the device branches ran
    ((y * w).sum() + 3.0 * p).backward()
    if bad is not None:
        assert not bool(valid) and p.item() == 0.0 and torch.equal(xr.grad, w)
        return
    expected, p_ref = _reference(x, axis, rows, spec, w)
    assert bool(valid)
    torch.testing.assert_close(xr.grad, expected, rtol=1e-10, atol=1e-12)
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("shape,axis,dtype", [((8, 197, 768), 2, torch.float32), ((8, 256, 14, 14), 1, torch.bfloat16)])
def test_cuda_autocast_tensor_core_statistics_are_within_bf16_rounding(shape, axis, dtype):
    torch.manual_seed(12)
    x = (torch.randn(*shape, device="cuda") * 0.7 + 1.5).to(dtype)
    spec = VCRegSpec(alpha=1.0, beta=10.0, weight=1 / 12)
    w = torch.zeros(shape, device="cuda")
    xr = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert penalty._matmul_dtype(xr) == torch.bfloat16
        y, p, v, k, valid = VCRegFunction.apply(xr, axis, None, spec, None)
    ((y * w.to(y.dtype)).sum() + 3.0 * p).backward()
    expected, p_ref = _reference(x.float(), axis, None, spec, w)
    assert bool(valid) and p.dtype == torch.float32 and xr.grad.dtype == dtype
    assert _rel(xr.grad, expected) < 1e-2
    assert p.item() == pytest.approx(p_ref.item(), rel=1e-2)
