"""Measured cost on the target: how long a layer (or a pair) takes where the model will run.

compress(cost="latency") decides by measurement instead of by FLOPs:
- fold_chain merges two layers only when the merged layer is not slower than the pair;
- dead_channels picks, per layer, the width to keep among the live count rounded up to each
  candidate multiple (8, 16, 32, 64, 128) and the original width: the fastest wins (ties go to
  the smaller width), and a narrowing that measures slower than the original is not applied.
The timer is the target's own (`timer_for`, from its entry in targets.py; timers.py: an
onnxruntime session for "ort-cpu", torch in half precision on the GPU for "cuda", torch on the
CPU for "generic", each through the session and timing code of the target's bench backend). A
`latency_fn(module, x) -> seconds` given to compress replaces it. Measurements are cached by
shapes, dtype and device (WidthTable), as LayerMerge builds its latency tables, so a network
with many layers of the same shape times each shape once.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from .targets import TARGETS
from .timers import Timer, torch_cpu_timer

log = logging.getLogger(__name__)


def timer_for(target: str) -> Timer:
    """The target's own timer; torch on the CPU, with a warning, where it cannot run here."""
    entry = TARGETS[target]
    reason = entry.available()
    if reason:
        log.warning("target %r cannot be timed here (%s): layers are timed with torch on the CPU",
                    target, reason)
        return torch_cpu_timer
    return entry.timer


class WidthTable:
    """Cached timings of layers of a given geometry: key -> seconds."""

    def __init__(self, timer: Timer):
        self.timer = timer
        self.table: dict[tuple, float] = {}

    def seconds(self, key: tuple, build: Callable[[], tuple[nn.Module, torch.Tensor]]) -> float:
        if key not in self.table:
            module, x = build()
            self.table[key] = self.timer(module, x)
            log.debug("timed %s: %.3g ms", key, self.table[key] * 1e3)
        return self.table[key]
