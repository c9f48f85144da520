"""Distributed runs: the process group of the global statistics, the equal-batch-count check, true logs.

Beside the statistics (:mod:`hf_vcreg.penalty` all-reduces their moments over the group chosen here), the
trainer needs two more things when several processes train (DDP, FSDP2, DeepSpeed; ``torchrun`` or
``accelerate launch``):

* every rank must run the same number of forward passes, or a rank waits forever in a collective
  (:func:`check_equal_batch_counts`, on every dataloader by :class:`EqualBatchCountsMixin`);
* every logged value must describe all ranks (:func:`buffered_means`, :func:`weighted_means`). The ``Trainer``
  logs ``loss`` as the mean over ranks of each rank's ``sum_m loss_m / g_m`` (``g_m``: the micro-batches of that optimizer step), divided by
  the steps since the last log; in evaluation, ``eval_loss`` is the mean of every batch's loss repeated
  ``eval_batch_size`` times, gathered with ``gather_for_metrics`` (which drops the copies of the samples
  accelerate added to complete the last batch). The trainer weights every forward's ``task_loss`` and ``vcreg/*``
  the same way (``1 / g_m``; in evaluation, the number of copies ``gather_for_metrics`` keeps,
  :func:`kept_copies`), so that ``loss == task_loss + vcreg/penalty`` holds in every logged line, on any number of
  processes, and a 2-process log equals the 1-process log of the concatenated batch (global statistics).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "EqualBatchCountsMixin",
    "buffered_means",
    "check_equal_batch_counts",
    "kept_copies",
    "metric_keys",
    "metrics_group",
    "resolve_group",
    "weighted_means",
]


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


class EqualBatchCountsMixin:
    """``Trainer`` mixin: :func:`check_equal_batch_counts` on every train and eval dataloader it builds."""

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        check_equal_batch_counts(loader, "train", self.accelerator.device)
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        loader = super().get_eval_dataloader(eval_dataset)
        check_equal_batch_counts(loader, "eval", self.accelerator.device)
        return loader


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


def _forward_means(forwards, weights: torch.Tensor) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{key: [(values, weights)]}``: per-forward values of every ``vcreg/*`` key with the forwards' weights.

    ``forwards``: ``(layer names, penalty, V and K per layer, valid per layer)`` per forward. They are grouped by
    the layers that ran (the same every step, unless a model skips blocks), and each group is reduced with a few
    batched operations. Per forward: ``vcreg/variance`` / ``vcreg/covariance`` are the means over the layers whose
    statistics were valid, ``vcreg/skipped_layers`` counts the others; the per-layer keys
    (``vcreg/variance/<layer>``, ``_valid/<layer>``) cover the forwards where that layer ran.
    """
    values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, (names, *_) in enumerate(forwards):
        groups[names].append(i)
    for names, index in groups.items():
        group = [forwards[i] for i in index]
        layers = len(names)
        device = group[0][2].device
        w = weights[index].to(device) if len(index) < len(forwards) else weights.to(device)
        penalty = torch.stack([g[1].float().to(device) for g in group])
        vk = torch.stack([g[2].float().to(device) for g in group])  # (forwards, 2 * layers)
        ok = torch.stack([g[3].to(device) for g in group])  # (forwards, layers) bool
        valid = ok.float()
        n_valid = valid.sum(dim=1)
        terms = vk.nan_to_num().view(len(group), 2, layers) * valid.unsqueeze(1)
        means = terms.sum(dim=2) / n_valid.clamp(min=1).unsqueeze(1)
        values["vcreg/penalty"].append((penalty, w))
        values["vcreg/variance"].append((means[:, 0], w))
        values["vcreg/covariance"].append((means[:, 1], w))
        values["vcreg/skipped_layers"].append((layers - n_valid, w))
        for i, name in enumerate(names):
            values[f"_valid/{name}"].append((valid[:, i], w))
            values[f"vcreg/variance/{name}"].append((terms[:, 0, i], w))
            values[f"vcreg/covariance/{name}"].append((terms[:, 1, i], w))
    return values


def metric_keys(layers: Sequence[str] | None, per_layer: bool) -> list[str]:
    """Every key :func:`buffered_means` may return (``_valid/*``: internal), in one order on every rank.

    ``layers``: the hooked layers, ``None`` without VCReg (then only ``task_loss``); ``per_layer``: with the
    per-layer ``vcreg/variance/<layer>`` and ``vcreg/covariance/<layer>``.
    """
    keys = ["task_loss"]
    if layers is not None:
        keys += ["vcreg/penalty", "vcreg/variance", "vcreg/covariance", "vcreg/skipped_layers"]
        for name in layers:
            keys.append(f"_valid/{name}")
            if per_layer:
                keys += [f"vcreg/variance/{name}", f"vcreg/covariance/{name}"]
    return keys


def buffered_means(
    buffered: dict[str, list], layers: Sequence[str] | None, per_layer: bool, device: torch.device
) -> dict[str, float]:
    """Weighted means over all processes of the values a trainer buffered, for the keys of :func:`metric_keys`.

    ``buffered``: ``task_loss`` (a 0-d tensor per forward), ``_weight`` (per forward: a float, or a 0-d tensor)
    and ``_forwards`` (see :func:`_forward_means`). All forwards are reduced at once, with a few batched tensor
    operations, then :func:`weighted_means` over :func:`metrics_group` (collective with several processes).
    """
    keys = metric_keys(layers, per_layer)
    local = buffered["task_loss"][0].device
    weight_list = buffered["_weight"]
    if isinstance(weight_list[0], torch.Tensor):
        weights = torch.stack([w.to(local) for w in weight_list]).double()
    else:
        weights = torch.tensor(weight_list, dtype=torch.float64, device=local)
    task = torch.stack([t.float().to(local) for t in buffered["task_loss"]])
    values = {"task_loss": [(task, weights)], **_forward_means(buffered["_forwards"], weights)}
    sums = {}
    for key, parts in ((k, values[k]) for k in keys if k in values):
        x = torch.cat([v.double().to(local) for v, _ in parts])
        w = torch.cat([w.to(local) for _, w in parts])
        sums[key] = (torch.dot(x, w), w.sum())
    return weighted_means(sums, keys, device, metrics_group())
