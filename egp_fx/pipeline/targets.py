"""The hardware a compressed model will run on: one registry, one entry per target.

An entry names what the target asks of the layers and how to measure there:
- `channel_multiple`: deleting dead units only pays if the narrowed layers still run at full
  speed, so narrowed widths stay a multiple of it. "ort-cpu": onnxruntime's blocked NCHWc
  kernels pad a channel count that is not a multiple of the block (8 with AVX2, 16 with
  AVX-512) back to it and add layout reorders: 16. "cuda": fp16/bf16 tensor-core GEMMs want
  every dimension a multiple of 8 at the very least and run fastest on multiples of 64 to 128:
  64. "generic": 8, the least any vectorised runtime wants. Keeping a few dead units to reach a
  multiple is exact; the report says how many were kept. `channel_multiple=` overrides it.
- `backend`: the egp_fx.bench backend a model deployed there is timed on;
- `timer`: (module, x) -> seconds of one call there, what compress(cost="latency") decides by
  (timers.py: through the same session and timing code as that backend);
- `available`: () -> None, or why the timer cannot run on this machine (latency.timer_for then
  times with torch on the CPU and says so).

Adding a target is its timer (a file, unless an existing one fits) and one line below, or one
register_target(Target(...)) call in user code; compress(target=...) and the command line's
--target read TARGETS.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .timers import Timer, cuda_timer, gpu_missing, ort_cpu_timer, torch_cpu_timer


def _always() -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    name: str
    channel_multiple: int
    backend: str
    timer: Timer
    why: str
    available: Callable[[], str | None] = _always


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort-cpu", 16, "ort-cpu", ort_cpu_timer,
           "onnxruntime CPU blocks channels by 8 or 16 (NCHWc)"),
    Target("cuda", 64, "torch-cuda", cuda_timer,
           "tensor-core GEMMs run fastest on multiples of 64 to 128", gpu_missing),
    Target("generic", 8, "torch-cpu", torch_cpu_timer, "vector units want multiples of 8"),
)}


def register_target(target: Target) -> Target:
    """Make `target` available to compress(target=...) and --target under target.name."""
    if target.channel_multiple < 1:
        raise ValueError(f"target {target.name!r}: channel_multiple must be >= 1")
    TARGETS[target.name] = target
    return target


def target_options(target: str, channel_multiple: int | None) -> dict:
    """The pass options a target sets (keyword arguments of the passes' options)."""
    t = TARGETS[target]
    return {"channel_multiple": t.channel_multiple if channel_multiple is None else channel_multiple}
