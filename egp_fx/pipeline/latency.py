"""Measured cost on the target: how long a layer (or a pair) takes where the model will run.

compress(cost="latency") decides by measurement instead of by FLOPs:
- fold_chain merges two layers only when the merged layer is not slower than the pair;
- dead_channels picks, per layer, the width to keep among the live count rounded up to each
  candidate multiple (8, 16, 32, 64, 128) and the original width: the fastest wins (ties go to
  the smaller width), and a narrowing that measures slower than the original is not applied.
The timer is the target's own (`timer_for`): CUDA events on the GPU in half precision for
"cuda"; an onnxruntime session for "ort-cpu"; plain torch on the CPU for "generic". A
`latency_fn(module, x) -> seconds` given to compress replaces it. Measurements are cached by
shapes, dtype and device (WidthTable), as LayerMerge builds its latency tables, so a network
with many layers of the same shape times each shape once.
"""
from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

Timer = Callable[[nn.Module, torch.Tensor], float]


def _median_seconds(run: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_cpu_timer(module: nn.Module, x: torch.Tensor) -> float:
    module = module.eval()
    with torch.no_grad():
        return _median_seconds(lambda: module(x))


def cuda_timer(module: nn.Module, x: torch.Tensor) -> float:
    """Median of CUDA-event timings of the module in half precision on the current GPU."""
    device = torch.device("cuda")
    module = module.to(device=device, dtype=torch.float16).eval()
    x = x.to(device=device, dtype=torch.float16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    with torch.no_grad():
        for i in range(23):
            start.record()
            module(x)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ort_cpu_timer(module: nn.Module, x: torch.Tensor) -> float:
    """Median latency of the module exported to ONNX, in an onnxruntime CPU session."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, input_names=["x"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return _median_seconds(lambda: session.run(None, feed))


def timer_for(target: str) -> Timer:
    """The target's own timer (see the module docstring)."""
    if target == "cuda":
        if not torch.cuda.is_available():
            log.warning("target 'cuda' without a GPU: layers are timed with torch on the CPU")
            return torch_cpu_timer
        return cuda_timer
    if target == "ort-cpu":
        return ort_cpu_timer
    return torch_cpu_timer


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

