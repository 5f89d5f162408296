"""The built-in targets' timers: the seconds one call of a layer (or a pair of layers) takes
there, measured the way the target's bench backend measures a whole model.

- ort_cpu_timer (target "ort-cpu", backend ort-cpu): the module exported to ONNX in memory
  (torch.onnx.export, TorchScript exporter; a lone layer needs no parity check), one
  egp_fx.runtime.ort session on the CPU provider (graph optimisation "all", onnxruntime's
  default threads, spinning allowed as for one model timed alone), fed as ort-cpu feeds it;
- cuda_timer (target "cuda", backend torch-cuda): the module in half precision on the current
  GPU, called as torch-cuda's "fp16" variant calls it (eager, inference mode, synchronized);
- torch_cpu_timer (target "generic", backend torch-cpu): the module on the CPU, called as
  torch-cpu's "fp32" variant calls it.
Each is the median of REPEATS calls after WARMUP, timed by egp_fx.runtime.timing.measure_cell,
the benchmark's own loop. A target's timer is named by its entry in targets.py; gpu_missing says
why the cuda timer cannot run here (then layers are timed with torch on the CPU, latency.py).
"""
from __future__ import annotations

import io
import statistics
from collections.abc import Callable

import torch
from torch import nn

from egp_fx.ir.batches import Batch
from egp_fx.runtime.ort import ort_runner, ort_session
from egp_fx.runtime.timing import measure_cell
from egp_fx.runtime.torch_calls import eager_runner

Timer = Callable[[nn.Module, torch.Tensor], float]

REPEATS, WARMUP = 20, 3


def median_seconds(run: Callable[[], object]) -> float:
    """The median of REPEATS timed calls of `run`, after WARMUP, in seconds."""
    (times,) = measure_cell({"layer": run}, REPEATS, WARMUP).values()
    return statistics.median(times) / 1e3


def torch_cpu_timer(module: nn.Module, x: torch.Tensor) -> float:
    return median_seconds(eager_runner(module.eval(), Batch((x,)), cuda=False))


def cuda_timer(module: nn.Module, x: torch.Tensor) -> float:
    module = module.to(device="cuda", dtype=torch.float16).eval()
    batch = Batch((x.to(device="cuda", dtype=torch.float16),))
    return median_seconds(eager_runner(module, batch, cuda=True))


def gpu_missing() -> str | None:
    return None if torch.cuda.is_available() else "no GPU"


def ort_cpu_timer(module: nn.Module, x: torch.Tensor) -> float:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, input_names=["x"])
    session = ort_session(buffer.getvalue(), "CPUExecutionProvider", quiet=True)
    return median_seconds(ort_runner(session, Batch((x,))))
