"""Latency benchmark of several models, measured side by side in one process.

    benchmark(models, example_inputs, backends=("ort-cpu", ...), batch_sizes=(1, 32), ...)

- A cell is one (backend, variant, batch size); in a cell the models are timed round-robin
  (egp_fx.runtime.timing), and each row (rows.py) reports the median and the 90th percentile
  of the per-call times in milliseconds, and the speedup median(baseline) / median(this model),
  the baseline being the first model in the same cell (the row names it and how it was
  prepared).
- Backends (registry.py, one class each): ort-cpu, ort-cuda (ort_backend.py), torch-cpu,
  torch-cuda (torch_backend.py: eager, CUDA graphs, torch.compile; every model with its
  BatchNorm folded, deploy.py). Sessions and calls are egp_fx.runtime's, shared with
  compress's latency cost. Each backend has its own Settings (a dataclass), filled from
  benchmark()'s keyword options. Adding one: a class with @register_backend in one file, and
  its import below.
- Results: result.py (JSON, markdown, PNG); the machine they ran on: environment.py.
"""
from . import ort_backend, torch_backend  # noqa: F401  (register the backends)
from .deploy import deployable
from .environment import environment
from .registry import BACKENDS, Backend, Prepared, Skip, register_backend
from .result import BenchResult, BenchRow
from .run import benchmark
from .torch_backend import DEFAULT_TORCH_VARIANTS, TORCH_VARIANTS

__all__ = ["BACKENDS", "Backend", "BenchResult", "BenchRow", "DEFAULT_TORCH_VARIANTS", "Prepared",
           "Skip", "TORCH_VARIANTS", "benchmark", "deployable", "environment",
           "register_backend"]
