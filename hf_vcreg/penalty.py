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


def _moments(samples: torch.Tensor, rows: torch.Tensor | None, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and centred sample matrix ``(n, mu, Zc)`` of a feature-last view, global over ``group``.

    ``Zc`` is a fresh float32 (float64) matrix of the rows used; ``n`` is a 0-d tensor of the global count.
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
    zc = torch.empty((*samples.shape[:-1], d), dtype=sdt, device=samples.device)
    torch.sub(samples, mu, out=zc)
    return n, mu, zc.view(-1, d)


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
        dh = 2 * (off if spec.delta is None else off.clamp(-spec.delta, spec.delta))
        g = dh.mul_(spec.beta / (d * (d - 1)))
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
        with _no_autocast(x.device):
            return VCRegFunction._forward(ctx, x, axis, rows, spec, group)

    @staticmethod
    def _forward(ctx, x, axis, rows, spec, group):
        samples = samples_view(x, axis)
        n, mu, zc = _moments(samples, rows, group)
        cov = zc.T @ zc
        if group is not None:
            dist.all_reduce(cov, group=group)
        cov = cov / (n - 1).clamp(min=1)
        v, k, g = _penalty_and_grad_matrix(cov, spec)
        valid = (n >= 2) & torch.isfinite(cov).all()
        penalty = torch.where(valid, spec.weight * (spec.alpha * v + spec.beta * k), 0.0)
        scale = spec.weight * spec.grad_multiplier * 2 / (n - 1).clamp(min=1)
        ctx.g = torch.where(valid, g * scale, 0.0)
        ctx.mu, ctx.axis, ctx.rows, ctx.valid = mu, axis, rows, valid
        ctx.save_for_backward(x)
        ctx.mark_non_differentiable(v, k, valid)
        return x.view_as(x), penalty, v.detach(), k.detach(), valid

    @staticmethod
    def backward(ctx, grad_x, grad_penalty, *unused):
        with _no_autocast(grad_penalty.device if grad_penalty is not None else ctx.g.device):
            return VCRegFunction._backward(ctx, grad_x, grad_penalty)

    @staticmethod
    def _backward(ctx, grad_x, grad_penalty):
        (x,) = ctx.saved_tensors
        if grad_penalty is None:
            return grad_x, None, None, None, None
        samples = samples_view(x, ctx.axis)
        d = samples.shape[-1]
        if ctx.rows is not None:
            index = torch.unravel_index(ctx.rows, samples.shape[:-1])
            zc = samples[index].to(ctx.g.dtype) - ctx.mu
        else:
            zc = torch.empty(samples.shape, dtype=ctx.g.dtype, device=x.device)
            torch.sub(samples, ctx.mu, out=zc)
            zc = zc.view(-1, d)
        # G is 0 for an invalid layer, but a non-finite Zc would still turn 0 into NaN: mask the product.
        extra = torch.where(ctx.valid, zc @ (ctx.g * grad_penalty), 0.0).to(x.dtype)
        if grad_x is None:
            grad_x = torch.zeros_like(x)
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

