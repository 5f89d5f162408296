"""The timing loops: warm-up, then round-robin rounds, so that drifts hit every runner alike.

measure_cell (the benchmark, compress's latency cost): one call per runner per round.

After `warmup` rounds, each of `repeats` rounds calls every runner once, in turn: drifts of the
machine (clock frequency, other load, thermal state) hit all runners alike. time.perf_counter is
read around one synchronous call (the runner makes it synchronous: onnxruntime's run() returns
with the outputs ready, torch CUDA calls end in torch.cuda.synchronize()). The benchmark times a
cell of models with it; compress's latency cost times one layer at a time with it.

fastest_rounds (export_onnx's choice of form): each round calls every runner `calls` times in
turn (enough for a round to last ROUND_S), at least MIN_ROUNDS rounds, more while the time spent
stays within `budget_s`, at most MAX_ROUNDS; each runner's figure is the mean call of its fastest
round. Other load on the machine only adds time, so the fastest round is the least disturbed
one: on a 2-core machine at load 10, the median of the same file in two sessions differed 3x
from run to run while the minimum stayed within 5%.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

MIN_ROUNDS, MAX_ROUNDS = 5, 21
ROUND_S = 3e-3


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


def fastest_rounds(runners: dict[str, Callable], budget_s: float = 1.0) -> dict[str, float]:
    """Seconds per call of every runner: the mean call of its fastest round (see above)."""
    first = {}
    for name, run in runners.items():            # the warm-up call, timed to size a round
        start = time.perf_counter()
        run()
        first[name] = time.perf_counter() - start
    calls = max(1, math.ceil(ROUND_S / max(min(first.values()), 1e-6)))
    rounds: dict[str, list[float]] = {name: [] for name in runners}
    begin = time.perf_counter()
    while True:
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            rounds[name].append((time.perf_counter() - start) / calls)
        n = len(rounds[next(iter(rounds))])
        if n >= MAX_ROUNDS or (n >= MIN_ROUNDS and time.perf_counter() - begin > budget_s):
            break
    return {name: min(ts) for name, ts in rounds.items()}
