"""Calibration statistics reduced over the ranks of the default process group.

Each rank runs calibrate() on its own shard. The statistics of a StatsAccumulator are sums,
minima and maxima, so after the local pass they are reduced once, for all activation calls at
once:

    on, low, high (int64)   n, batches (Python ints)   egp_sum (float64)     SUM
    zmin                                                                     MIN
    zmax                                                                     MAX

Every rank then holds the statistics a single process computes on the union of the shards: the
same integer counts and the same min/max, exactly, and the EGP entropy egp_sum / batches, the mean
of the per-batch EGP entropy over every batch of every rank (equal up to the order of the float
additions). Shards may be uneven (each rank reduces once, after its own last batch, so none waits
for a batch that never comes) and empty: a rank without data contributes zero counts, +inf/-inf
to min/max, and still takes part in every reduction. It captures the model with the first batch
of the lowest rank that has one (first_batch), which it does not count. The same exchange
compares a fingerprint of the model (per tensor, its sum and the sum of its magnitudes): ranks
that calibrate different weights (a model initialised at random on each rank) stop with an
error instead of reducing statistics of no model at all.

Four collectives in all: one exchange of the names and channel counts (which also checks that
every rank captured the same activation calls), a SUM of the integers, a SUM of the float64
entropy sums and a MAX of [zmax, -zmin] (negation is exact, so MIN comes out of the MAX).
"""
from __future__ import annotations

import torch
from torch import nn

from egp_fx.distributed.comm import all_reduce, exchange
from egp_fx.distributed.group import backend_device, rank
from egp_fx.errors import DistributedError
from egp_fx.ir.batches import Batch

from .stats import StatsAccumulator

_SAME = 1e-6      # relative difference of the weight sums beyond which two models differ


def fingerprint(model: nn.Module) -> list[tuple[str, float, float]]:
    """(name, sum, sum of |x|) of every parameter and buffer, in float64."""
    named = [*model.named_parameters(), *model.named_buffers()]
    if not named:
        return []
    with torch.no_grad():
        sums = torch.stack([torch.stack([t.sum(dtype=torch.float64),
                                         t.abs().sum(dtype=torch.float64)]).cpu()
                            for _, t in named]).tolist()
    return [(name, s, a) for (name, _), (s, a) in zip(named, sums)]


def _check_same_model(prints: list[list[tuple[str, float, float]]]) -> None:
    """Every rank must calibrate the same weights: a model drawn at random on each rank would
    give statistics of no model at all."""
    for r, theirs in enumerate(prints[1:], start=1):
        bad = [a[0] for a, b in zip(prints[0], theirs)
               if a[0] != b[0] or abs(a[1] - b[1]) > _SAME * max(a[2], b[2], 1e-30)]
        if bad or len(theirs) != len(prints[0]):
            raise DistributedError(
                f"rank {r} calibrates other weights than rank 0 ({(bad or ['the tensor list'])[0]} "
                "differs): every rank must calibrate the same model (load the same checkpoint, "
                "or seed its initialisation)")


def first_batch(mine: Batch | None, device: torch.device, model: nn.Module
                ) -> tuple[Batch, bool]:
    """(this rank's first batch, True), or for a rank without data (the first batch of the
    lowest rank that has one, on `device`, False): the capture needs an example, the
    statistics must not count it. Checks on the way that every rank has the same model."""
    got = exchange((mine is not None, fingerprint(model)), "calibration: who has data")
    _check_same_model([p for _, p in got])
    have = [h for h, _ in got]
    if all(have):
        return mine, True
    if not any(have):
        raise DistributedError("no rank has calibration data: every rank's loader is empty")
    donor = have.index(True)
    shared = exchange(mine.to("cpu") if rank() == donor else None,
                      f"calibration: the first batch of rank {donor}")[donor]
    return (mine, True) if mine is not None else (shared.to(device), False)


def reduce(accumulators: dict[str, StatsAccumulator], data_device: torch.device) -> None:
    """All-reduce every accumulator in place; afterwards each holds the union's statistics."""
    device = backend_device(data_device)
    names = list(accumulators)
    local = [(name, acc.on.numel() if acc.on is not None else -1, acc.n, acc.batches)
             for name, acc in accumulators.items()]
    every = exchange(local, "calibration: activation calls")
    for r, theirs in enumerate(every):
        if [t[0] for t in theirs] != names:
            raise DistributedError(f"rank {rank()}: rank {r} captured other activation calls "
                                   f"({[t[0] for t in theirs][:5]}... against {names[:5]}...): "
                                   "every rank must calibrate the same model")
    widths = [max(theirs[i][1] for theirs in every) for i in range(len(names))]
    totals = [(sum(theirs[i][2] for theirs in every), sum(theirs[i][3] for theirs in every))
              for i in range(len(names))]
    c_all = sum(widths)
    counts = torch.zeros(3 * c_all, dtype=torch.int64, device=device)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    bounds = torch.full((2 * c_all,), float("-inf"), dtype=torch.float64, device=device)
    offset = 0
    for i, (acc, c) in enumerate(zip(accumulators.values(), widths)):
        if acc.on is not None:
            for k, t in enumerate((acc.on, acc.low, acc.high)):
                counts[3 * offset + k * c:3 * offset + (k + 1) * c] = t.to(device, torch.int64)
            bounds[offset:offset + c] = acc.zmax.to(device, torch.float64)
            bounds[c_all + offset:c_all + offset + c] = -acc.zmin.to(device, torch.float64)
            sums[i] = acc.egp_sum.to(device, torch.float64) if torch.is_tensor(acc.egp_sum) \
                else float(acc.egp_sum)
        offset += c
    all_reduce(counts, "sum", "calibration: counts")
    all_reduce(sums, "sum", "calibration: EGP entropy sums")
    all_reduce(bounds, "max", "calibration: min and max")
    offset = 0
    for i, (acc, c) in enumerate(zip(accumulators.values(), widths)):
        block = counts[3 * offset:3 * (offset + c)].to(data_device)
        zmax = bounds[offset:offset + c].to(data_device)
        zmin = (-bounds[c_all + offset:c_all + offset + c]).to(data_device)
        dtype = acc.zmin.dtype if acc.zmin is not None else torch.float32
        acc.load(block[:c], block[c:2 * c], block[2 * c:], zmin.to(dtype), zmax.to(dtype),
                 sums[i].to(data_device), totals[i][0], totals[i][1])
        offset += c
