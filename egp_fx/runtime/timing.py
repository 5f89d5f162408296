"""The timing loop: warm-up, then round-robin rounds, one call per runner per round.

After `warmup` rounds, each of `repeats` rounds calls every runner once, in turn: drifts of the
machine (clock frequency, other load, thermal state) hit all runners alike. time.perf_counter is
read around one synchronous call (the runner makes it synchronous: onnxruntime's run() returns
with the outputs ready, torch CUDA calls end in torch.cuda.synchronize()). The benchmark times a
cell of models with it; compress's latency cost times one layer at a time with it.
"""
from __future__ import annotations

import time
from collections.abc import Callable


def measure_cell(runners: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list]:
    """Per-call times in milliseconds of every runner, measured round-robin."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    clock = time.perf_counter
    for _ in range(repeats):
        for name, run in runners.items():
            start = clock()
            run()
            times[name].append((clock() - start) * 1e3)
    return times
