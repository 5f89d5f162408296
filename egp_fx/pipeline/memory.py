"""Will compress fit? An estimate of the memory it needs beyond the model, checked before it starts.

compress shares the model's tensors (copying.structural_copy) and never holds a float64 copy
(verify.Float64Run). What it adds is
- the tensors its rewrites create (at most about one copy of the rewritten layers), and, unless
  share_weights=True, the result's own copy of the layers it did not rewrite: together about
  one copy of the weights;
- activations of one calibration batch and the reference outputs of the verification samples.
The estimate is 1.0x the weight bytes (0.25x with share_weights=True) plus a margin for the
activations; a model that would not fit fails here, with the numbers, instead of being killed
halfway through.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import nn

from egp_fx.errors import MemoryBudgetError
from egp_fx.ir.copying import device_of, tensor_bytes

GB = 1024 ** 3
MARGIN = 0.5 * GB


def _cgroup_free() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return int(limit) - usage
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    group = _cgroup_free()
    if group is not None:
        free = group if free is None else min(free, group)
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    return free


def estimate_extra(model: nn.Module, share_weights: bool) -> int:
    """Bytes compress needs beyond the model itself (see the module docstring)."""
    weights = tensor_bytes(model)
    return int(weights * (0.25 if share_weights else 1.0) + MARGIN)


def check_fits(model: nn.Module, device: torch.device | str | None, share_weights: bool) -> int:
    """Raise MemoryBudgetError when the estimate exceeds what `device` has free; the estimate."""
    device = torch.device(device) if device is not None else device_of(model)
    need = estimate_extra(model, share_weights)
    if device_of(model) != device:
        need += tensor_bytes(model)            # the copy on the target device
    free = available_bytes(device)
    if free is not None and need > free:
        hint = "" if share_weights else " (share_weights=True needs about a quarter of the weights)"
        raise MemoryBudgetError(
            f"compress needs about {need / GB:.2f} GB beyond the model on {device} "
            f"({tensor_bytes(model) / GB:.2f} GB of weights), but only {free / GB:.2f} GB are "
            f"free{hint}")
    return need


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    A forward frees its activations, but glibc keeps freed blocks of the heap resident, and after
    large tensors are freed it serves later ones from that heap as well: the resident peak of
    compress then depends on the order of allocations (up to half the weights more between
    identical runs). compress calls this between its phases."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)
