"""What the ranks of the multi-process tests run (spawn_ranks.run_ranks), and the shared inputs.

Every builder is deterministic, so the parent process builds the same models and batches for
the single-process references. Shards are lists of batches; "the union" is rank 0's batches
followed by rank 1's, which is what a single process is given.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
from torch import nn

import egp_fx
from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.distributed import exchange

INPUT_SHAPE = (3, 16, 16)
UNEVEN = ([5, 3, 4], [6])          # batch sizes of rank 0, rank 1
EMPTY = ([5, 3, 4, 6], [])
HOLDOUT = ([4], [])


class KindsNet(nn.Module):
    """One call of each supported kind, and one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(8, 16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, 16)
        self.hswish = nn.Hardswish()
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.relu(self.leaky(self.conv2(self.relu6(3 * self.conv1(x)))))
        h = self.relu(h - 0.1).mean((2, 3))
        return self.fc3(self.hswish(4 * self.fc2(self.gelu(self.fc1(h)))))


def kinds_net() -> KindsNet:
    torch.manual_seed(1)
    return KindsNet().eval()


def planted() -> nn.Module:
    from planted_models import planted_net  # noqa: PLC0415  (tests/ is on the path)

    return planted_net()


def batches(sizes: list[int], offset: int = 0) -> list[torch.Tensor]:
    """Batches of the given sizes; batch i of every call with the same offset is the same."""
    out = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(1000 + offset + i)
        out.append(torch.randn(n, *INPUT_SHAPE, generator=g))
    return out


def shards(layout: tuple[list[int], list[int]]) -> list[list[torch.Tensor]]:
    """Each rank's batches; together, batches(union sizes) in rank order."""
    out, start = [], 0
    for sizes in layout:
        out.append(batches(sizes, offset=start))
        start += len(sizes)
    return out


def union(layout) -> list[torch.Tensor]:
    return [b for shard in shards(layout) for b in shard]


def stats_of(gm) -> dict[str, dict]:
    """The calibration record of every activation call, as plain values."""
    out = {}
    for node in gm.graph.nodes:
        st = node.meta.get(EGP_META_KEY)
        if isinstance(st, ActivationStats):
            out[node.name] = {"kind": st.kind, "n": st.n, "batches": st.batches, "on": st.on,
                              "low": st.low, "high": st.high, "zmin": st.zmin, "zmax": st.zmax,
                              "egp": st.egp_entropy, "easier": st.easier_entropy,
                              "unit": st.unit_entropy}
    return out


def graph_of(gm) -> dict:
    """What must be identical on every rank: the code, the weights, the report's numbers."""
    report = egp_fx.report_of(gm).to_dict()
    report.pop("seconds", None)
    for summary in report["passes"]:           # timings differ from run to run
        summary.pop("seconds", None)
    return {"code": gm.code, "state": {k: v.detach().clone() for k, v in gm.state_dict().items()},
            "report": report}


# ----------------------------------------------------------------------------- rank functions

def calibration_cases(rank: int, world: int) -> dict:
    """Calibration with uneven and empty shards, opting out, and compress on uneven shards."""
    model = kinds_net()
    out = {"uneven": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False)),
           "empty": stats_of(egp_fx.calibrate(model, shards(EMPTY)[rank], progress=False)),
           "local": stats_of(egp_fx.calibrate(model, shards(UNEVEN)[rank], progress=False,
                                              distributed=False))}
    net = planted()
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
