"""The collectives egp_fx runs itself: bounded in time, matched by step, failing by name.

Each collective is issued asynchronously and waited for at most COLLECTIVE_TIMEOUT (see the
package docstring). Each exchange carries the number and name of its step, and every rank checks
that all ranks are at the same one: ranks that took different paths (one of them called egp_fx
with other arguments) stop with an error naming both steps, instead of pairing unrelated
collectives.

Failures:
- Local work between two collectives runs inside `together(step)`: an exception there is held
  until every rank has exchanged its status; then every rank stops, the failing rank with its
  own error and the others with a DistributedError naming it:
      rank 1 failed in calibration: CalibrationError: batch 2 holds 12 NaN/Inf values ...
- A rank that crashes, is killed or hangs never reaches the exchange: the others' collective
  fails (gloo sees the connection close) or times out. Every rank leaves in the process group's
  store the last step it began and, when it fails, its error; a rank whose collective fails reads
  them and names the rank:
      rank 0: step 4 'calibration' failed after 30.0 s (RuntimeError: ...); rank 1 did not
      reach it (its last step: 3 'calibration: first batch'): it crashed, was killed or hangs
  (The store is reached through torch.distributed's default-store accessor; without it the
  message says that no rank could be named.)

Backends and devices (backend_device): gloo reduces CPU tensors (statistics computed on a GPU are
copied there: they are small); NCCL reduces tensors on the current CUDA device and needs the
data on CUDA. A mismatch is a DistributedError saying what to change.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import DistributedError

log = logging.getLogger(__name__)
_STEP_KEY, _ERROR_KEY = "egp_fx/step/{}", "egp_fx/error/{}"
_steps = [0, 0]     # steps this process has begun, and the last one it completed
_MESSAGE_CHARS = 500


def _dist():
    import torch.distributed as dist  # noqa: PLC0415  (imported when used)

    return dist


def _ready() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def enabled(flag: bool | None) -> bool:
    """Work across ranks? `flag` None: when a default process group is initialised."""
    ready = _ready()
    if flag and not ready:
        raise DistributedError("distributed=True but no torch.distributed process group is "
                               "initialised (torchrun sets the environment up; call "
                               "torch.distributed.init_process_group first)")
    return ready if flag is None else bool(flag)


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return _dist().get_rank() if _ready() else 0


def world_size() -> int:
    """The number of ranks in the default group (1 without one)."""
    return _dist().get_world_size() if _ready() else 1


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def _timeout() -> datetime.timedelta:
    from . import COLLECTIVE_TIMEOUT  # noqa: PLC0415  (read when used: it may be reassigned)

    return COLLECTIVE_TIMEOUT


def backend_device(data: torch.device | str | None = None) -> torch.device:
    """The device the default group's collectives run on, for data living on `data`.

    Raises DistributedError when the backend cannot reduce data from that device (NCCL and data
    on the CPU), or when NCCL is asked for without CUDA.
    """
    name = str(_dist().get_backend()).lower()
    kind = torch.device(data).type if data is not None else None
    if ":" in name:                                  # "cpu:gloo,cuda:nccl"
        per_type = dict(part.split(":", 1) for part in name.split(","))
        if kind is not None and kind not in per_type:
            raise DistributedError(f"the process group has backends for {sorted(per_type)} "
                                   f"tensors ({name}), but this rank's data is on {data}")
        name = per_type.get(kind or "cpu", next(iter(per_type.values())))
    if name == "nccl":
        if kind not in (None, "cuda"):
            raise DistributedError(
                f"the process group's backend is NCCL, which reduces CUDA tensors only, but this "
                f"rank's data is on {data}: run on the GPU (device='cuda:<local rank>'; egp-fx: "
                "--device cuda) or create the group with backend='gloo'")
        if not torch.cuda.is_available():
            raise DistributedError("the process group's backend is NCCL but CUDA is not "
                                   "available in this process: use backend='gloo'")
        return torch.device("cuda", torch.cuda.current_device())
    if name == "gloo":
        return torch.device("cpu")
    return torch.device(data) if data is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- the store

def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store  # noqa: PLC0415

        return _get_default_store()
    except Exception:  # noqa: BLE001  (no store, or an accessor this torch lacks: names unknown)
        return None


def _note(key: str, value: str) -> None:
    store = _store()
    if store is None:
        return
    try:
        store.set(key.format(rank()), value)
    except Exception:  # noqa: BLE001  (best effort: the store may be gone with a failed rank)
        log.debug("could not write %s to the store", key, exc_info=True)


def mark(what: str) -> int:
    """Begin step `what`: count it and leave it in the store for the others; returns its number."""
    _steps[0] += 1
    _note(_STEP_KEY, f"{_steps[0]}\t{what}")
    return _steps[0]


def report_failure(step: str, err: BaseException) -> None:
    """Leave this rank's error in the store, where ranks whose collectives fail look for it
    (with the number of the step it began last: an error the others have already heard of, in
    an exchange completed after it, is not news)."""
    _note(_ERROR_KEY, f"{_steps[0]}\t{step}: {_describe(err)}")


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + " ..."


def _read(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def diagnose(step_number: int) -> str:
    """What the store says of the other ranks: who failed, or who did not reach the step."""
    store = _store()
    if store is None:
        return "no other rank could be named (the process group has no store): see their logs"
    notes, me = [], rank()
    try:
        saved = store.timeout
        store.set_timeout(datetime.timedelta(seconds=10))
        try:
            for r in (r for r in range(world_size()) if r != me):
                err = _read(store, _ERROR_KEY.format(r))
                began, _, text = (err or "-1\t").partition("\t")
                if int(began) >= _steps[1]:
                    notes.append(f"rank {r} failed in {text}")
                    continue
                step = _read(store, _STEP_KEY.format(r))
                number, _, what = (step or "0\tnone").partition("\t")
                if int(number) < step_number:
                    notes.append(f"rank {r} did not reach it (its last step: {number} '{what}'): "
                                 "it crashed, was killed or hangs")
        finally:
            store.set_timeout(saved)
    except Exception as err:  # noqa: BLE001  (the store lived in a rank that is gone)
        notes.append(f"the store could not be read ({type(err).__name__}), so no rank is named")
    return "; ".join(notes) or "no other rank reported a failure"


# ----------------------------------------------------------------------------- collectives

def _run(step: str, number: int, issue: Callable[[], Any]) -> None:
    t0 = time.monotonic()
    try:
        work = issue()
        if work is not None:
            work.wait(timeout=_timeout())
        _steps[1] = number
    except Exception as err:
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        failure = DistributedError(
            f"rank {rank()}: step {number} '{step}' failed after {time.monotonic() - t0:.1f} s "
            f"({type(err).__name__}: {text}); {diagnose(number)}")
        report_failure(step, failure)
        raise failure from err


def exchange(obj: Any, step: str) -> list:
    """Every rank's `obj` (picklable, small; tensors on the CPU), in rank order."""
    dist = _dist()
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
    dist = _dist()
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    number = mark(step)
    _run(step, number, lambda: dist.all_reduce(tensor, op=red, async_op=True))
    return tensor


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], step: str, src: int = 0) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s (one collective per dtype)."""
    dist = _dist()
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
    status = None if err is None else _describe(err)
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
