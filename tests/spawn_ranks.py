"""Run a function on several gloo ranks, each in a fresh process, for the multi-process tests.

The ranks meet through a FileStore in the test's temporary folder (no port to pick), gloo talks
over the loopback interface only (GLOO_SOCKET_IFNAME=lo), each process runs one thread, and
everything is bounded in time: egp_fx's collectives by `collective_timeout` (assigned to
egp_fx.distributed.COLLECTIVE_TIMEOUT, and the group's own timeout), the whole run by `timeout`,
after which every process still alive is killed and the test fails. Processes are killed on any
failure of the parent too.

`fn(rank, world, *args)` must be a module-level function (it is pickled into the children); its
return value, or the error it raised, comes back as an Outcome per rank.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None          # "TypeName: message" when fn raised
    error_type: str | None = None
    seconds: float | None = None      # how long fn ran
    traceback: str | None = None

    def ok(self) -> Any:
        assert self.error is None, f"rank {self.rank} raised {self.error}\n{self.traceback}"
        return self.value


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, folder: str, collective_timeout: float, args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import egp_fx.distributed  # noqa: PLC0415

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=collective_timeout)
    egp_fx.distributed.COLLECTIVE_TIMEOUT = timeout
    store = dist.FileStore(str(Path(folder) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    t0 = time.monotonic()
    try:
        result = {"value": fn(rank, world, *args)}
    except BaseException as err:  # noqa: BLE001  (reported to the parent, which judges it)
        result = {"error": f"{type(err).__name__}: {err}", "error_type": type(err).__name__,
                  "traceback": traceback.format_exc()}
    result["seconds"] = time.monotonic() - t0
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    if "error" not in result:
        dist.destroy_process_group()
    os._exit(0)


def run_ranks(fn, folder: Path, *args, world: int = 2, timeout: float = 60.0,
              collective_timeout: float = 20.0) -> list[Outcome]:
    """Run fn on `world` ranks; returns their outcomes (fails the test after `timeout` s)."""
    import torch  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(folder), collective_timeout, args),
                         daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {timeout} s: killed"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    out = []
    for r, p in enumerate(procs):
        path = folder / f"rank{r}.pt"
        if not path.exists():
            out.append(Outcome(r, p.exitcode, error=f"no result (exit code {p.exitcode})",
                               error_type="NoResult"))
            continue
        res = torch.load(path, weights_only=False)
        out.append(Outcome(r, p.exitcode, res.get("value"), res.get("error"),
                           res.get("error_type"), res.get("seconds"), res.get("traceback")))
    return out
