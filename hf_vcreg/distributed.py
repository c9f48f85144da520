"""Distributed runs: the process group of the global statistics, the equal-batch-count check, true logs.

Beside the statistics (:mod:`hf_vcreg.penalty` all-reduces their moments over the group chosen here), the
trainer needs two more things when several processes train (DDP, FSDP2, DeepSpeed; ``torchrun`` or
``accelerate launch``):

* every rank must run the same number of forward passes, or a rank waits forever in a collective
  (:func:`check_equal_batch_counts`);
* every logged value must describe all ranks (:func:`weighted_means`). The ``Trainer`` logs ``loss`` as the mean
  over ranks of each rank's ``sum_m loss_m / g_m`` (``g_m``: the micro-batches of that optimizer step), divided by
  the steps since the last log; in evaluation, ``eval_loss`` is the mean of every batch's loss repeated
  ``eval_batch_size`` times, gathered with ``gather_for_metrics`` (which drops the copies of the samples
  accelerate added to complete the last batch). The trainer weights every forward's ``task_loss`` and ``vcreg/*``
  the same way (``1 / g_m``; in evaluation, the number of copies ``gather_for_metrics`` keeps,
  :func:`kept_copies`), so that ``loss == task_loss + vcreg/penalty`` holds in every logged line, on any number of
  processes, and a 2-process log equals the 1-process log of the concatenated batch (global statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["check_equal_batch_counts", "kept_copies", "metrics_group", "resolve_group", "weighted_means"]


def resolve_group(distributed_stats: bool):
    """The process group of the global statistics: ``WORLD`` with ``vcreg_distributed_stats``, else ``None``."""
    if not distributed_stats:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "vcreg_distributed_stats=True needs a torch.distributed process group, and none is initialised. "
            "Launch with torchrun / accelerate launch, or set vcreg_distributed_stats=False."
        )
    return dist.group.WORLD


def metrics_group():
    """``WORLD`` when more than one process runs (logged values are then averaged over it), else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def check_equal_batch_counts(loader, split: str, device: torch.device) -> None:
    """Raise, on every rank, when ranks would run different numbers of forward passes.

    Every forward of a regularised model runs collectives (the global statistics, the gradient reduction, the
    evaluation gather): a rank with an extra batch would wait for the others forever. accelerate's
    ``even_batches=False`` without ``dataloader_drop_last`` produces exactly that when the number of batches
    is not a multiple of the world size. One all-reduce of 2 numbers.
    """
    group = metrics_group()
    if group is None:
        return
    try:
        n = len(loader)
    except TypeError:  # an iterable dataset without a length: nothing to compare
        n = -1
    counts = torch.tensor([n, -n], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    most, fewest = int(counts[0]), -int(counts[1])
    if fewest >= 0 and most != fewest:
        raise ValueError(
            f"The {split} dataloader gives the {dist.get_world_size(group)} ranks different numbers of batches "
            f"({fewest} to {most}; this rank: {n}): the rank with more batches would wait forever in the "
            "collectives of its extra forward pass. Keep accelerator_config={'even_batches': True} (the default: "
            "the last batch is completed with samples from the start) or set dataloader_drop_last=True."
        )


def kept_copies(gather: Callable[[torch.Tensor], torch.Tensor], copies: int, device: torch.device) -> torch.Tensor:
    """How many of this rank's ``copies`` rows ``gather`` (accelerate's ``gather_for_metrics``) keeps: a 0-d tensor.

    The Trainer weights each evaluation batch's loss by exactly that number (``copies`` = ``eval_batch_size``):
    all of them, except in the last batch, where the rows of the samples that completed it are dropped. Found by
    gathering this rank's index ``copies`` times, so it is exact whatever the engine and the sampler.
    """
    rank = dist.get_rank() if metrics_group() is not None else 0
    mine = torch.full((copies,), rank, dtype=torch.int64, device=device)
    return (gather(mine) == rank).sum()


def weighted_means(
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]], keys: Sequence[str], device: torch.device, group=None
) -> dict[str, float]:
    """``{key: sum_r S_r / sum_r W_r}`` over the ranks of ``group`` (``None``: this process only).

    ``sums[key] = (S, W)``: this rank's weighted sum ``sum_f w_f x_f`` and total weight ``sum_f w_f``. ``keys`` is
    the same list, in the same order, on every rank (a key this rank did not record counts as ``(0, 0)``); a key
    with a total weight of 0 is left out. ``device``: where the all-reduce runs (the process group's device).
    One all-reduce of ``2 len(keys)`` float64 numbers, one host sync.
    """
    device = device if group is not None else torch.device("cpu")  # no collective: sum on the host (MPS: no float64)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = torch.stack([t.to(device, torch.float64) for k in keys for t in sums.get(k, (zero, zero))])
    if group is not None:
        dist.all_reduce(packed, group=group)
    totals = packed.view(-1, 2).tolist()
    return {k: s / w for k, (s, w) in zip(keys, totals) if w > 0}
