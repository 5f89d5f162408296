"""The rows of a cell: one per model, its median and 90th percentile in milliseconds, its sizes,
and its speedup over the cell's baseline.

The times come from egp_fx.runtime.timing.measure_cell (warm-up, then round-robin rounds of one
call per model), the loop compress's latency cost times layers with too.
"""
from __future__ import annotations

import logging

import numpy as np

from .result import BenchRow

log = logging.getLogger(__name__)


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
