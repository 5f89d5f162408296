"""egp-fx under torchrun: the process group from the environment, and each rank's share of data.

torchrun starts N copies of the command and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in their environments. The command line then (egp_fx/cli/app.py)
- sets up the default process group (setup): NCCL when the command runs on CUDA (--device cuda;
  each rank on cuda:LOCAL_RANK), gloo otherwise, with COLLECTIVE_TIMEOUT;
- gives each rank its share of the data (egp_fx/cli/data.py):
      calibration (compress, inspect, export, bench): whole batches, dealt in turn: batch i of
          the single-process command goes to rank i mod N (shard_batches), so the statistics,
          and the compressed model, are those of the single-process command;
      training (prune): every batch of --batch-size is split over the ranks, --batch-size / N
          samples each, through a DistributedSampler in the single-process order (shard_samples):
          one DDP step sees the batch one process would. (DistributedSampler pads the data to a
          multiple of N with up to N - 1 repeated samples.)
- lets rank 0 alone print results and write files; every rank logs with its rank, and prints
  its own error.
"""
from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .group import dist_module, rank, world_size

log = logging.getLogger(__name__)
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Was this process started by torchrun (or with its environment)?"""
    return all(k in os.environ for k in _ENV)


def rank_device(device: str | None) -> str | None:
    """"cuda" becomes this rank's GPU, cuda:LOCAL_RANK; anything else is kept."""
    if device == "cuda" and launched():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def setup(device: str | None) -> bool:
    """Initialise the default process group from torchrun's environment when there is one and no
    group exists yet; True when this call created it (teardown() then destroys it)."""
    dist = dist_module()
    if not launched() or dist.is_initialized():
        return False
    from . import COLLECTIVE_TIMEOUT  # noqa: PLC0415  (read now: it may have been reassigned)

    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        gpu = torch.device(rank_device(device))
        torch.cuda.set_device(gpu)
        dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=gpu)
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    log.info("rank %d of %d: %s process group", rank(), world_size(), dist.get_backend())
    return True


def teardown() -> None:
    dist = dist_module()
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(dataset: Dataset, batch_size: int, num_batches: int | None) -> DataLoader:
    """This rank's whole batches: batch i of the unsharded loader (at most `num_batches` of
    them) goes to rank i mod world size. A rank may get none."""
    n = len(dataset)  # type: ignore[arg-type]
    total = -(-n // batch_size)
    if num_batches is not None:
        total = min(total, num_batches)
    mine = [list(range(i * batch_size, min((i + 1) * batch_size, n)))
            for i in range(rank(), total, world_size())]
    return DataLoader(dataset, batch_sampler=mine)


def shard_samples(dataset: Dataset, batch_size: int) -> DataLoader:
    """This rank's part of every batch: batch_size / world size samples (the caller checks
    that it divides), in the unsharded order."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=False)
    return DataLoader(dataset, batch_size=batch_size // world_size(), sampler=sampler)
