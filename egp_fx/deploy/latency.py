"""Latency of ONNX files on the target, measured side by side: what export_onnx picks by.

    ort_cpu_latency({"torchscript": a.onnx, "dynamo": b.onnx}, batch, ["input"])
        -> {"torchscript": seconds per call, "dynamo": seconds per call}

The same graph written by two exporters can differ 2x in speed on onnxruntime (CREPE: the
TorchScript form keeps each Pad apart from its Conv; in the dynamo form ORT fuses them and runs
the padded tall convolutions through a slower NCHWc kernel), so the form is chosen by measuring.

- One onnxruntime CPU session per file at ORT_ENABLE_ALL (a session's default level), sequential
  execution, `threads` intra-op threads (1 by default: on a shared machine one thread gives the
  ranking with the least noise), thread pools not spinning (they would compete across files).
- After one warm-up call each, the files are timed in interleaved rounds: each round calls
  every file `calls` times in turn (enough calls for a round to last ~3 ms), so a drift of the
  machine hits all alike. At least MIN_ROUNDS rounds, more while the time spent stays within
  `budget_s`, at most MAX_ROUNDS; each file's figure is the mean call of its fastest round.
  Other load on the machine only adds time, so the fastest round is the least disturbed one: on
  a 2-core machine at load 10, the median of the same file in two sessions differed 3x from run
  to run while the minimum stayed within 5%.

A timer is any callable (paths, batch, input_names) -> {key: seconds}; export_onnx and the
command line take one (`timer=`), so a test can hand in its own.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from egp_fx.ir.batches import Batch

Timer = Callable[[Mapping[str, Path], Batch, Sequence[str]], Mapping[str, float]]

MIN_ROUNDS, MAX_ROUNDS = 5, 21
ROUND_S = 3e-3


def ort_cpu_session(path: Path, threads: int | None = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_cpu_latency(paths: Mapping[str, Path], batch: Batch, input_names: Sequence[str], *,
                    threads: int | None = 1, budget_s: float = 1.0) -> dict[str, float]:
    """Seconds per call of each file on `batch`, interleaved (see the module docstring)."""
    feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, batch.tensors())}
    sessions = {key: ort_cpu_session(p, threads) for key, p in paths.items()}
    first = {}
    for key, s in sessions.items():
        t0 = time.perf_counter()
        s.run(None, feed)
        first[key] = time.perf_counter() - t0
    calls = max(1, math.ceil(ROUND_S / max(min(first.values()), 1e-6)))
    rounds: dict[str, list[float]] = {key: [] for key in sessions}
    start = time.perf_counter()
    while True:
        for key, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                s.run(None, feed)
            rounds[key].append((time.perf_counter() - t0) / calls)
        n = len(rounds[next(iter(rounds))])
        if n >= MAX_ROUNDS or (n >= MIN_ROUNDS and time.perf_counter() - start > budget_s):
            break
    return {key: min(ts) for key, ts in rounds.items()}


TIMERS: dict[str, Timer] = {"ort-cpu": ort_cpu_latency}
