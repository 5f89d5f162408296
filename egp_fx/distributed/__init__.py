"""egp_fx across the ranks of a torch.distributed process group (DESIGN.md, "Many processes").

Nothing here launches processes: torchrun (or the caller) starts them and sets up the default
process group; egp_fx finds it and takes part.

    calibrate   each rank passes its own shard; the statistics are reduced once after the
                local pass (counts summed, min/max reduced, the per-batch EGP entropy averaged
                over every batch of every rank): every rank ends with the statistics a single
                process computes on the union of the shards             (calibration.py)
    compress    every rank verifies its part of the verification samples and the errors are
                combined, so every rank takes the same decisions and builds the same graph
                                                                         (verification.py)
    prune       fine-tuning under DistributedDataParallel, masks from identical weights and
                reduced entropies (checked equal on every rank), files written by rank 0
                                                                         (training.py)
    egp-fx      under torchrun the command line sets up the group from the environment and
                shards its data                                          (launch.py)

`distributed=None` (the default everywhere) follows torch.distributed.is_initialized();
`distributed=False` keeps a call local to its rank.

COLLECTIVE_TIMEOUT bounds every wait of an egp_fx collective: 30 minutes, or the number of
seconds in the environment variable EGP_FX_COLLECTIVE_TIMEOUT; it is read when a collective runs,
so it may also be assigned here. A wait includes the time the slowest rank still needs for its
local work (an uneven shard), so it must be longer than that. With gloo the bound applies to each
wait; NCCL waits on the GPU, where the process group's own timeout applies (egp-fx creates its
group with COLLECTIVE_TIMEOUT). A rank that fails makes the others stop with an error naming it
(comm.py, faults.py).

Modules: group.py (the group, backends and devices), comm.py (collectives, failing together),
faults.py (naming the failed rank), calibration.py, verification.py, training.py, launch.py.
"""
from __future__ import annotations

import datetime
import logging
import os

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
TIMEOUT_ENV = "EGP_FX_COLLECTIVE_TIMEOUT"


def _timeout_from_env() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        log.warning("%s=%r is not a positive number of seconds; using %s", TIMEOUT_ENV, raw,
                    DEFAULT_TIMEOUT)
        return DEFAULT_TIMEOUT
    return datetime.timedelta(seconds=seconds)


COLLECTIVE_TIMEOUT: datetime.timedelta = _timeout_from_env()

from .comm import all_reduce, broadcast_tensors, exchange, from_writer, together  # noqa: E402
from .faults import guarded, mark, report_failure  # noqa: E402
from .group import backend_device, enabled, is_writer, rank, world_size  # noqa: E402

__all__ = [
    "COLLECTIVE_TIMEOUT", "TIMEOUT_ENV", "all_reduce", "backend_device", "broadcast_tensors",
    "enabled", "exchange", "from_writer", "guarded", "is_writer", "mark", "rank",
    "report_failure", "together", "world_size",
]
