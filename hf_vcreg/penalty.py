r"""Statistics and penalty: VCReg's variance and covariance terms, as pure functions and as an autograd function.

Step 2 of the data flow (capture -> penalty -> trainer -> publishing).

For a sample matrix :math:`Z \in \mathbb{R}^{n \times d}` (rows are samples: every token, every spatial
position), centred over rows, :math:`Z_c = Z - \bar Z`, with :math:`C = Z_c^\top Z_c / (n - 1)`:

.. math::

    V(Z) = \frac1d \sum_j \max\bigl(0, \gamma - \sqrt{C_{jj} + \epsilon}\bigr), \qquad
    K(Z) = \frac{1}{d(d-1)} \sum_{i \ne j} h(C_{ij}),

with :math:`h(c) = c^2`, or with ``delta`` the robust ("smooth L1") form :math:`h(c) = c^2` for
:math:`|c| \le \delta` and :math:`2\delta|c| - \delta^2` otherwise. The penalty of one layer is
:math:`\alpha V + \beta K`; statistics are computed in (at least) float32 whatever the input dtype.

Two implementations with the same gradient:

* :func:`vcreg_loss` builds the loss with autograd (``vcreg_implementation="loss"``);
* :class:`VCRegFunction` (``"gradient"``, the paper's efficient form) is the identity on the representation in
  the forward pass and, in the backward pass, adds the analytic gradient
  :math:`\partial(\alpha V + \beta K)/\partial Z = \tfrac{2}{n-1} Z_c G` with
  :math:`G_{jj} = -\tfrac{\alpha}{2 d\, s_j} [\gamma > s_j]`, :math:`s_j = \sqrt{C_{jj}+\epsilon}`, and
  :math:`G_{ij} = \tfrac{\beta}{d(d-1)} h'(C_{ij})` off the diagonal. It returns the penalty value as a
  second output (computed without a graph); adding that value to the loss makes the backward receive the
  loss's scale (gradient accumulation, AMP loss scaling), so the injected gradient is always scaled like the
  rest of the loss. The public reference code multiplies the covariance gradient by an extra ``(n - 1)``;
  this one is the true gradient of the written loss (pinned by tests against autograd in float64).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .capture import samples_view

__all__ = [
    "VCRegFunction",
    "VCRegSpec",
    "covariance_loss",
    "covariance_matrix",
    "variance_loss",
    "vcreg_loss",
]


def _no_autocast(device: torch.device):
    """Statistics run outside autocast: their matmuls must not drop to half precision."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _check_2d(z: torch.Tensor) -> None:
    assert z.dim() == 2, f"expected a (n, d) sample matrix, got shape {tuple(z.shape)}"
    assert z.shape[0] >= 2, f"need at least 2 samples (rows) for a covariance, got shape {tuple(z.shape)}"
    assert z.shape[1] >= 1, f"need at least 1 feature (column), got shape {tuple(z.shape)}"


def _check_input(x: torch.Tensor, axis: int) -> None:
    """A block output for :class:`VCRegFunction` / :func:`explicit_penalty`: floating point, a real feature axis."""
    assert x.is_floating_point(), f"expected a floating-point tensor, got dtype {x.dtype} (shape {tuple(x.shape)})"
    assert -x.dim() <= axis < x.dim(), f"feature axis {axis} is out of range for shape {tuple(x.shape)}"
    assert x.shape[axis] >= 1, f"feature axis {axis} of shape {tuple(x.shape)} is empty: no features"


def covariance_matrix(z: torch.Tensor) -> torch.Tensor:
    """:math:`C = Z_c^\\top Z_c / (n - 1)` of a ``(n, d)`` matrix, in float32 (float64 for float64 input)."""
    _check_2d(z)
    with _no_autocast(z.device):
        zc = z.to(_stat_dtype(z.dtype))
        zc = zc - zc.mean(dim=0)
        return zc.T @ zc / (z.shape[0] - 1)


def _variance_from_cov(c: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    return torch.relu(gamma - torch.sqrt(torch.diagonal(c) + eps)).mean()


def _huber(c: torch.Tensor, delta: float | None) -> torch.Tensor:
    if delta is None:
        return c.square()
    a = c.abs()
    return torch.where(a <= delta, c.square(), 2 * delta * a - delta**2)


def _covariance_from_cov(c: torch.Tensor, delta: float | None) -> torch.Tensor:
    d = c.shape[0]
    if d < 2:
        return c.new_zeros(())
    off = c - torch.diag_embed(torch.diagonal(c))
    return _huber(off, delta).sum() / (d * (d - 1))


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """:math:`V(Z) = \\frac1d \\sum_j \\mathrm{relu}(\\gamma - \\sqrt{C_{jj} + \\epsilon})` of a ``(n, d)`` matrix.

    Example::

        >>> z = torch.randn(256, 32)
        >>> variance_loss(z)  # about 0: unit-variance features already meet gamma = 1
    """
    _check_2d(z)
    zf = z.to(_stat_dtype(z.dtype))
    var = zf.var(dim=0, unbiased=True)
    return torch.relu(gamma - torch.sqrt(var + eps)).mean()


def covariance_loss(z: torch.Tensor, delta: float | None = None) -> torch.Tensor:
    """:math:`K(Z) = \\frac{1}{d(d-1)} \\sum_{i \\ne j} h(C_{ij})`; :math:`h` quadratic, or Huber with ``delta``.

    A ``(n, 1)`` matrix has no off-diagonal entries: its covariance term is 0.
    """
    return _covariance_from_cov(covariance_matrix(z), delta)


def vcreg_loss(
    z: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    delta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha * V + beta * K, V, K)`` of a ``(n, d)`` matrix, differentiable with autograd."""
    c = covariance_matrix(z)
    v = _variance_from_cov(c, gamma, eps)
    k = _covariance_from_cov(c, delta)
    return alpha * v + beta * k, v, k


@dataclass(frozen=True)
class VCRegSpec:
    """Coefficients of one layer's penalty ``weight * (alpha * V + beta * K)``.

    Attributes:
        alpha: variance coefficient.
        beta: covariance coefficient.
        gamma: target standard deviation of every feature.
        eps: added to the variance under the square root (numerical floor).
        delta: Huber threshold of the covariance term; ``None`` for the plain square.
        weight: layer weight (``1 / n_layers`` for a mean over layers, ``1`` for a sum).
        grad_multiplier: multiplies the injected gradient; the trainer sets it to the world size when
            statistics are global, to undo DDP's gradient averaging (the penalty is one global value).
    """

    alpha: float
    beta: float
    gamma: float = 1.0
    eps: float = 1e-4
    delta: float | None = None
    weight: float = 1.0
    grad_multiplier: float = 1.0


# Largest |mean| / std of every feature for which the backward skips centring (see VCRegFunction._forward).
_MAX_MEAN_OVER_STD = 100.0


def _moments(
    samples: torch.Tensor, rows: torch.Tensor | None, group, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and centred sample matrix ``(n, mu, Zc)`` of a feature-last view, global over ``group``.

    ``Zc`` is a fresh ``(rows used, d)`` matrix in ``dtype`` (default: float32, float64 for float64 input), made
    in one pass (subtract and cast); ``mu`` is float32 (float64); ``n`` is a 0-d tensor of the global count.
    """
    d = samples.shape[-1]
    sdt = _stat_dtype(samples.dtype)
    if rows is not None:
        samples = samples[torch.unravel_index(rows, samples.shape[:-1])]
    n_local = samples.numel() // d if d else 0
    flat_dims = tuple(range(samples.dim() - 1))
    total = samples.sum(dim=flat_dims, dtype=sdt)
    if group is not None:
        buf = torch.cat([total, total.new_tensor([n_local])])
        dist.all_reduce(buf, group=group)
        total, n = buf[:d], buf[d]
    else:
        n = total.new_tensor(float(n_local))
    mu = total / n.clamp(min=1)
    return n, mu, _centred(samples, mu, dtype or sdt)


def _centred(samples: torch.Tensor, mu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``samples - mu`` as a fresh contiguous ``(n, d)`` matrix in ``dtype`` (one pass: subtract and cast)."""
    zc = torch.empty(samples.shape, dtype=dtype, device=samples.device)
    torch.sub(samples, mu, out=zc)
    return zc.view(-1, samples.shape[-1])


def _matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Half-precision input dtype for the statistics' matmuls, or ``None`` for float32 (float64) matmuls.

    Under CUDA autocast the two matmuls of a layer (``Zc^T Zc`` and ``Zc G``) run on tensor cores in the autocast
    dtype with float32 accumulation and a float32 result (``torch.mm(..., out_dtype=float32)``): ``Zc`` and ``G``
    are rounded to bfloat16 / float16 (a relative error of 2^-9 / 2^-12 per entry), never the sums. Everything
    else (means, centring, the penalty) stays float32. Elsewhere, and on the CPU (no float32-output half
    matmul there), the matmuls are float32 (float64 for float64 input).
    """
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype != torch.float64:
        return torch.get_autocast_dtype("cuda")
    return None


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with the result in ``out_dtype``; half-precision inputs accumulate in float32."""
    if a.dtype == out_dtype or a.dtype in (torch.float32, torch.float64):
        return (a @ b).to(out_dtype)
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=out_dtype)
    # CPU (tests of the CUDA path): products of half-precision values are exact in float32, as on tensor cores.
    return (a.float() @ b.float()).to(out_dtype)


def _gram(zc: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``Zc^T Zc`` of a ``(n, d)`` matrix, each off-diagonal block computed once.

    On the CPU, with ``n >= 4 d`` and ``d >= 128``, the columns are split into ``k = min(4, d // 64)`` blocks and
    block row ``i`` is ``Zc[:, i]^T Zc[:, i:]``: ``(k + 1) / (2 k)`` of the multiply-adds of one full product
    (the other triangle is a copy). Elsewhere (GPU: fewer launches matter more) one full product.
    """
    n, d = zc.shape
    k = min(4, d // 64) if (zc.device.type == "cpu" and n >= 4 * d) else 1
    if k < 2:
        return _mm(zc.T, zc, out_dtype)
    c = torch.empty((d, d), dtype=out_dtype, device=zc.device)
    edges = [round(i * d / k) for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = _mm(zc[:, lo:hi].T, zc[:, lo:], out_dtype)
        c[lo:hi, lo:] = block
        c[hi:, lo:hi] = block[:, hi - lo :].T
    return c


def _penalty_and_grad_matrix(c: torch.Tensor, spec: VCRegSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V``, ``K`` and the symmetric matrix ``G = d(alpha V + beta K) / dC`` (the diagonal from V, the rest from K)."""
    d = c.shape[0]
    s = torch.sqrt(torch.diagonal(c) + spec.eps)
    hinge = spec.gamma - s
    v = torch.relu(hinge).mean()
    if d >= 2:
        off = c.clone()
        off.diagonal().zero_()
        k = _huber(off, spec.delta).sum() / (d * (d - 1))
        g = off if spec.delta is None else off.clamp_(-spec.delta, spec.delta)
        g.mul_(2 * spec.beta / (d * (d - 1)))
    else:
        k = c.new_zeros(())
        g = torch.zeros_like(c)
    g.diagonal().copy_(torch.where(hinge > 0, -spec.alpha / (2 * d) / s, 0.0))
    return v, k, g


class VCRegFunction(torch.autograd.Function):
    """Identity on a block output; its backward adds the gradient of the layer's penalty.

    ``apply(x, axis, rows, spec, group) -> (x, penalty, V, K, valid)``:

    * ``x``: a block output; ``axis``: its feature axis (every other axis indexes samples);
    * ``rows``: ``None`` or indices (into the flattened sample axes) of the rows used for the statistics;
    * ``group``: a ``torch.distributed`` process group for global statistics, or ``None``;
    * ``penalty = weight * (alpha V + beta K)``, a 0-d tensor without a graph through the statistics. Add it
      to the loss: the backward then scales the injected gradient by the gradient this value receives.
    * ``valid``: 0-d bool, ``False`` when the statistics were undefined (fewer than 2 rows) or not finite; the
      layer's penalty and gradient are then 0.
    """

    @staticmethod
    def forward(ctx, x, axis, rows, spec, group):
        _check_input(x, axis)
        matmul_dtype = _matmul_dtype(x)  # read before autocast is switched off
        with _no_autocast(x.device):
            return VCRegFunction._forward(ctx, x, axis, rows, spec, group, matmul_dtype)

    @staticmethod
    def _forward(ctx, x, axis, rows, spec, group, matmul_dtype):
        samples = samples_view(x, axis)
        sdt = _stat_dtype(x.dtype)
        if matmul_dtype is None:
            n, mu, zc = _moments(samples, rows, group)
        else:
            n, mu, zc = _moments(samples, rows, group, matmul_dtype)
        cov = _gram(zc, sdt)
        del zc  # the only copy of the activation is gone before the penalty is computed
        if group is not None:
            dist.all_reduce(cov, group=group)
        cov.div_((n - 1).clamp(min=1))
        v, k, g = _penalty_and_grad_matrix(cov, spec)
        valid = (n >= 2) & torch.isfinite(cov).all()
        penalty = torch.where(valid, spec.weight * (spec.alpha * v + spec.beta * k), 0.0)
        g.mul_(spec.weight * spec.grad_multiplier * 2 / (n - 1).clamp(min=1))
        # On the CPU the validity is known without a device sync: an invalid layer then skips the backward work.
        ctx.valid_host = bool(valid) if valid.device.type == "cpu" else None
        # The backward may use Z G - 1 (mu^T G) instead of a centred copy when that loses little: its rounding error,
        # relative to the result, grows like |mu| / sigma (1e-5 in float32 at |mu| = 100 sigma; checked on the CPU).
        ctx.uncentred_ok = bool(ctx.valid_host and (mu.square() <= _MAX_MEAN_OVER_STD**2 * torch.diagonal(cov)).all())
        ctx.g = g if ctx.valid_host is not False else None
        ctx.mu, ctx.axis, ctx.rows, ctx.valid, ctx.matmul_dtype = mu, axis, rows, valid, matmul_dtype
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(v, k, valid)
        return x.view_as(x), penalty, v.detach(), k.detach(), valid

    @staticmethod
    def backward(ctx, grad_x, grad_penalty, *unused):
        with _no_autocast(ctx.valid.device):
            return VCRegFunction._backward(ctx, grad_x, grad_penalty)

    @staticmethod
    def _backward(ctx, grad_x, grad_penalty):
        (x,) = ctx.saved_tensors
        if grad_penalty is None or ctx.valid_host is False:
            return grad_x, None, None, None, None
        if grad_x is None:
            grad_x = torch.zeros_like(x)
        g = ctx.g * grad_penalty
        samples = samples_view(x, ctx.axis)
        d = samples.shape[-1]
        if (
            ctx.rows is None
            and ctx.matmul_dtype is None
            and x.dtype == g.dtype
            and ctx.axis == x.dim() - 1
            and x.is_contiguous()
            and grad_x.is_contiguous()
        ):
            # Feature-last float32/float64 (transformer tokens): one matmul that also adds the incoming gradient.
            # Zc G = Z G - 1 (mu^T G): no centred copy, one pass for the mean's row, when the mean is moderate.
            if ctx.uncentred_ok:
                grad_in = torch.addmm(grad_x.view(-1, d), x.view(-1, d), g)
                grad_in.sub_(ctx.mu @ g)
            else:
                grad_in = torch.addmm(grad_x.view(-1, d), _centred(samples, ctx.mu, g.dtype), g)
            if ctx.valid_host is None:  # GPU: mask without a sync (a non-finite Z would turn G = 0 into NaN)
                grad_in = torch.where(ctx.valid, grad_in, grad_x.view(-1, d))
            return grad_in.view(x.shape), None, None, None, None
        mm_dtype = ctx.matmul_dtype or g.dtype
        if ctx.rows is not None:
            index = torch.unravel_index(ctx.rows, samples.shape[:-1])
            zc = _centred(samples[index], ctx.mu, mm_dtype)
        else:
            zc = _centred(samples, ctx.mu, mm_dtype)
        extra = _mm(zc, g.to(mm_dtype), x.dtype)
        del zc
        if ctx.valid_host is None:  # GPU: mask without a sync (a non-finite Zc would turn G = 0 into NaN)
            extra = torch.where(ctx.valid, extra, 0.0)
        if ctx.rows is not None:
            grad_in = grad_x.clone()
            samples_view(grad_in, ctx.axis).index_put_(index, extra, accumulate=True)
        else:
            grad_in = grad_x + extra.view(samples.shape).movedim(-1, ctx.axis)
        return grad_in, None, None, None, None


def explicit_penalty(x, axis, rows, spec, group):
    _check_input(x, axis)
    with _no_autocast(x.device):
        return _explicit_penalty(x, axis, rows, spec, group)


def _explicit_penalty(x, axis, rows, spec, group):
    """The same outputs as :class:`VCRegFunction`, with autograd through the statistics (``"loss"`` mode).

    With a process group the moments are all-reduced with ``torch.distributed.nn`` so that autograd sums
    the gradient over ranks; DDP's averaging then gives the gradient of the global penalty (no multiplier).
    """
    samples = samples_view(x, axis)
    d = samples.shape[-1]
    if rows is not None:
        samples = samples[torch.unravel_index(rows, samples.shape[:-1])]
    z = samples.reshape(-1, d).to(_stat_dtype(x.dtype))
    # NOTE: an invalid layer must get a gradient of exactly 0, and masking only the penalty (torch.where) is not
    # enough: the backward would still multiply that 0 by the inf in Z (or in an overflowed C), giving NaN. So
    # non-finite samples are replaced by zeros and an overflowed C by 0 before anything is differentiated.
    finite = torch.isfinite(z).all()
    z = torch.where(finite, z, 0.0)
    if group is None:
        n = z.shape[0]
        if n < 2:
            zero = z.new_zeros(())
            return x, zero, zero, zero, torch.tensor(False, device=x.device)
        cov = covariance_matrix(z)
        n = z.new_tensor(float(n))
    else:
        from torch.distributed.nn.functional import all_reduce as diff_all_reduce

        counts = torch.stack([z.new_tensor(float(z.shape[0])), (~finite).to(z.dtype)])  # rows, non-finite flag
        buf = diff_all_reduce(torch.cat([z.sum(0), counts]), group=group)
        n, finite = buf[d].detach(), buf[d + 1].detach() == 0  # every rank agrees on the validity
        zc = z - buf[:d] / n.clamp(min=1)
        cov = diff_all_reduce(zc.T @ zc, group=group) / (n - 1).clamp(min=1)
    valid = (n >= 2) & finite & torch.isfinite(cov.detach()).all()
    cov = torch.where(valid, cov, 0.0)
    v = _variance_from_cov(cov, spec.gamma, spec.eps)
    k = _covariance_from_cov(cov, spec.delta)
    penalty = torch.where(valid, spec.weight * (spec.alpha * v + spec.beta * k), 0.0)
    return x, penalty, v.detach(), k.detach(), valid


def apply_penalty(x, axis, rows, spec, group=None, implementation: str = "gradient"):
    """Dispatch to :class:`VCRegFunction` (``"gradient"``) or :func:`explicit_penalty` (``"loss"``)."""
    if implementation == "gradient":
        return VCRegFunction.apply(x, axis, rows, spec, group)
    return explicit_penalty(x, axis, rows, spec, group)

