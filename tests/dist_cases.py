"""What the ranks of the multi-process tests run (spawn_ranks.run_ranks), and the shared inputs.

The nets, batches and records come from egp_fx.testing.ranks; every builder is deterministic, so
the parent process builds the same models and batches for the single-process references. Shards
are lists of batches; "the union" is rank 0's batches followed by rank 1's, which is what a
single process is given.
"""
from __future__ import annotations

import datetime
import os
import time

import torch

import egp_fx
from egp_fx.distributed import exchange
from egp_fx.testing.planted import planted_net
from egp_fx.testing.ranks import batches, graph_of, kinds_net, stats_of

UNEVEN = ([5, 3, 4], [6])          # batch sizes of rank 0, rank 1
EMPTY = ([5, 3, 4, 6], [])
HOLDOUT = ([4], [])


def shards(layout: tuple[list[int], list[int]]) -> list[list[torch.Tensor]]:
    """Each rank's batches; together, batches(union sizes) in rank order."""
    out, start = [], 0
    for sizes in layout:
        out.append(batches(sizes, offset=start))
        start += len(sizes)
    return out


def union(layout) -> list[torch.Tensor]:
    return [b for shard in shards(layout) for b in shard]


# ----------------------------------------------------------------------------- rank functions

def calibration_cases(rank: int, world: int) -> dict:
    """Calibration with uneven and empty shards, opting out, and compress on uneven shards."""
    model = kinds_net()
    out = {"uneven": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False)),
           "empty": stats_of(egp_fx.calibrate(model, shards(EMPTY)[rank], progress=False)),
           "local": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False,
                                              distributed=False))}
    net = planted_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = egp_fx.compress(net, shards(UNEVEN)[rank], progress=False,
                            holdout_loader=shards(HOLDOUT)[rank], verify_samples=6)
    out["compress"] = graph_of(small)
    out["untouched"] = all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    exchange(None, "test: done")
    return out


HANG_SECONDS, HANG_TIMEOUT = 8.0, 2.0


def _attempt(fn) -> dict:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001  (the test judges the error)
        return {"error": type(err).__name__, "message": str(err), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _nan_in_second_batch(rank: int):
    data = batches([4, 4], offset=10 * rank)
    if rank == 1:
        data[1][0, 0, 0, 0] = float("nan")
    return data


def _slow(rank: int, seconds: float):
    yield from batches([4], offset=20 + rank)
    if rank == 1:
        time.sleep(seconds)
    yield from batches([4], offset=30 + rank)


def _dies(rank: int):
    yield from batches([4], offset=40 + rank)
    if rank == 1:
        os._exit(3)
    yield from batches([4], offset=50 + rank)


def calibration_then_faults(rank: int, world: int, store_folder: str) -> dict:
    """calibration_cases, then a rank that raises, then (same group) one that hangs, then (new
    group) one that dies. Rank 1 saves what it has before it dies, as partial1.pt."""
    import torch.distributed as dist  # noqa: PLC0415

    model = kinds_net()
    out = calibration_cases(rank, world)
    out["raises"] = _attempt(lambda: egp_fx.calibrate(model, _nan_in_second_batch(rank),
                                                       progress=False))
    out["after_raise"] = exchange(rank, "test: the group still works")
    egp_fx.distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=HANG_TIMEOUT)
    out["hangs"] = _attempt(lambda: egp_fx.calibrate(model, _slow(rank, HANG_SECONDS),
                                                     progress=False))
    egp_fx.distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)
    torch.save(out, f"{store_folder}/partial{rank}.pt")      # rank 1 dies before returning
    dist.destroy_process_group()
    store = dist.FileStore(f"{store_folder}/store2", world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    out["dies"] = _attempt(lambda: egp_fx.calibrate(model, _dies(rank), progress=False))
    return out
