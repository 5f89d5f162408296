"""Calibration across the ranks of a torch.distributed process group.

Each rank passes its own shard of the data (a DistributedSampler, say). The statistics are sums,
minima and maxima, so after the local pass they are all-reduced once, field by field:

    on, low, high, n, batches, egp_sum   SUM       zmin  MIN       zmax  MAX

and every rank ends with the statistics of the union of the shards, the same numbers a single
process computes on all the data (the per-batch EGP entropy is averaged over every batch of every
rank). Shards may be uneven and may be empty: the reductions run once per activation call after
the loop, whatever the number of batches, and a rank without data takes the example batch it
needs for the capture from the first rank that has one (it contributes zero counts).

Collectives run with the process group's timeout; egp_fx uses COLLECTIVE_TIMEOUT (documented
in the README) when it sets up a group itself. A rank that fails then makes the others fail with
an error naming the rank instead of waiting forever.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator

import torch

from .data import Batch
from .errors import DistributedError

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def _dist():
    import torch.distributed as dist  # noqa: PLC0415

    return dist


def enabled(flag: bool | None) -> bool:
    """Reduce over ranks? `flag` None: when a default process group is initialised."""
    dist = _dist()
    ready = dist.is_available() and dist.is_initialized()
    if flag and not ready:
        raise DistributedError("distributed=True but no torch.distributed process group is "
                               "initialised (torchrun sets one up; call "
                               "torch.distributed.init_process_group first)")
    return ready if flag is None else bool(flag)


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def _device() -> torch.device:
    """The device collectives of the default group run on (NCCL: the current GPU)."""
    dist = _dist()
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_backend(t: torch.Tensor) -> None:
    dist = _dist()
    backend = dist.get_backend()
    if backend == "nccl" and t.device.type != "cuda":
        raise DistributedError(f"the process group uses NCCL, which needs CUDA tensors, but the "
                               f"statistics are on {t.device}: calibrate on the GPU "
                               "(device='cuda') or use the gloo backend")


def first_batch(batches: Iterator[Batch]) -> tuple[Batch | None, bool]:
    """(this rank's first batch, True); a rank without data gets (the first batch of the lowest
    rank that has one, False): it is needed for the capture and is not counted."""
    dist = _dist()
    mine = next(batches, None)
    have = [None] * dist.get_world_size()
    _collective("all_gather_object", lambda: dist.all_gather_object(have, mine is not None))
    if all(have):
        return mine, True
    donors = [r for r, h in enumerate(have) if h]
    if not donors:
        raise DistributedError("no rank has calibration data")
    box = [mine.to("cpu") if rank() == donors[0] else None]
    _collective("broadcast_object_list", lambda: dist.broadcast_object_list(box, src=donors[0]))
    return (mine, True) if mine is not None else (box[0], False)


def _collective(what: str, call) -> None:
    try:
        call()
    except Exception as err:  # a peer that died, or a timeout: say which rank saw it
        raise DistributedError(f"rank {rank()}: {what} failed ({type(err).__name__}: {err}); "
                               "another rank probably failed first: see its error") from err


def reduce(accumulators: dict) -> None:
    """All-reduce every StatsAccumulator in place (same order on every rank)."""
    dist = _dist()
    device = _device()
    for name, acc in accumulators.items():
        local_c = torch.tensor([acc.on.numel() if acc.on is not None else 0], device=device)
        _collective(f"all_reduce of {name}", lambda: dist.all_reduce(local_c, dist.ReduceOp.MAX))
        c = int(local_c.item())
        if acc.on is not None:
            _check_backend(acc.on.to(device))
        counts = torch.zeros(3 * c + 2, dtype=torch.int64, device=device)
        floats = torch.zeros(1, dtype=torch.float64, device=device)
        lo = torch.full((c,), float("inf"), dtype=torch.float64, device=device)
        hi = torch.full((c,), float("-inf"), dtype=torch.float64, device=device)
        if acc.on is not None:
            counts[:3 * c] = torch.cat([acc.on, acc.low, acc.high]).to(device, torch.int64)
            lo, hi = acc.zmin.to(device, torch.float64), acc.zmax.to(device, torch.float64)
            floats[0] = acc.egp_sum.to(device, torch.float64) if torch.is_tensor(acc.egp_sum) \
                else float(acc.egp_sum)
        counts[3 * c] = acc.n
        counts[3 * c + 1] = acc.batches
        for t, op in ((counts, dist.ReduceOp.SUM), (floats, dist.ReduceOp.SUM),
                      (lo, dist.ReduceOp.MIN), (hi, dist.ReduceOp.MAX)):
            _collective(f"all_reduce of {name}", lambda t=t, op=op: dist.all_reduce(t, op))
        acc.load(counts[:c], counts[c:2 * c], counts[2 * c:3 * c], lo, hi, floats[0],
                 int(counts[3 * c]), int(counts[3 * c + 1]))
