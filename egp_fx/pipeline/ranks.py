"""compress across ranks: every rank takes the same decisions and builds the same graph.

The statistics are the same on every rank (calibration.py), so the passes propose the same
rewrites; what could still differ is the data they are checked on. A single process verifies on
the first `verify_samples` calibration samples and on every held-out batch. Across ranks:

    samples   the union of the shards is taken in rank order; each rank verifies its own part
              of that union's first `verify_samples` samples (shared_samples), and all its
              held-out batches
    error     each rank measures an ErrorMeter on its part; the meters are combined (combine):
                  worst = max over ranks, scale = max over ranks, reason = the first in rank order
              which is the meter of a single process on the union, error = worst / scale; every
              rank gets the same number and takes the same decision
    example   the passes and the measures see one example on every rank: the first sample of
              the lowest rank that has data (shapes, FLOPs and the report are the same everywhere)

A rank whose verification part is empty still takes part in every combination (with zeros).
"""
from __future__ import annotations

from collections.abc import Callable

from egp_fx.distributed.comm import exchange
from egp_fx.distributed.group import rank
from egp_fx.ir.batches import Batch
from egp_fx.ir.compare import ErrorMeter


def shared_samples(batches: list[Batch], verify_samples: int | None) -> tuple[Batch, int | None]:
    """(the example every rank uses, how many of this rank's first samples it verifies on;
    None: all of them)."""
    mine = sum(b.size for b in batches)
    got = exchange((batches[0].head(1).to("cpu") if batches else None, mine),
                   "compress: example and verification samples")
    example = next(e for e, _ in got if e is not None)
    before = sum(n for _, n in got[:rank()])
    return example, None if verify_samples is None else max(0, verify_samples - before)


def combine(meter: ErrorMeter, step: str) -> ErrorMeter:
    """The meter of the union: this rank's combined with every other rank's."""
    got = exchange((meter.worst, meter.scale, meter.reason), f"compress: {step}")
    out = ErrorMeter()
    out.worst = max(w for w, _, _ in got)
    out.scale = max(s for _, s, _ in got)
    out.reason = next((f"{why} (rank {r})" for r, (_, _, why) in enumerate(got) if why is not None),
                      None)
    return out


def plan(batches: list[Batch], verify_samples: int | None, active: bool
         ) -> tuple[Batch, int | None, Callable[[ErrorMeter, str], ErrorMeter] | None]:
    """(example, samples of this rank's batches to verify on, how to combine meters) for
    compress; one process: its first sample, verify_samples, no combining."""
    if not active:
        return batches[0].head(1), verify_samples, None
    example, take = shared_samples(batches, verify_samples)
    return example, take, combine
