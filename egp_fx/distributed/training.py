"""Fine-tuning and pruning across ranks: DistributedDataParallel, identical weights and masks.

    start           parameters and buffers are broadcast from rank 0 (models drawn differently on
                    each rank, the re-initialisation ablation and a resumed run start equal), then
                    the model is wrapped in DistributedDataParallel (on the rank's GPU with NCCL)
    each step       DDP averages the gradients over the ranks; the pruned weights stay zero
                    through the masks, parametrizations of the weights whose mask buffers DDP
                    broadcasts with the other buffers (egp_fx/pruning/masks.py)
    uneven loaders  when the ranks' batch counts differ (or are unknown), the epoch runs under
                    DDP's Join: a rank out of batches shadows the others' all-reduces, so none
                    waits for a batch that never comes
    end             parameters and buffers are broadcast from rank 0 again (BatchNorm running
                    statistics follow each rank's own batches)
    history         loss, correct and seen are summed over the ranks each epoch
    masks           every rank computes them from identical weights and the reduced entropies;
                    check_identical compares their digests and stops on a difference

A failure inside DDP's own collectives (a rank that raised, died or hangs) becomes a
DistributedError that names the rank: the error it left in the store, or, when it left none, the
ranks that do not answer a roll call in the store (faults.guarded).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from egp_fx.errors import DistributedError

from .comm import all_reduce, broadcast_tensors, exchange
from .faults import guarded
from .group import backend_device, rank

log = logging.getLogger(__name__)


def sync_state(model: nn.Module, step: str) -> None:
    """Every rank's parameters and buffers become rank 0's."""
    broadcast_tensors([*model.parameters(), *model.buffers()], step)


def wrap(model: nn.Module, device: torch.device, step: str) -> nn.Module:
    """`model` (already on `device`) in DistributedDataParallel, starting from rank 0's state."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    backend_device(device)
    sync_state(model, f"{step}: start")
    with guarded(f"{step}: DistributedDataParallel"):
        return DistributedDataParallel(model, device_ids=[device.index]
                                       if device.type == "cuda" else None)


def _batches_per_epoch(loader: Iterable, limit: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return min(n, limit) if limit is not None else n


def uneven(loader: Iterable, limit: int | None, step: str) -> bool:
    """Do the ranks' loaders differ in length (or is some length unknown)?"""
    counts = exchange(_batches_per_epoch(loader, limit), f"{step}: batches per epoch")
    if None in counts or len(set(counts)) > 1:
        log.info("rank %d: batches per epoch %s: training under Join", rank(), counts)
        return True
    return False


@contextlib.contextmanager
def epoch(ddp: nn.Module, step: str, join: bool) -> Iterator[None]:
    """One epoch's loop under DDP: Join when the loaders are uneven; failures named."""
    from torch.distributed.algorithms.join import Join  # noqa: PLC0415

    with guarded(step), Join([ddp], enable=join):
        yield


def sum_over_ranks(values: list[float], step: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=backend_device())
    return all_reduce(t, "sum", step).tolist()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                 else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_identical(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Stop on every rank when `tensors` differ between ranks (compared by digest)."""
    digests = exchange(digest(tensors), f"check: {what}")
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise DistributedError(f"rank {rank()}: {what} differ between ranks (ranks "
                               f"{list(groups.values())} agree among themselves)")
