"""ONNX export with a checked result, in the form that runs fastest: the file is right or not there.

`export_onnx(module, path, example)`:
1. copies the module to CPU in eval mode, sharing its tensors (the caller's model is never
   touched); `example` is a tensor, a tuple of tensors, or a dict of tensors (token inputs: the
   ONNX inputs are then named after the keys, input_ids, attention_mask, ...);
2. exports it with each exporter of torch.onnx (TorchScript and dynamo), or the ones named by
   `exporters=`. The batch axis of every input and output is dynamic unless
   `dynamic_batch=False`, and so is the sequence axis (dim 1) of 2-D keyword inputs
   (`dynamic_sequence`, default: when the inputs are keywords): one description of the inputs
   and their axes (inputs.py) serves both exporters. A graph captured with torch.export has its
   symbolic sizes made visible to the TorchScript exporter first (traced_sizes.py: otherwise the
   example's batch size is baked into its Reshapes). Exporter chatter goes to this module's DEBUG
   log: the parity check below decides whether the trace was right;
3. picks the opset, unless given, as the highest that onnx, onnxruntime and that exporter all
   support (opset.py);
4. runs onnx.checker, then onnxruntime on the example, on the example doubled along the batch
   axis and, with a dynamic sequence, on a shorter sequence; each output must match torch to
   `tolerance` relative to its own scale, or to 10x torch's own float32 rounding noise on it
   where that is larger (parity.py);
5. when more than one exporter passes, times their files side by side on the target (an
   onnxruntime CPU session, latency.py; `timer=` replaces it) at each of `latency_batches`
   (the example's first sample repeated) and keeps the fastest: the smallest mean of
   log(time / best time) over the batch sizes, ties to the earlier exporter. The same graph
   written by the two exporters can differ 2x in speed. `choose="first"` keeps the first that
   passes in the default order instead (TorchScript first for module-level models with
   positional inputs, dynamo first for torch.export captures and keyword inputs), without
   exporting the others;
6. when none passes the file is deleted and ExportError says why for each exporter, naming an
   unsupported operator and the fx node or module that calls it (diagnose.py).
ExportResult records every exporter tried (ExporterTrial: passed or why not, wall time, latency
per batch size), the one kept and why (Choice).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from egp_fx.errors import ExportError
from egp_fx.ir.attrs import CAPTURE_META_KEY
from egp_fx.ir.batches import Batch, as_batch
from egp_fx.ir.compare import tensor_leaves
from egp_fx.ir.copying import moved, structural_copy

from .diagnose import failure_message, summarise
from .inputs import InputSpec
from .latency import TIMERS, Timer
from .opset import default_opset
from .parity import check_parity
from .traced_sizes import traced_sizes

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_TOLERANCE = 1e-4
LATENCY_BATCHES = (1, 32)
DEFAULT_TARGET = "ort-cpu"

__all__ = ["EXPORTERS", "Choice", "ExportError", "ExportResult", "ExporterTrial",
           "default_opset", "export_onnx"]


class Choice(str, Enum):
    """Why the file holds the form it holds."""
    FASTEST = "fastest"             # several exporters passed: the fastest on the target
    ONLY_ONE_PASSED = "only-one-passed"   # the other exporters failed
    ONE_TRIED = "one-tried"         # exporters= named one
    FIRST = "first"                 # choose="first": the first that passed, others not tried
    UNTIMED = "untimed"             # several passed but timing failed: the first in order
    DEFAULT_FORM = "torch-default"  # torch.onnx.export's defaults (default_form.py), no choice


@dataclass
class ExporterTrial:
    exporter: str
    opset: int
    passed: bool
    seconds: float                    # wall time of export + checks
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms per call
    error: str | None = None          # why it failed (passed=False)


@dataclass
class ExportResult:
    path: Path
    opset: int
    exporter: str                     # "torchscript" or "dynamo"
    max_abs_err: float | None         # None when check=False
    max_rel_err: float | None         # per output: max |ort - torch| / max |torch|; the largest
    max_elementwise_rel_err: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    float32_noise: float | None = None   # torch's own float32 noise, when the check needed it
    seconds: float = 0.0              # wall time of the exports, checks and timing
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    trials: list[ExporterTrial] = field(default_factory=list)
    choice: Choice = Choice.ONE_TRIED
    target: str = DEFAULT_TARGET      # where the latencies were measured

    def latency_ms(self, batch_size: int) -> float | None:
        """The kept file's measured ms per call at `batch_size` (None if not timed)."""
        trial = next((t for t in self.trials if t.exporter == self.exporter), None)
        return trial.latency_ms.get(batch_size) if trial else None

    def describe_choice(self) -> str:
        """One line: which exporter, why, and the timings it was chosen by."""
        if self.choice is not Choice.FASTEST:
            failed = "; ".join(f"{t.exporter} failed: {t.error}" for t in self.trials
                               if not t.passed)
            return f"{self.exporter} ({self.choice.value}" + (f"; {failed})" if failed else ")")
        timed = [t for t in self.trials if t.latency_ms]
        sizes = sorted({b for t in timed for b in t.latency_ms})
        per = "; ".join(f"batch {b}: " + ", ".join(f"{t.exporter} {t.latency_ms[b]:.3g} ms"
                                                  for t in timed if b in t.latency_ms)
                        for b in sizes)
        return f"{self.exporter} (fastest on {self.target}: {per})"


class _Flat(nn.Module):
    """The ONNX view of a model: positional tensors in, a tuple of tensors out.

    Positional inputs go to the model as they are; with `keys`, they are its keyword
    arguments. The model's output (tensor, tuple, dict, ModelOutput) is flattened in pytree
    order. This also keeps the TorchScript exporter from appending the defaults of further
    forward() arguments as inputs."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.keys, inputs))) if self.keys else self.model(*inputs)
        return tuple(tensor_leaves(out))


def output_names(out) -> list[str]:
    """ONNX output names: a dict's keys, else "output" / "output_i"."""
    leaves = tensor_leaves(out)
    if isinstance(out, Mapping) and len(out) == len(leaves) and \
            all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out.keys()]
    return ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]


def _captured(model: nn.Module) -> bool:
    info = getattr(model, "meta", {}).get(CAPTURE_META_KEY) if isinstance(model, fx.GraphModule) else None
    return info is not None and info.mode == "export"


def _exporters(model: nn.Module, batch: Batch) -> tuple[str, ...]:
    return ("dynamo", "torchscript") if _captured(model) or batch.kwargs else EXPORTERS


def _widen(batch: Batch) -> Batch:
    """Twice the batch (the second size the dynamic batch axis is checked at)."""
    return batch.map(lambda t: torch.cat([t, t]) if t.dim() else t)


def _shorter(batch: Batch) -> Batch | None:
    """The sequence cut by a third (to check a dynamic sequence axis), or None if too short."""
    lengths = {t.shape[1] for t in batch.kwargs.values() if t.dim() == 2}
    if len(lengths) != 1 or next(iter(lengths)) < 3:
        return None
    n = next(iter(lengths)) - max(1, next(iter(lengths)) // 3)
    return batch.map(lambda t: t[:, :n] if t.dim() == 2 else t)


def _for_torchscript(model: nn.Module) -> nn.Module:
    """The module the TorchScript exporter traces: a torch.export capture's copy with its
    symbolic sizes made traceable (traced_sizes.py); any other module as it is."""
    if not _captured(model):
        return model
    copy_ = structural_copy(model)
    traced_sizes(copy_)
    return copy_


def _export(model: nn.Module, path: Path, batch: Batch, spec: InputSpec, outs: dict[str, int],
            exporter: str, opset: int) -> None:
    """Write `model` to `path` with `exporter`; `outs` maps output names to their dims."""
    names = spec.names()
    chatter = io.StringIO()  # exporters and fx print to stdout/stderr; keep it for the log
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(chatter), \
            contextlib.redirect_stderr(chatter):
        warnings.simplefilter("always")
        if exporter == "torchscript":
            flat = _Flat(_for_torchscript(model), spec.keywords).eval()
            torch.onnx.export(flat, tuple(batch.tensors()), str(path), dynamo=False,
                              opset_version=opset, input_names=names, output_names=list(outs),
                              dynamic_axes=spec.dynamic_axes(outs))
        else:
            flat = _Flat(model, spec.keywords).eval()
            shapes = spec.dynamic_shapes(torch.export.Dim("batch", min=1),
                                         torch.export.Dim("sequence", min=1), flat=True)
            torch.onnx.export(flat, tuple(spec.exportable(batch).tensors()), str(path),
                              dynamo=True, opset_version=opset, input_names=names,
                              output_names=list(outs),
                              dynamic_shapes=(shapes,) if shapes is not None else None,
                              external_data=False, verbose=False, optimize=False)   # (shapes,): *inputs
    for message in sorted({f"{w.category.__name__}: {w.message}" for w in caught}):
        log.debug("%s exporter warned: %s", exporter, message)
    if chatter.getvalue().strip():
        log.debug("%s exporter printed: %s", exporter, chatter.getvalue())


def serving_batch(batch: Batch, size: int) -> Batch:
    """`size` copies of the example's first sample (what the latency is measured on)."""
    return batch.head(1).map(lambda t: t.repeat(size, *([1] * (t.dim() - 1))) if t.dim() else t)


def _fastest(timings: dict[int, dict[str, float]], order: Sequence[str]) -> str:
    """The exporter with the smallest mean of log(time / best time) over the batch sizes;
    ties to the earlier one in `order`."""
    def score(exporter: str) -> float:
        return sum(math.log(t[exporter] / min(t.values())) for t in timings.values()) \
            / len(timings)
    return min(order, key=lambda e: (round(score(e), 12), order.index(e)))


def _time(files: dict[str, Path], batch: Batch, spec: InputSpec, timer: Timer,
          sizes: Sequence[int]) -> dict[int, dict[str, float]]:
    """batch size -> exporter -> ms per call, measured by `timer`."""
    sizes = [s for s in dict.fromkeys(sizes)] if spec.dynamic_batch else [batch.size]
    out = {}
    for size in sizes:
        feed = serving_batch(batch, size) if spec.dynamic_batch else batch
        seconds = timer(files, feed, spec.names())
        out[size] = {e: 1e3 * float(seconds[e]) for e in files}
    return out


def example_batch(example_inputs) -> Batch:
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping, Batch)) or (
            isinstance(example_inputs, (tuple, list)) and not all(
                isinstance(t, torch.Tensor) for t in example_inputs)):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of tensors")
    return (Batch(tuple(example_inputs)) if isinstance(example_inputs, (tuple, list))
            else as_batch(example_inputs)).map(lambda t: t.detach().cpu())


def export_onnx(module: nn.Module, path: str | Path, example_inputs: Any, *,
                dynamic_batch: bool = True, dynamic_sequence: bool | None = None,
                opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                check: bool = True, exporters: Sequence[str] | None = None,
                choose: str = "latency", timer: Timer | None = None,
                latency_batches: Sequence[int] = LATENCY_BATCHES) -> ExportResult:
    """Export `module` (an nn.Module or fx.GraphModule) to `path`, checked against torch, in
    the fastest form on the target; see the module docstring.

    `example_inputs` is a tensor, a tuple of tensors or a dict of tensors, batch axis first.
    `choose` is "latency" (time every exporter that passes, keep the fastest) or "first";
    `timer(paths, batch, input_names) -> {exporter: seconds}` replaces the onnxruntime CPU
    timer. Raises ExportError (and leaves no file at `path`) when no exporter produces a model
    that passes the checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = example_batch(example_inputs)
    if exporters is not None and (not exporters or any(e not in EXPORTERS for e in exporters)):
        raise ValueError(f"exporters must be a non-empty subset of {EXPORTERS}, got {exporters}")
    if choose not in ("latency", "first"):
        raise ValueError(f"choose must be 'latency' or 'first', got {choose!r}")
    spec = InputSpec.of(batch, dynamic_batch, dynamic_sequence)
    model = moved(structural_copy(module), "cpu").eval()
    with torch.no_grad():
        out = batch(model)
    outs = dict(zip(output_names(out), (t.dim() for t in tensor_leaves(out))))
    checks = [batch] + ([_widen(batch)] if dynamic_batch else []) + (
        [s] if spec.dynamic_sequence and (s := _shorter(batch)) is not None else [])

    def reference(b: Batch) -> list[torch.Tensor]:
        with torch.no_grad():
            return tensor_leaves(b(model))

    exact: list[nn.Module] = []

    def reference64(b: Batch) -> list[torch.Tensor]:
        """The module in float64 (a copy made on first use), for parity's noise floor."""
        if not exact:
            exact.append(moved(structural_copy(model), dtype=torch.float64).eval())
        with torch.no_grad():
            return tensor_leaves(b.to(dtype=torch.float64)(exact[0]))

    start = time.perf_counter()
    order = tuple(dict.fromkeys(exporters)) if exporters else _exporters(module, batch)
    trials: list[ExporterTrial] = []
    parities: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".egp_export_") as tmp:
        files: dict[str, Path] = {}
        for exporter in order:
            t0 = time.perf_counter()
            chosen = opset if opset is not None else default_opset(exporter)
            candidate = Path(tmp) / f"{exporter}.onnx"
            model.eval()  # whatever an earlier attempt left behind
            try:
                _export(model, candidate, batch, spec, outs, exporter, chosen)
                parities[exporter] = check_parity(candidate, reference, checks, spec.names(),
                                                  tolerance, reference64) if check else None
            except Exception as exc:  # any exporter/checker failure: record it, try the next one
                candidate.unlink(missing_ok=True)
                trials.append(ExporterTrial(exporter, chosen, False, time.perf_counter() - t0,
                                            error=summarise(exc)))
                log.info("ONNX export with %s failed: %s", exporter, trials[-1].error)
                continue
            files[exporter] = candidate
            trials.append(ExporterTrial(exporter, chosen, True, time.perf_counter() - t0))
            if choose == "first":
                break
        if not files:
            path.unlink(missing_ok=True)
            raise ExportError(failure_message(model, batch, path,
                                              {t.exporter: t.error for t in trials}))
        kept, choice = _choose(files, trials, order, batch, spec, choose, timer, latency_batches)
        os.replace(files[kept], path)
    parity = parities[kept]
    trial = next(t for t in trials if t.exporter == kept)
    result = ExportResult(path, trial.opset, kept,
                          parity.max_abs_err if parity else None,
                          parity.max_rel_err if parity else None,
                          parity.max_elementwise_rel_err if parity else None, tolerance,
                          parity.float32_noise if parity else None,
                          time.perf_counter() - start, spec.names(), list(outs), trials, choice)
    log.info("exported %s (opset %d, %s, %.2fs): max abs err %s, relative to the output "
             "scale %s", path, trial.opset, result.describe_choice(), result.seconds,
             result.max_abs_err, result.max_rel_err)
    return result


def _choose(files: dict[str, Path], trials: list[ExporterTrial], order: Sequence[str],
            batch: Batch, spec: InputSpec, choose: str, timer: Timer | None,
            sizes: Sequence[int]) -> tuple[str, Choice]:
    """(the exporter whose file is kept, why); fills in the trials' latencies."""
    first = next(e for e in order if e in files)
    if len(files) == 1:
        choice = Choice.FIRST if choose == "first" else (
            Choice.ONE_TRIED if len(order) == 1 else Choice.ONLY_ONE_PASSED)
        return first, choice
    try:
        timings = _time(files, batch, spec, timer or TIMERS[DEFAULT_TARGET], sizes)
    except Exception as exc:  # noqa: BLE001  (a runtime that cannot run a size: keep the first)
        log.warning("could not time the exported forms (%s: %s); keeping %s", type(exc).__name__,
                    exc, first)
        return first, Choice.UNTIMED
    for trial in trials:
        if trial.exporter in files:
            trial.latency_ms = {size: t[trial.exporter] for size, t in timings.items()}
    return _fastest(timings, [e for e in order if e in files]), Choice.FASTEST
