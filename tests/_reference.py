"""The reference every fast path is checked against: autograd through the explicit loss, in float64."""

import torch

from hf_vcreg import vcreg_loss


def sample_matrix(x: torch.Tensor, axis: int, rows: torch.Tensor | None) -> torch.Tensor:
    """The ``(n, d)`` rows the statistics use: ``x`` with ``axis`` last, flattened, optionally a row subset."""
    z = x.movedim(axis, -1).reshape(-1, x.shape[axis])
    return z if rows is None else z[rows]


def reference_gradient(x, axis, rows, spec, w, c=3.0):
    """d/dx of ``(x * w).sum() + c * weight * (alpha V + beta K)``, all in float64 with autograd.

    Returns ``(grad, total, V, K)`` with ``total = alpha V + beta K``; the last three are None when fewer than 2
    rows leave the statistics undefined (then only the ``w`` term has a gradient).
    """
    x64 = x.detach().double().requires_grad_()
    z = sample_matrix(x64, axis, rows)
    if z.shape[0] < 2:
        (x64 * w.double()).sum().backward()
        return x64.grad, None, None, None
    total, v, k = vcreg_loss(z, spec.alpha, spec.beta, spec.gamma, spec.eps, spec.delta)
    ((x64 * w.double()).sum() + c * spec.weight * total).backward()
    return x64.grad, total.detach(), v.detach(), k.detach()
