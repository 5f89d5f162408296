"""The default process group as egp_fx sees it: whether to use it, who this rank is, which
device its collectives run on.

Backends and devices (backend_device): gloo reduces CPU tensors (statistics computed on a GPU are
copied there: they are small); NCCL reduces tensors on the current CUDA device and needs the
data on CUDA; a group with one backend per device type ("cpu:gloo,cuda:nccl") uses the one for
the data's device. A mismatch is a DistributedError that says what to change.
"""
from __future__ import annotations

import datetime

import torch

from egp_fx.errors import DistributedError


def dist_module():
    import torch.distributed as dist  # noqa: PLC0415  (imported when used)

    return dist


def _ready() -> bool:
    dist = dist_module()
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
    return dist_module().get_rank() if _ready() else 0


def world_size() -> int:
    """The number of ranks in the default group (1 without one)."""
    return dist_module().get_world_size() if _ready() else 1


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def timeout() -> datetime.timedelta:
    from . import COLLECTIVE_TIMEOUT  # noqa: PLC0415  (read when used: it may be reassigned)

    return COLLECTIVE_TIMEOUT


def backend_device(data: torch.device | str | None = None) -> torch.device:
    """The device the default group's collectives run on, for data living on `data`.

    Raises DistributedError when the backend cannot reduce data from that device (NCCL and data
    on the CPU), or when NCCL is asked for without CUDA.
    """
    name = str(dist_module().get_backend()).lower()
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
