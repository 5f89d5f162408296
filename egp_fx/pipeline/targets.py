"""The hardware a compressed model will run on, and what that asks of its layers.

Deleting dead units only pays if the narrowed layers still run at full speed there:
- "ort-cpu": onnxruntime's blocked NCHWc kernels pad a channel count that is not a multiple of
  the block (8 with AVX2, 16 with AVX-512) back to it and add layout reorders, so widths stay a
  multiple of 16;
- "cuda": fp16/bf16 tensor-core GEMMs want every dimension a multiple of 8 at the very least and
  run fastest on multiples of 64 to 128; widths stay a multiple of 64;
- "generic": a multiple of 8, the least any vectorised runtime wants.
Keeping a few dead units to reach a multiple is exact; the report says how many were kept.
`channel_multiple=` overrides the target's multiple.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    channel_multiple: int
    why: str


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ort-cpu", 16, "onnxruntime CPU blocks channels by 8 or 16 (NCHWc)"),
    Target("cuda", 64, "tensor-core GEMMs run fastest on multiples of 64 to 128"),
    Target("generic", 8, "vector units want multiples of 8"),
)}


def target_options(target: str, channel_multiple: int | None) -> dict:
    """The pass options a target sets (PassOptions keyword arguments)."""
    t = TARGETS[target]
    return {"channel_multiple": t.channel_multiple if channel_multiple is None else channel_multiple}
