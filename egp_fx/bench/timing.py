"""The timing loop: warm-up, then round-robin rounds, one call per model per round; the rows.

A cell is one (backend, variant, batch size). After `warmup` rounds, each of `repeats` rounds
calls every model once, in turn: drifts of the machine (clock frequency, other load, thermal
state) hit all models alike. time.perf_counter is read around one synchronous call (the runner
makes it synchronous: onnxruntime's run() returns with the outputs ready, torch CUDA calls end
in torch.cuda.synchronize()).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from .result import BenchRow

log = logging.getLogger(__name__)


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


def cell_rows(times: dict[str, list[float]], backend: str, variant: str, batch: int,
              sizes: dict[str, dict], prepared: dict[str, str]) -> list[BenchRow]:
    """One row per model of a cell. The speedup of a row is median(reference) / median(row),
    the reference being the first model of `sizes` (the order the models were given in), when
    it ran in this cell; `baseline` names it and how it was prepared."""
    medians = {name: float(np.median(t)) for name, t in times.items()}
    reference = next(iter(sizes))
    baseline = (f"{reference}: {prepared[reference]}" if prepared.get(reference) else reference) \
        if reference in medians else None
    rows = []
    for name, t in times.items():
        size = sizes[name]
        speedup = medians[reference] / medians[name] if reference in medians else None
        rows.append(BenchRow(name, backend, variant, batch, medians[name],
                             float(np.percentile(t, 90)), size["params"], size["flops"],
                             size["weighted_depth"], size["nonlinear_depth"], speedup, baseline,
                             prepared.get(name, "")))
        log.info("%s %s %s batch %d: median %.3f ms", name, backend, variant, batch,
                 medians[name])
    return rows
