"""The collectives egp_fx runs itself: bounded in time, matched by step, failing by name.

Each collective is issued asynchronously and waited for at most COLLECTIVE_TIMEOUT (see the
package docstring). Each exchange carries the number and name of its step, and every rank checks
that all ranks are at the same one: ranks that took different paths (one of them called egp_fx
with other arguments) stop with an error naming both steps, instead of pairing unrelated
collectives.

Local work between two collectives runs inside `together(step)`: an exception there is held
until every rank has exchanged its status; then every rank stops, the failing rank with its own
error and the others with a DistributedError naming it ("rank 1 failed in calibration: ...").
A rank that crashes, is killed or hangs never reaches the exchange: the others' collective fails
(gloo sees the connection close) or times out, and the error names it from what the store holds
(faults.py).
"""
from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from egp_fx.errors import DistributedError

from .faults import describe, diagnose, mark, report_failure, steps
from .group import backend_device, dist_module, is_writer, rank, timeout, world_size


def _run(step: str, number: int, issue: Callable[[], Any]) -> None:
    t0 = time.monotonic()
    try:
        work = issue()
        if work is not None:
            work.wait(timeout=timeout())
        steps[1] = number
    except Exception as err:
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        failure = DistributedError(
            f"rank {rank()}: step {number} '{step}' failed after {time.monotonic() - t0:.1f} s "
            f"({type(err).__name__}: {text}); {diagnose(number)}")
        report_failure(step, failure)
        raise failure from err


def exchange(obj: Any, step: str) -> list:
    """Every rank's `obj` (picklable, small; tensors on the CPU), in rank order."""
    dist = dist_module()
    number = mark(step)
    device = backend_device()
    data = pickle.dumps((number, step, obj), protocol=pickle.HIGHEST_PROTOCOL)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    _run(step, number, lambda: dist.all_gather(sizes, size, async_op=True))
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in lengths]
    _run(step, number, lambda: dist.all_gather(bufs, buf, async_op=True))
    got = [pickle.loads(b[:k].cpu().numpy().tobytes()) for b, k in zip(bufs, lengths)]  # noqa: S301
    if any((n, s) != (number, step) for n, s, _ in got):
        where = ", ".join(f"rank {r} at step {n} '{s}'" for r, (n, s, _) in enumerate(got))
        raise DistributedError(f"rank {rank()}: the ranks are out of step ({where}): they took "
                               "different paths (did one rank call egp_fx with other arguments, "
                               "or with distributed=False?)")
    return [o for _, _, o in got]


def all_reduce(tensor: torch.Tensor, op: str, step: str) -> torch.Tensor:
    """Reduce `tensor` in place over all ranks; op: "sum", "min" or "max"."""
    dist = dist_module()
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    number = mark(step)
    _run(step, number, lambda: dist.all_reduce(tensor, op=red, async_op=True))
    return tensor


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], step: str, src: int = 0) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s (one collective per dtype)."""
    dist = dist_module()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        device = backend_device(group[0].device)
        wire = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.cat([t.detach().reshape(-1).to(device, wire) for t in group])
        number = mark(f"{step} ({dtype})")
        _run(step, number, lambda flat=flat: dist.broadcast(flat, src=src, async_op=True))
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape).to(t.device, dtype))
            offset += t.numel()


# ----------------------------------------------------------------------------- failing together

def _settle(step: str, err: Exception | None, payload: Any) -> list:
    status = None if err is None else describe(err)
    if err is not None:
        report_failure(step, err)
    try:
        got = exchange((status, payload), step)
    except DistributedError:
        if err is not None:
            raise err from None
        raise
    if err is not None:
        raise err
    failed = [(r, s) for r, (s, _) in enumerate(got) if s is not None]
    if failed:
        raise DistributedError("; ".join(f"rank {r} failed in {step}: {s}" for r, s in failed)
                               + f" (rank {rank()} stops too)")
    return [p for _, p in got]


@contextlib.contextmanager
def together(step: str, active: bool = True) -> Iterator[None]:
    """Run the block's local work, then agree: if it failed on any rank, every rank stops (the
    failing rank with its own error, the others with a DistributedError naming it)."""
    if not active:
        yield
        return
    err = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001  (held until every rank has said how it went)
        err = caught
    _settle(step, err, None)


def from_writer(fn: Callable[[], Any], step: str, active: bool = True) -> Any:
    """fn() on rank 0 only (files, for one); its value on every rank. Failures as `together`."""
    if not active:
        return fn()
    err, value = None, None
    if is_writer():
        try:
            value = fn()
        except Exception as caught:  # noqa: BLE001  (held, as in together)
            err = caught
    return _settle(step, err, value)[0]
