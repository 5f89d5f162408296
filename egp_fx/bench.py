"""Latency benchmark of several models, measured side by side in one process.

Method
- A cell is one (backend, variant, batch size). In a cell every model gets a runner (an ONNX
  Runtime session, an eager module, or a captured CUDA graph), `warmup` calls each, then `repeats`
  rounds in which each model runs once, in turn (round-robin). Drifts of the machine (clock
  frequency, other load, thermal state) thus hit all models alike. A row reports the median and
  the 90th percentile of the per-call times, in milliseconds, and the speedup
  median(first model) / median(this model) within the same cell: the first model is the original.
- Timing: time.perf_counter around one synchronous call. onnxruntime's run() returns when the
  outputs are ready; torch CUDA calls end with torch.cuda.synchronize() (what
  torch.utils.benchmark.Timer does), so a row is wall time per call, launch overheads included.
- ort-cpu: CPUExecutionProvider, intra-op threads `threads` (None: onnxruntime's default, one per
  physical core), sequential execution, graph optimisation level `ort_optimization` (default
  "all" = ORT_ENABLE_ALL). With several models interleaved their thread pools would spin against
  each other, so "session.intra_op.allow_spinning" is "0" unless `spinning` says otherwise; the
  setting is recorded. `save_ort_optimized=True` keeps ORT's optimised graph next to each export.
- ort-cuda: CUDAExecutionProvider with numpy inputs (host<->device copies are part of the time);
  skipped, with the reason recorded, when the provider is not installed.
- torch-cpu / torch-cuda: variants "fp32", "fp16", each optionally "+cudagraph" (CUDA only):
  the module is deep-copied, cast, and for CUDA graphs captured once per batch size after a
  warm-up on a side stream (torch.cuda.graphs); a call is then one graph replay.
- Size figures come from egp_fx.measures.measure at batch 1 (params, FlopCounterMode FLOPs,
  weighted layers and nonlinear activations on the longest path); models given as .onnx files
  report their initializer count as params and no FLOPs.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import json
import logging
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import numpy as np
import torch
from torch import nn

from .export import ExportError, export_onnx

log = logging.getLogger(__name__)

BACKENDS = ("ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda")
TORCH_VARIANTS = ("fp32", "fp32+cudagraph", "fp16", "fp16+cudagraph")
ModelLike = Union[nn.Module, str, os.PathLike]


@dataclass
class BenchRow:
    model: str
    backend: str
    variant: str
    batch_size: int
    median_ms: float
    p90_ms: float
    params: int | None
    flops: int | None                      # at batch 1
    layers_on_longest_path: int | None     # conv/linear layers
    nonlinear_on_longest_path: int | None
    speedup: float | None                  # vs the first model, same backend/variant/batch


@dataclass
class BenchResult:
    rows: list[BenchRow]
    environment: dict
    settings: dict
    skipped: list[dict] = field(default_factory=list)   # {"model", "backend", "variant", "reason"}
    files: dict[str, str] = field(default_factory=dict)  # ONNX files kept (workdir given)

    def to_dict(self) -> dict:
        return {"environment": self.environment, "settings": self.settings,
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped,
                "files": self.files}

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_markdown(self, *, header: bool = True) -> str:
        """The table; with `header`, preceded by the machine, software and settings."""
        env = self.environment
        lines = [f"Machine: {env['cpu_model']} ({env['logical_cpus']} logical CPUs, load average "
                 f"{env['load_average_1_5_15min'][0]} at the start)"
                 + (f", GPU {env['gpu']}" if env.get("gpu") else ""),
                 f"Software: python {env['python']}, torch {env['torch']}, onnxruntime "
                 f"{env['onnxruntime']}, onnx {env['onnx']}; {env['date']}"] if header else []
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), "",
                  "| model | backend | variant | batch | median ms | p90 ms | speedup | params "
                  "| GFLOPs (batch 1) | layers on longest path |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            speedup = f"{r.speedup:.3f}x" if r.speedup is not None else "-"
            gflops = f"{r.flops / 1e9:.4g}" if r.flops is not None else "-"
            lines.append(f"| {r.model} | {r.backend} | {r.variant} | {r.batch_size} | "
                         f"{r.median_ms:.3f} | {r.p90_ms:.3f} | {speedup} | {_or_dash(r.params)} | "
                         f"{gflops} | {_or_dash(r.layers_on_longest_path)} |")
        if self.skipped:
            lines += ["", "Skipped:"]
            lines += [f"- {s['model']} {s['backend']} {s['variant']}: {s['reason']}"
                      for s in self.skipped]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: one panel per backend/variant (row) and batch size (column), each with its own
        scale; a bar per model at the median latency, its whisker reaching the p90."""
        from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

        panels = list(dict.fromkeys((r.backend, r.variant) for r in self.rows))
        batches = sorted({r.batch_size for r in self.rows})
        models = list(dict.fromkeys(r.model for r in self.rows))
        colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
        fig = Figure(figsize=(1.2 + 0.9 * len(models) * max(len(batches), 1),
                              2.8 * max(len(panels), 1)), layout="constrained")
        axes = fig.subplots(max(len(panels), 1), max(len(batches), 1), squeeze=False)
        for (i, (backend, variant)), (j, batch) in itertools.product(enumerate(panels),
                                                                       enumerate(batches)):
            ax = axes[i][j]
            rows = [r for r in self.rows if (r.backend, r.variant, r.batch_size) ==
                    (backend, variant, batch)]
            med = [r.median_ms for r in rows]
            ax.bar(range(len(rows)), med, color=[colours[r.model] for r in rows],
                   yerr=[[0.0] * len(rows), [r.p90_ms - r.median_ms for r in rows]], capsize=3)
            ax.set_xticks(range(len(rows)), [r.model for r in rows], rotation=20, fontsize="small")
            ax.set_title(f"{backend} {variant}, batch {batch}", fontsize="medium")
            if j == 0:
                ax.set_ylabel("ms per call")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


# ----------------------------------------------------------------------------- public entry

def benchmark(models: Mapping[str, ModelLike],
              example_inputs: torch.Tensor | Callable[[int], torch.Tensor], *,
              batch_sizes: Iterable[int] = (1,), backends: Iterable[str] = ("ort-cpu",),
              repeats: int = 50, warmup: int = 10, threads: int | None = None,
              workdir: str | os.PathLike | None = None, ort_optimization: str = "all",
              save_ort_optimized: bool = False, spinning: bool | None = None,
              torch_variants: Iterable[str] = TORCH_VARIANTS) -> BenchResult:
    """Measure every model on every backend/variant/batch size, interleaved; see the module doc.

    `models` maps names to nn.Modules (or to .onnx files, ORT backends only); the first entry is
    the reference for the speedup column. `example_inputs` is a batch-1 tensor (repeated to each
    batch size) or a callable batch_size -> tensor.
    """
    backends, batch_sizes = tuple(backends), tuple(batch_sizes)
    _validate(models, backends, batch_sizes, repeats, warmup, ort_optimization, torch_variants)
    env = environment(threads)  # before the run: the load average is the one we ran under
    spin = spinning if spinning is not None else len(models) == 1
    settings = {"repeats": repeats, "warmup": warmup, "batch_sizes": list(batch_sizes),
                "order": "round-robin", "threads": threads if threads is not None else "default"}
    if any(b.startswith("ort") for b in backends):
        settings.update(ort_allow_spinning=int(spin), ort_optimization=ort_optimization)
    make_input = _input_maker(example_inputs)
    sizes = {name: _sizes(m, make_input(1)) for name, m in models.items()}
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="egp_bench_") as tmp:
        plan = _Plan(models, make_input, batch_sizes, Path(workdir or tmp), threads,
                     ort_optimization, save_ort_optimized, spin, tuple(torch_variants))
        for backend in backends:
            for variant, cells in plan.cells(backend):
                for batch, runners in cells:
                    with _torch_threads(threads if backend == "torch-cpu" else None):
                        times = _measure_cell(runners, repeats, warmup)
                    rows += _rows(times, backend, variant, batch, sizes)
    files = plan.files if workdir is not None else {}
    return BenchResult(rows, env, settings, plan.skipped, files)


def _validate(models, backends, batch_sizes, repeats, warmup, ort_optimization, variants):
    if not models:
        raise ValueError("benchmark needs at least one model")
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"unknown backends {bad}; choose from {BACKENDS}")
    bad = [v for v in variants if v not in TORCH_VARIANTS]
    if bad:
        raise ValueError(f"unknown torch variants {bad}; choose from {TORCH_VARIANTS}")
    if ort_optimization not in _ORT_LEVEL_NAMES:
        raise ValueError(f"ort_optimization must be one of {tuple(_ORT_LEVEL_NAMES)}")
    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch sizes >= 1")


def _input_maker(example_inputs) -> Callable[[int], torch.Tensor]:
    if callable(example_inputs):
        return example_inputs
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.shape[0] != 1:
        raise ValueError("example_inputs must be a batch-1 tensor or a callable batch -> tensor")
    x = example_inputs.detach().cpu()
    return lambda batch: x.repeat(batch, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------- sizes

def _sizes(model: ModelLike, x: torch.Tensor) -> dict:
    if not isinstance(model, nn.Module):
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
        params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
        return {"params": params, "flops": None, "weighted_depth": None, "nonlinear_depth": None}
    try:
        from .measures import measure

        return measure(model, x).to_dict()
    except Exception as exc:  # noqa: BLE001  (an untraceable model still gets params/FLOPs)
        log.warning("measure() failed (%s); depth left out, params/FLOPs counted directly", exc)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(model).eval()(x)
    return {"params": sum(p.numel() for p in model.parameters()),
            "flops": int(counter.get_total_flops()), "weighted_depth": None,
            "nonlinear_depth": None}


# ----------------------------------------------------------------------------- runners

@dataclass
class _Plan:
    """What to run and how; builds the runners of each cell and records what it skipped."""
    models: Mapping[str, ModelLike]
    make_input: Callable[[int], torch.Tensor]
    batch_sizes: tuple[int, ...]
    folder: Path
    threads: int | None
    ort_optimization: str
    save_ort_optimized: bool
    spin: bool
    torch_variants: tuple[str, ...]
    skipped: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def cells(self, backend: str):
        """Yield (variant, iterator of (batch, {model name: runner})) for one backend."""
        reason = _unavailable(backend)
        if reason:
            self.skip("*", backend, "*", reason)
        elif backend.startswith("ort"):
            sessions = self.ort_sessions(backend)
            if sessions:
                yield f"opt-{self.ort_optimization}", (
                    (b, {n: _ort_runner(s, self.make_input(b)) for n, s in sessions.items()})
                    for b in self.batch_sizes)
        else:
            for variant in self.torch_variants:
                if backend == "torch-cpu" and "cudagraph" in variant:
                    self.skip("*", backend, variant, "CUDA graphs need a GPU")
                    continue
                modules = {}
                for name, model in self.models.items():
                    if isinstance(model, nn.Module):
                        modules[name] = _torch_copy(model, backend, variant)
                    else:
                        self.skip(name, backend, variant, "given as an ONNX file")
                if modules:
                    yield variant, self.torch_cells(modules, backend, variant)

    def skip(self, model: str, backend: str, variant: str, reason: str) -> None:
        log.warning("skipping %s on %s %s: %s", model, backend, variant, reason)
        self.skipped.append({"model": model, "backend": backend, "variant": variant,
                             "reason": reason})

    def ort_sessions(self, backend: str) -> dict:
        import onnxruntime as ort

        level = self.ort_optimization
        provider = "CUDAExecutionProvider" if backend == "ort-cuda" else "CPUExecutionProvider"
        sessions = {}
        for name in self.models:
            onnx_path = self.onnx_file(name, backend)
            if onnx_path is None:
                continue
            options = ort.SessionOptions()
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                       _ORT_LEVEL_NAMES[level])
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = self.threads or 0
            options.add_session_config_entry("session.intra_op.allow_spinning",
                                             str(int(self.spin)))
            if self.save_ort_optimized:
                optimized = onnx_path.with_name(f"{onnx_path.stem}.ort-{level}.onnx")
                options.optimized_model_filepath = str(optimized)
                self.files[f"{name} (ort-{level})"] = str(optimized)
            sessions[name] = ort.InferenceSession(str(onnx_path), options, providers=[provider])
        return sessions

    def onnx_file(self, name: str, backend: str) -> Path | None:
        """The model's ONNX file: given, exported earlier in this run, or exported now."""
        model = self.models[name]
        if not isinstance(model, nn.Module):
            return Path(model)
        if name in self.files:
            return Path(self.files[name])
        path = self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.onnx"
        try:
            export_onnx(model, path, self.make_input(1))
        except ExportError as exc:
            self.skip(name, backend, "*", " ".join(str(exc).splitlines()[:2]))
            return None
        self.files[name] = str(path)
        return path

    def torch_cells(self, modules: dict[str, nn.Module], backend: str, variant: str):
        device = "cuda" if backend == "torch-cuda" else "cpu"
        dtype = torch.float16 if variant.startswith("fp16") else torch.float32
        make = _cuda_graph_runner if "cudagraph" in variant else _eager_runner
        for batch in self.batch_sizes:
            x = self.make_input(batch).to(device=device, dtype=dtype)
            runners = {}
            for name, module in modules.items():
                try:  # a model that cannot run this variant (dtype, capture) must not end the run
                    runners[name] = make(module, x)
                    runners[name]()
                except Exception as exc:  # noqa: BLE001
                    self.skip(name, backend, f"{variant} batch {batch}",
                              f"{type(exc).__name__}: {exc}")
                    runners.pop(name, None)
            if runners:
                yield batch, runners


_ORT_LEVEL_NAMES = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                    "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _unavailable(backend: str) -> str | None:
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if backend == "torch-cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU)"
    return None


def _ort_runner(session, x: torch.Tensor) -> Callable[[], object]:
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _torch_copy(model: nn.Module, backend: str, variant: str) -> nn.Module:
    device = "cuda" if backend == "torch-cuda" else "cpu"
    dtype = torch.float16 if variant.startswith("fp16") else torch.float32
    return copy.deepcopy(model).eval().to(device=device, dtype=dtype)


def _eager_runner(module: nn.Module, x: torch.Tensor):
    cuda = x.is_cuda

    def run():
        with torch.inference_mode():
            out = module(x)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run


def _cuda_graph_runner(module: nn.Module, x: torch.Tensor):
    static_in = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (cuDNN autotuning, lazy init)
            module(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = module(static_in)

    def run():
        graph.replay()
        torch.cuda.synchronize()
        return static_out

    return run


# ----------------------------------------------------------------------------- timing

@contextlib.contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_cell(runners: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list]:
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


def _rows(times: dict[str, list[float]], backend: str, variant: str, batch: int,
          sizes: dict[str, dict]) -> list[BenchRow]:
    medians = {name: float(np.median(t)) for name, t in times.items()}
    reference = next(iter(sizes))
    rows = []
    for name, t in times.items():
        size = sizes[name]
        speedup = medians[reference] / medians[name] if reference in medians else None
        rows.append(BenchRow(name, backend, variant, batch, medians[name],
                             float(np.percentile(t, 90)), size["params"], size["flops"],
                             size["weighted_depth"], size["nonlinear_depth"], speedup))
        log.info("%s %s %s batch %d: median %.3f ms", name, backend, variant, batch,
                 medians[name])
    return rows


# ----------------------------------------------------------------------------- environment

def environment(threads: int | None = None) -> dict:
    """What the numbers depend on: versions, CPU, GPU, threads, date."""
    import onnx
    import onnxruntime as ort

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
           "ort_providers": ort.get_available_providers(), "cpu_model": _cpu_model(),
           "logical_cpus": os.cpu_count(), "threads": threads if threads is not None else
           "default", "torch_threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
