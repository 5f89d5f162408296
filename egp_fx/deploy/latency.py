"""Latency of ONNX files on the target, measured side by side: what export_onnx picks by.

    ort_cpu_latency({"torchscript": a.onnx, "dynamo": b.onnx}, batch, ["input"])
        -> {"torchscript": seconds per call, "dynamo": seconds per call}

The same graph written by two exporters can differ 2x in speed on onnxruntime (CREPE: the
TorchScript form keeps each Pad apart from its Conv; in the dynamo form ORT fuses them and runs
the padded tall convolutions through a slower NCHWc kernel), so the form is chosen by measuring.

- One onnxruntime CPU session per file (egp_fx.runtime.ort_session) at ORT_ENABLE_ALL (a
  session's default level), `threads` intra-op threads (1 by default: on a shared machine one
  thread gives the ranking with the least noise), thread pools not spinning (they would compete
  across files).
- The files are timed in interleaved rounds, each file's figure the mean call of its fastest
  round (egp_fx.runtime.timing.fastest_rounds).

A timer is any callable (paths, batch, input_names) -> {key: seconds}; export_onnx and the
command line take one (`timer=`), so a test can hand in its own.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from egp_fx.ir.batches import Batch
from egp_fx.runtime.ort import ort_runner, ort_session
from egp_fx.runtime.timing import fastest_rounds

Timer = Callable[[Mapping[str, Path], Batch, Sequence[str]], Mapping[str, float]]


def ort_cpu_session(path: Path, threads: int | None = 1):
    """A quiet onnxruntime CPU session at ORT_ENABLE_ALL whose thread pool does not spin."""
    return ort_session(path, "CPUExecutionProvider", threads=threads, spinning=False,
                       quiet=True)


def ort_cpu_latency(paths: Mapping[str, Path], batch: Batch, input_names: Sequence[str], *,
                    threads: int | None = 1, budget_s: float = 1.0) -> dict[str, float]:
    """Seconds per call of each file on `batch`, interleaved (see the module docstring)."""
    named = Batch(kwargs=dict(zip(input_names, batch.tensors())))   # fed by the files' names
    runners = {key: ort_runner(ort_cpu_session(p, threads), named) for key, p in paths.items()}
    return fastest_rounds(runners, budget_s)


TIMERS: dict[str, Timer] = {"ort-cpu": ort_cpu_latency}
