"""Naming the rank that failed: what every rank leaves in the process group's store.

Every rank writes there the number and name of the last egp_fx step it began (mark) and, when it
fails, its error (report_failure). A rank whose collective fails reads them (diagnose):

    rank 1 failed in calibration: CalibrationError: batch 2 holds 12 NaN/Inf values ...
    rank 1 did not reach it (its last step: 3 'calibration: first batch'): it crashed, was
    killed or hangs

An error counts only when it was posted at or after the last step this rank completed: one the
ranks have already settled in an exchange is not news. Inside collectives egp_fx does not run
itself (DistributedDataParallel's), a failure with no error posted anywhere is followed by a roll
call in the store: the ranks that do not answer within a few seconds are named (guarded).

The store is the default group's, reached through torch.distributed's default-store accessor;
without it the messages say that no rank could be named.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterator

from egp_fx.errors import DistributedError

from .group import rank, world_size

log = logging.getLogger(__name__)
_STEP_KEY, _ERROR_KEY = "egp_fx/step/{}", "egp_fx/error/{}"
_MESSAGE_CHARS = 500
_COLLECTIVE_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe",
                     "closed by peer", "reset by peer")
steps = [0, 0]      # steps this process has begun, and the last one it completed


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
    steps[0] += 1
    _note(_STEP_KEY, f"{steps[0]}\t{what}")
    return steps[0]


def report_failure(step: str, err: BaseException) -> None:
    """Leave this rank's error in the store, where ranks whose collectives fail look for it
    (with the number of the step it began last: an error the others have already heard of, in
    an exchange completed after it, is not news)."""
    _note(_ERROR_KEY, f"{steps[0]}\t{step}: {describe(err)}")


def describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + " ..."


def _read(store, key: str) -> str | None:
    return store.get(key).decode() if store.check([key]) else None


def _others() -> list[int]:
    return [r for r in range(world_size()) if r != rank()]


@contextlib.contextmanager
def _patient(store) -> Iterator[None]:
    saved = store.timeout
    store.set_timeout(datetime.timedelta(seconds=10))
    try:
        yield
    finally:
        store.set_timeout(saved)


def posted_errors() -> dict[int, str]:
    """The errors other ranks left in the store that this rank has not heard of yet (posted
    at or after the last step it completed)."""
    store, out = _store(), {}
    if store is None:
        return out
    with _patient(store):
        for r in _others():
            began, _, text = (_read(store, _ERROR_KEY.format(r)) or "-1\t").partition("\t")
            if int(began) >= steps[1]:
                out[r] = text
    return out


def behind(step_number: int) -> dict[int, str]:
    """Other ranks whose last step is before `step_number`: rank -> their last step."""
    store, out = _store(), {}
    if store is None:
        return out
    with _patient(store):
        for r in _others():
            number, _, what = (_read(store, _STEP_KEY.format(r)) or "0\tnone").partition("\t")
            if int(number) < step_number:
                out[r] = f"{number} '{what}'"
    return out


def roll_call(seconds: float = 3.0) -> list[int]:
    """After a failed collective: the other ranks that do not answer within `seconds` (every
    rank that sees the failure answers; a rank that crashed, was killed or hangs cannot)."""
    store = _store()
    if store is None:
        return []
    key = f"egp_fx/roll_call/{steps[0]}/{{}}"
    _note(key, "here")
    missing, deadline = set(_others()), time.monotonic() + seconds
    with _patient(store):
        while missing and time.monotonic() < deadline:
            missing -= {r for r in missing if store.check([key.format(r)])}
            time.sleep(0.05)
    return sorted(missing)


def diagnose(step_number: int) -> str:
    """What the store says of the other ranks: who failed, or who did not reach the step."""
    if _store() is None:
        return "no other rank could be named (the process group has no store): see their logs"
    try:
        notes = [f"rank {r} failed in {text}" for r, text in posted_errors().items()]
        if not notes:
            notes = [f"rank {r} did not reach it (its last step: {last}): it crashed, was "
                     "killed or hangs" for r, last in behind(step_number).items()]
    except Exception as err:  # noqa: BLE001  (the store lived in a rank that is gone)
        return f"the store could not be read ({type(err).__name__}), so no rank is named"
    return "; ".join(notes) or "no other rank reported a failure"


def _from_collective(err: BaseException) -> bool:
    """Does `err` look like a failed collective (rather than this rank's own failure)?"""
    import torch.distributed as dist  # noqa: PLC0415

    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and any(w in text for w in _COLLECTIVE_WORDS))


@contextlib.contextmanager
def guarded(step: str) -> Iterator[None]:
    """Local work around collectives egp_fx does not run itself (DDP's): on a failure, leave the
    error in the store; when it came from another rank, raise a DistributedError naming it."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as err:
        report_failure(step, err)
        if not _from_collective(err):          # this rank's own failure: its own error
            raise
        try:
            notes = [f"rank {r} failed in {text}" for r, text in posted_errors().items()]
            notes = notes or [f"rank {r} did not answer a roll call: it crashed, was killed or "
                              "hangs" for r in roll_call()]
        except Exception:  # noqa: BLE001  (the store is gone too: the error as it came)
            notes = []
        if not notes:
            raise
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise DistributedError(f"rank {rank()}: {step} stopped ({type(err).__name__}: {text}); "
                               + "; ".join(notes)) from err
