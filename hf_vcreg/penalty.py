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
import math
import threading
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
        if torch.is_autocast_enabled(device.type):
            return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        pass
    return contextlib.nullcontext()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def _check_2d(z: torch.Tensor) -> None:
    """A ``(n, d)`` sample matrix with ``n >= 2``, ``d >= 1``; a ValueError (not an ``assert``: kept under -O)."""
    shape = tuple(z.shape)
    if z.dim() != 2:
        raise ValueError(
            f"expected a (n, d) sample matrix, got shape {shape}: flatten the sample axes first, e.g. "
            "z.movedim(feature_axis, -1).reshape(-1, d)"
        )
    if z.shape[0] < 2:
        raise ValueError(
            f"need at least 2 samples (rows) for a covariance, got shape {shape}: pass more rows (a larger batch)"
        )
    if z.shape[1] < 1:
        raise ValueError(f"need at least 1 feature (column), got shape {shape}: the feature axis is empty")


def _check_input(x: torch.Tensor, axis: int) -> None:
    """A block output for :class:`VCRegFunction` / :func:`explicit_penalty`: floating point, a real feature axis."""
    shape = tuple(x.shape)
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point tensor, got dtype {x.dtype} (shape {shape}): regularise a float block "
            "output, or convert it with .float()"
        )
    if not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"feature axis {axis} is out of range for shape {shape}: "
            + (f"use an axis in [{-x.dim()}, {x.dim() - 1}]" if x.dim() else "a 0-d tensor has no feature axis")
        )
    if x.shape[axis] < 1:
        raise ValueError(f"feature axis {axis} of shape {shape} is empty: no features; pick the axis holding them")


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


# Largest |mean| / std of every feature for which the backward skips centring (see _uncentred_ok).
_MAX_MEAN_OVER_STD = 100.0
# Smallest spatial size (H W) of a channels-first map for the backward's batched-matmul path.
_MIN_MAP_SIZE = 16


def _row_index(samples: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Index of the ``rows`` (positions in the flattened sample axes) of a feature-last view ``(*samples, d)``."""
    return torch.unravel_index(rows, samples.shape[:-1])


def _used_rows(samples: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The samples that enter the statistics: all of them, or the ``rows`` subset as ``(len(rows), d)``."""
    return samples if rows is None else samples[_row_index(samples, rows)]


def _moments(
    samples: torch.Tensor, rows: torch.Tensor | None, group, dtype: torch.dtype | None = None
) -> tuple[int | torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and centred sample matrix ``(n, mu, Zc)`` of a feature-last view, global over ``group``.

    ``Zc`` is a fresh ``(rows used, d)`` matrix in ``dtype`` (default: float32, float64 for float64 input), made
    in one pass (subtract and cast); ``mu`` is float32 (float64). ``n`` is a Python int without a process group
    (known on the host, no device sync) and a 0-d tensor of the global count with one.
    """
    d = samples.shape[-1]
    sdt = _stat_dtype(samples.dtype)
    samples = _used_rows(samples, rows)
    n_local = samples.numel() // d if d else 0
    total = samples.sum(dim=tuple(range(samples.dim() - 1)), dtype=sdt)
    if group is None:
        n = n_local
        mu = total.div_(max(n, 1))
    else:
        buf = torch.cat([total, total.new_tensor([n_local])])
        dist.all_reduce(buf, group=group)
        n = buf[d]
        mu = buf[:d] / n.clamp(min=1)
    return n, mu, _centred(samples, mu, dtype or sdt)


_SCRATCH = threading.local()


def _scratch(slot: int, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``shape`` tensor for a transient intermediate; on the CPU, a view into a reused buffer.

    A CPU allocation of an activation-sized tensor is fresh memory from the OS on every call (glibc hands large
    blocks back), and each of its pages costs a page fault when first written (benchmarks/PERFORMANCE.md, row 11).
    So the centred copy ``Zc`` (slot 0) and the backward's ``Zc G`` (slot 1) reuse one buffer per slot, dtype and
    thread (thread-local: concurrent trainers in threads never share one), grown to the largest layer and kept
    until :func:`release_scratch`. Nothing saved for the backward or returned ever points into it. On other
    devices the caching allocator already reuses memory: a plain ``torch.empty``.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (slot, dtype, torch.is_inference_mode_enabled())  # an inference tensor can't be written outside it
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def scratch_bytes() -> int:
    """Bytes held by this thread's CPU scratch buffers (see :func:`release_scratch`)."""
    return sum(b.numel() * b.element_size() for b in getattr(_SCRATCH, "buffers", {}).values())


def release_scratch() -> None:
    """Free this thread's CPU scratch buffers (``VCRegTrainer.train`` does at its end)."""
    _SCRATCH.buffers = {}


def _centred(samples: torch.Tensor, mu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``samples - mu`` as a contiguous ``(n, d)`` scratch matrix in ``dtype`` (one pass: subtract and cast).

    The result lives in scratch slot 0 (see :func:`_scratch`): use it before the next call, never keep it.
    """
    zc = _scratch(0, samples.shape, dtype, samples.device)
    torch.sub(samples, mu, out=zc)
    return zc.view(-1, samples.shape[-1])


def _host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value on the host costs no device sync (the CPU).

    Where it does not (GPU), validity stays a device tensor and is applied with masks instead of branches.
    """
    return t.device.type == "cpu"


def _bessel(n: int | torch.Tensor) -> int | torch.Tensor:
    """``max(n - 1, 1)`` for a host count or a 0-d tensor count."""
    return max(n - 1, 1) if isinstance(n, int) else (n - 1).clamp(min=1)


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


def gram_blocks(n: int, d: int, device: torch.device) -> int:
    """Column blocks of :func:`_gram` for ``n`` rows and ``d`` features (1: one full product)."""
    return min(4, d // 64) if (device.type == "cpu" and n >= 4 * d) else 1


def _gram(zc: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``Zc^T Zc`` of a ``(n, d)`` matrix, each off-diagonal block computed once.

    On the CPU, with ``n >= 4 d`` and ``d >= 128``, the columns are split into ``k = min(4, d // 64)`` blocks and
    block row ``i`` is ``Zc[:, i]^T Zc[:, i:]``: ``(k + 1) / (2 k)`` of the multiply-adds of one full product
    (the other triangle is a copy). Elsewhere (GPU: fewer launches matter more) one full product.
    """
    n, d = zc.shape
    k = gram_blocks(n, d, zc.device)
    if k < 2:
        return _mm(zc.T, zc, out_dtype)
    c = torch.empty((d, d), dtype=out_dtype, device=zc.device)
    edges = [round(i * d / k) for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = _mm(zc[:, lo:hi].T, zc[:, lo:], out_dtype)
        c[lo:hi, lo:] = block
        c[hi:, lo:hi] = block[:, hi - lo :].T
    return c


def _variance_terms(diag: torch.Tensor, spec: VCRegSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 / s where gamma > s else 0, V)`` from the variances ``C_jj``, with ``s = sqrt(C_jj + eps)``.

    ``dV/dC_jj`` is ``-1 / (2 d s_j)`` where ``gamma > s_j``: the caller multiplies the second output by
    ``-alpha / (2 d)``. ``eps > 0`` keeps ``s`` positive.
    """
    s = diag.add(spec.eps).sqrt_()
    hinge = torch.rsub(s, spec.gamma).relu_()
    return torch.div(hinge > 0, s), hinge.mean()


def _penalty_and_grad_matrix(
    c: torch.Tensor, spec: VCRegSpec, scale: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V``, ``K``, ``scale * dP/dC`` (``P = alpha V + beta K``) and the variances ``diag(C)`` (a copy).

    ``dP/dC`` is symmetric: its diagonal comes from V, the rest from K. It is written **into** ``c`` (returned as
    the third output): the covariance matrix is not needed afterwards, so no ``d x d`` copy is made; one dot product
    gives K (no ``delta``) and one in-place scaling ``dP/dC``. ``scale`` is a number or a 0-d tensor. Few small
    operations on purpose: inside a training step each one costs far more than its arithmetic (PERFORMANCE.md, row 9).
    """
    d = c.shape[0]
    diag = c.diagonal()
    inv_s, v = _variance_terms(diag, spec)
    variances = diag.clone()
    diag.zero_()  # c is now the off-diagonal part of C
    pairs = d * (d - 1)
    if d < 2:
        k = c.new_zeros(())
    elif spec.delta is None:
        flat = c.view(-1)
        k = torch.dot(flat, flat).div_(pairs)
    else:
        k = _huber(c, spec.delta).sum() / pairs
        c.clamp_(-spec.delta, spec.delta)
    c.mul_(2 * spec.beta / max(pairs, 1) * scale)
    torch.mul(inv_s, -spec.alpha / (2 * d) * scale, out=diag)
    return v, k, c, variances


class VCRegFunction(torch.autograd.Function):
    """Identity on a block output; its backward adds the gradient of the layer's penalty.

    ``apply(x, axis, rows, spec, group) -> (x, penalty, V, K, valid)``:

    * ``x``: a block output; ``axis``: its feature axis (every other axis indexes samples);
    * ``rows``: ``None`` or indices (into the flattened sample axes) of the rows used for the statistics;
    * ``group``: a ``torch.distributed`` process group for global statistics, or ``None``;
    * ``penalty = weight * (alpha V + beta K)``, a 0-d tensor without a graph through the statistics. Add it
      to the loss: the backward then scales the injected gradient by the gradient this value receives.
    * ``valid``: 0-d bool, ``False`` when the statistics were undefined (fewer than 2 rows) or not finite (or so
      large that the penalty overflows); the layer's penalty and gradient are then 0.

    With fewer rows than features (``n < d``, local statistics, no ``delta``: e.g. pooled features of a small
    batch) the ``d x d`` matrices are never formed: ``||C||_F = ||Zc Zc^T||_F / (n - 1)`` gives K and
    ``Zc G = c (A Zc) + Zc diag(w)`` with the ``n x n`` matrix ``A = Zc Zc^T / (n - 1)`` gives the gradient.

    The backward adds ``Zc G`` (``G``: the scaled ``dP/dC``) by one of four paths, chosen in :meth:`_backward`:
    :func:`_backward_dual` (``n < d``), :func:`_backward_feature_last` (tokens: one ``addmm``),
    :func:`_backward_channels_first` (CNN maps: one ``baddbmm``) and :func:`_backward_general` (the rest).

    Validity on the context, two plain fields: ``ctx.host_known`` is True where reading a value on the host costs
    no device sync (the CPU), and ``ctx.known_invalid`` is then whether the layer was invalid (its backward passes
    the incoming gradient through). Elsewhere (GPU) validity stays the device tensor ``ctx.valid``, applied with
    masks instead of branches.
    """

    @staticmethod
    def forward(ctx, x, axis, rows, spec, group):
        _check_input(x, axis)
        matmul_dtype = _matmul_dtype(x)  # read before autocast is switched off
        with _no_autocast(x.device):
            return VCRegFunction._forward(ctx, x, axis, rows, spec, group, matmul_dtype)

    @staticmethod
    def _forward(ctx, x, axis, rows, spec, group, matmul_dtype):
        sdt = _stat_dtype(x.dtype)
        n, mu, zc = _moments(samples_view(x, axis), rows, group, matmul_dtype)
        rows_used, d = zc.shape
        ctx.mu, ctx.axis, ctx.rows, ctx.matmul_dtype, ctx.g, ctx.dual = mu, axis, rows, matmul_dtype, None, None
        ctx.save_for_backward(x)
        if isinstance(n, int) and n < 2:  # undefined statistics, known on the host: no work at all
            ctx.host_known, ctx.known_invalid, ctx.valid = True, True, torch.tensor(False, device=x.device)
            penalty, v, k = (mu.new_zeros(()) for _ in range(3))
            ctx.mark_non_differentiable(v, k, ctx.valid)
            return x.view_as(x), penalty, v, k, ctx.valid
        # d(weight * P)/dC times dC/dZ's factor 2 / (n - 1); with global statistics the multiplier undoes DDP's mean
        scale = spec.weight * spec.grad_multiplier * 2 / _bessel(n)
        if isinstance(n, int) and spec.delta is None and rows_used < d and matmul_dtype is None:
            v, k, variances = VCRegFunction._dual(ctx, zc, n, spec, scale, sdt)
        else:
            cov = _gram(zc, sdt)
            del zc  # the only copy of the activation is gone before the penalty is computed
            if group is not None:
                dist.all_reduce(cov, group=group)
            cov.div_(_bessel(n))
            v, k, ctx.g, variances = _penalty_and_grad_matrix(cov, spec, scale)
        # Any non-finite C_ij makes K non-finite (a non-finite column spoils all its covariances); d = 1: check C_11.
        check = k if d > 1 else variances.sum()
        penalty = torch.add(v * (spec.weight * spec.alpha), k, alpha=spec.weight * spec.beta)
        ctx.host_known = _host_readable(check)
        if ctx.host_known:  # an invalid layer skips the backward work
            ok = math.isfinite(float(check)) and (isinstance(n, int) or bool(n >= 2))
            ctx.known_invalid, valid = not ok, torch.tensor(ok, device=check.device)
            if not ok:
                penalty.zero_()
                ctx.g = ctx.dual = None
        else:
            ctx.known_invalid = False
            valid = torch.isfinite(check) if isinstance(n, int) else torch.isfinite(check) & (n >= 2)
            penalty = torch.where(valid, penalty, 0.0)
        ctx.variances, ctx.valid = variances, valid
        ctx.mark_non_differentiable(v, k, valid)
        return x.view_as(x), penalty, v, k, valid

    @staticmethod
    def _dual(ctx, zc, n, spec, scale, sdt):
        """V, K and the backward's factors from the ``n x n`` Gram ``Zc Zc^T`` (``n < d``; see the class doc)."""
        d = zc.shape[1]
        a = _mm(zc, zc.T, sdt).div_(n - 1)  # A = Zc Zc^T / (n - 1): same nonzero spectrum as C
        c_diag = torch.mul(zc, zc, out=_scratch(1, zc.shape, zc.dtype, zc.device)).sum(dim=0).div_(n - 1)
        inv_s, v = _variance_terms(c_diag, spec)
        pairs = d * (d - 1)
        flat = a.view(-1)
        # ||C||_F^2 - sum_j C_jj^2: with n < d, C has rank < d and its off-diagonal part dominates (no cancellation)
        k = (torch.dot(flat, flat) - torch.dot(c_diag, c_diag)).clamp_(min=0).div_(pairs)
        off = 2 * spec.beta / pairs
        # Zc G = off * (Zc C) + Zc diag(dP/dC_jj - off * C_jj), and Zc C = A Zc
        w = inv_s.mul_(-spec.alpha / (2 * d)).sub_(c_diag, alpha=off).mul_(scale)
        ctx.dual = (a.mul_(off * scale), w)
        return v, k, c_diag

    @staticmethod
    def backward(ctx, grad_x, grad_penalty, *unused):
        with _no_autocast(ctx.valid.device):
            return VCRegFunction._backward(ctx, grad_x, grad_penalty), None, None, None, None

    @staticmethod
    def _backward(ctx, grad_x, grad_penalty):
        """``grad_x`` plus the penalty's gradient, by the first path whose condition holds."""
        (x,) = ctx.saved_tensors
        if grad_penalty is None or ctx.known_invalid:
            return grad_x
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        # The loss's scale: a host number where that costs no sync and no cast, else a tensor (see _scaled)
        gp = float(grad_penalty) if ctx.host_known and x.dtype == ctx.mu.dtype else grad_penalty
        if ctx.dual is not None:
            return _backward_dual(ctx, x, grad_x, gp)
        plain = ctx.rows is None and ctx.matmul_dtype is None and x.dtype == ctx.g.dtype  # all rows, one dtype
        if plain and _feature_last(x, grad_x, ctx.axis):
            return _backward_feature_last(ctx, x, grad_x, gp)
        if plain and _map_size(x, ctx.axis) >= _MIN_MAP_SIZE and _contiguous(x, grad_x) and _uncentred_ok(ctx):
            return _backward_channels_first(ctx, x, grad_x, gp)
        return _backward_general(ctx, x, grad_x, gp)


# ------------------------------------------------------------------------------------------ backward paths
def _feature_last(x: torch.Tensor, grad_x: torch.Tensor, axis: int) -> bool:
    """Whether ``x`` and its gradient are contiguous with the feature axis last (transformer tokens)."""
    return samples_view(x, axis).is_contiguous() and samples_view(grad_x, axis).is_contiguous()


def _map_size(x: torch.Tensor, axis: int) -> int:
    """``H W`` (every axis after the channels) of a channels-first map ``(B, C, ...)``, else 0."""
    return math.prod(x.shape[2:]) if axis == 1 and x.dim() > 2 else 0


def _contiguous(x: torch.Tensor, grad_x: torch.Tensor) -> bool:
    return x.is_contiguous() and grad_x.is_contiguous()


def _uncentred_ok(ctx) -> bool:
    """Whether the backward may use ``Z G - 1 (mu^T G)`` instead of a centred copy (CPU only: needs the host).

    Its rounding error, relative to the result, grows like ``|mu| / sigma`` (PERFORMANCE.md, row 2b), so
    every feature's ``|mu_j| / sigma_j`` (no eps) must be at most ``_MAX_MEAN_OVER_STD``; a constant feature
    (``mu / 0``: inf or NaN) takes the exact centred path, where its gradient is exactly 0.
    """
    return ctx.host_known and (
        float(torch.linalg.vector_norm(ctx.mu / ctx.variances.sqrt(), float("inf"))) <= _MAX_MEAN_OVER_STD
    )


def _scaled(factors: tuple[torch.Tensor, ...], gp: float | torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float]:
    """``(factors, gp)`` with a tensor loss scale ``gp`` multiplied into the small factors (then ``gp = 1``).

    A host number is folded into the matmul's ``alpha`` instead. A tensor scale (GPU: no sync; or a cast is
    needed) multiplies the ``d x d`` (``n x n``) factors before the matmul, so a half-precision result is never
    formed unscaled (fp16 loss scaling).
    """
    if isinstance(gp, torch.Tensor):
        return tuple(f * gp.to(f.dtype) for f in factors), 1.0
    return factors, gp


def _backward_dual(ctx, x, grad_x, gp):
    """``n < d``: ``Zc G = (A Zc) + Zc diag(w)`` from the saved ``n x n`` factors (see :meth:`VCRegFunction._dual`)."""
    (a, w), gp = _scaled(ctx.dual, gp)
    samples = samples_view(x, ctx.axis)
    zc = _centred_rows(ctx, samples, a.dtype)
    extra = torch.mul(zc, w, out=_scratch(1, zc.shape, zc.dtype, zc.device)).addmm_(a, zc).to(x.dtype)
    del zc
    return _add_rows(ctx, grad_x, extra, gp, samples)


def _backward_feature_last(ctx, x, grad_x, gp):
    """Feature-last float32/float64 (tokens): one matmul that also adds the incoming gradient.

    ``Zc G = Z G - 1 (mu^T G)``: no centred copy, one pass for the mean's row, when the mean is moderate
    (:func:`_uncentred_ok`).
    """
    (g,), gp = _scaled((ctx.g,), gp)
    samples, grad_samples = samples_view(x, ctx.axis), samples_view(grad_x, ctx.axis)
    d = samples.shape[-1]
    uncentred = _uncentred_ok(ctx)
    z = samples.reshape(-1, d) if uncentred else _centred(samples, ctx.mu, g.dtype)
    grad_in = torch.addmm(grad_samples.reshape(-1, d), z, g, alpha=gp)
    if uncentred:
        grad_in.sub_(torch.mv(g, ctx.mu), alpha=gp)
    if not ctx.host_known:  # GPU: mask without a sync (a non-finite Z would turn G = 0 into NaN)
        grad_in = torch.where(ctx.valid, grad_in, grad_samples.reshape(-1, d))
    return grad_in.view(samples.shape).movedim(-1, ctx.axis)


def _backward_channels_first(ctx, x, grad_x, gp):
    """Channels-first maps (CNN stages, NCHW, ``H W >= 16``): ``G X_b - (G mu) 1^T`` for every sample ``b``.

    One batched matmul reads ``x`` in place and adds the incoming gradient (``G`` is symmetric), then one pass
    for the mean: no transposed centred copy. Smaller maps make the batched matmul slow (general path).
    """
    (g,), gp = _scaled((ctx.g,), gp)
    b, d, spatial = x.shape[0], x.shape[1], _map_size(x, ctx.axis)
    grad_in = torch.baddbmm(grad_x.view(b, d, spatial), g.expand(b, d, d), x.view(b, d, spatial), alpha=gp)
    grad_in.sub_(torch.mv(g, ctx.mu).view(d, 1), alpha=gp)
    return grad_in.view(x.shape)


def _backward_general(ctx, x, grad_x, gp):
    """Any layout, row subsets, half-precision matmuls: ``Zc G`` from a centred copy of the rows used."""
    (g,), gp = _scaled((ctx.g,), gp)
    samples = samples_view(x, ctx.axis)
    mm_dtype = ctx.matmul_dtype or g.dtype
    zc = _centred_rows(ctx, samples, mm_dtype)
    if mm_dtype == x.dtype == g.dtype:
        extra = torch.mm(zc, g, out=_scratch(1, zc.shape, x.dtype, zc.device))
    else:
        extra = _mm(zc, g.to(mm_dtype), x.dtype)
    del zc
    return _add_rows(ctx, grad_x, extra, gp, samples)


def _centred_rows(ctx, samples: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _centred(_used_rows(samples, ctx.rows), ctx.mu, dtype)


def _add_rows(ctx, grad_x: torch.Tensor, extra: torch.Tensor, gp: float, samples: torch.Tensor) -> torch.Tensor:
    """``grad_x + gp * extra``, ``extra`` being the ``(rows used, d)`` gradient of the statistics' rows."""
    if not ctx.host_known:  # GPU: mask without a sync (a non-finite Zc would turn G = 0 into NaN)
        extra = torch.where(ctx.valid, extra, 0.0)
    if ctx.rows is None:
        return torch.add(grad_x, extra.view(samples.shape).movedim(-1, ctx.axis), alpha=gp)
    grad_in = grad_x.clone()
    if gp != 1.0:
        extra.mul_(gp)
    samples_view(grad_in, ctx.axis).index_put_(_row_index(samples, ctx.rows), extra, accumulate=True)
    return grad_in


def explicit_penalty(x, axis, rows, spec, group):
    _check_input(x, axis)
    with _no_autocast(x.device):
        return _explicit_penalty(x, axis, rows, spec, group)


def _explicit_penalty(x, axis, rows, spec, group):
    """The same outputs as :class:`VCRegFunction`, with autograd through the statistics (``"loss"`` mode).

    With a process group the moments are all-reduced with ``torch.distributed.nn`` so that autograd sums
    the gradient over ranks; DDP's averaging then gives the gradient of the global penalty (no multiplier).
    """
    samples = _used_rows(samples_view(x, axis), rows)
    d = samples.shape[-1]
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


def _keep(t):
    """Identity pack / unpack hook: a saved tensor is kept as it is."""
    return t


def apply_penalty(x, axis, rows, spec, group=None, implementation: str = "gradient"):
    """Dispatch to :class:`VCRegFunction` (``"gradient"``) or :func:`explicit_penalty` (``"loss"``).

    The explicit penalty is a graph beside the model's, so its saved tensors stay out of an enclosing activation
    checkpoint (identity saved-tensor hooks): checkpointed, its backward, which runs before the gradient reaches
    the block's output, would start the recomputation before FSDP has gathered the block's parameters.
    """
    if implementation == "gradient":
        return VCRegFunction.apply(x, axis, rows, spec, group)
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        return explicit_penalty(x, axis, rows, spec, group)

