"""ONNX export with a checked result: the file is either right or not there.

`export_onnx(module, path, example)`:
1. copies the module to CPU in eval mode, sharing its tensors (the caller's model is never
   touched); `example` is a tensor, a tuple of tensors, or a dict of tensors (token inputs: the
   ONNX inputs are then named after the keys, input_ids, attention_mask, ...);
2. exports it with the exporters of torch.onnx in turn. Default order: TorchScript first for
   module-level models with positional inputs (5-10x faster there on torch 2.14, and in every
   torch egp_fx supports), the dynamo exporter first for graphs captured with torch.export and
   for keyword inputs. The batch axis of every input and output is dynamic unless
   `dynamic_batch=False`, and so is the sequence axis (dim 1) of 2-D keyword inputs
   (`dynamic_sequence`, default: when the inputs are keywords). Exporter chatter goes to this
   module's DEBUG log: the parity check below decides whether the trace was right;
3. picks the opset, unless given, as the highest that onnx, onnxruntime and that exporter all
   support (opset.py);
4. runs onnx.checker, then onnxruntime on the example, on the example doubled along the batch
   axis and, with a dynamic sequence, on a shorter sequence; each output must match torch to
   `tolerance` relative to its own scale, or to 10x torch's own float32 rounding noise on it
   where that is larger (parity.py);
5. on any failure tries the next exporter; when none succeeds the file is deleted and
   ExportError says why for each exporter, naming an unsupported operator and the fx node or
   module that calls it (diagnose.py).
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
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
from .opset import default_opset
from .parity import check_parity

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_TOLERANCE = 1e-4

__all__ = ["EXPORTERS", "ExportError", "ExportResult", "default_opset", "export_onnx"]


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
    seconds: float = 0.0              # wall time of export + checks
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


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


def _names(batch: Batch, out, model: nn.Module) -> tuple[list[str], list[str]]:
    ins = list(batch.kwargs) if batch.kwargs else (
        ["input"] if len(batch.args) == 1 else [f"input_{i}" for i in range(len(batch.args))])
    leaves = tensor_leaves(out)
    if isinstance(out, Mapping) and len(out) == len(leaves) and \
            all(isinstance(v, torch.Tensor) for v in out.values()):
        outs = [str(k) for k in out.keys()]
    else:
        outs = ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]
    return ins, outs


def _exporters(model: nn.Module, batch: Batch) -> tuple[str, ...]:
    info = getattr(model, "meta", {}).get(CAPTURE_META_KEY) if isinstance(model, fx.GraphModule) else None
    aten = info is not None and info.mode == "export"
    return ("dynamo", "torchscript") if aten or batch.kwargs else EXPORTERS


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


def _axes(batch: Batch, names, outs, n_out_dims, dynamic_batch, dynamic_sequence) -> dict | None:
    if not dynamic_batch and not dynamic_sequence:
        return None
    axes = {}
    for name, t in zip(names, batch.tensors()):
        dims = {0: "batch"} if dynamic_batch and t.dim() else {}
        if dynamic_sequence and t.dim() == 2:
            dims[1] = "sequence"
        axes[name] = dims
    for name, nd in zip(outs, n_out_dims):
        dims = {0: "batch"} if dynamic_batch and nd else {}
        if dynamic_sequence and nd >= 2:
            dims[1] = "sequence"
        axes[name] = dims
    return axes


def _export(model: nn.Module, path: Path, batch: Batch, names, outs, out_dims, exporter: str,
            opset: int, dynamic_batch: bool, dynamic_sequence: bool) -> None:
    flat = _Flat(model, tuple(batch.kwargs)).eval()
    args = tuple(batch.tensors())
    chatter = io.StringIO()  # exporters and fx print to stdout/stderr; keep it for the log
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(chatter), \
            contextlib.redirect_stderr(chatter):
        warnings.simplefilter("always")
        if exporter == "torchscript":
            torch.onnx.export(flat, args, str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=outs,
                              dynamic_axes=_axes(batch, names, outs, out_dims, dynamic_batch,
                                                 dynamic_sequence))
        else:
            if dynamic_batch and batch.size == 1:   # export specialises a size-1 dimension
                args = tuple(_widen(batch).tensors())
            batch_dim = torch.export.Dim("batch", min=1)
            seq_dim = torch.export.Dim("sequence", min=1)
            shapes = tuple(({0: batch_dim} if dynamic_batch and t.dim() else {})
                           | ({1: seq_dim} if dynamic_sequence and t.dim() == 2 else {})
                           for t in args) if dynamic_batch or dynamic_sequence else None
            torch.onnx.export(flat, args, str(path), dynamo=True, opset_version=opset,
                              input_names=names, output_names=outs,
                              dynamic_shapes=(shapes,) if shapes is not None else None,
                              external_data=False, verbose=False, optimize=False)   # (shapes,): *inputs
    for message in sorted({f"{w.category.__name__}: {w.message}" for w in caught}):
        log.debug("%s exporter warned: %s", exporter, message)
    if chatter.getvalue().strip():
        log.debug("%s exporter printed: %s", exporter, chatter.getvalue())


def export_onnx(module: nn.Module, path: str | Path, example_inputs: Any, *,
                dynamic_batch: bool = True, dynamic_sequence: bool | None = None,
                opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
                check: bool = True, exporters: Sequence[str] | None = None) -> ExportResult:
    """Export `module` (an nn.Module or fx.GraphModule) to `path` and check it against torch.

    `example_inputs` is a tensor, a tuple of tensors or a dict of tensors, batch axis first.
    Raises ExportError (and leaves no file at `path`) when no exporter produces a model that
    passes the checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping, Batch)) or (
            isinstance(example_inputs, (tuple, list)) and not all(
                isinstance(t, torch.Tensor) for t in example_inputs)):
        raise TypeError("example_inputs must be a tensor, a tuple of tensors or a dict of tensors")
    batch = (Batch(tuple(example_inputs)) if isinstance(example_inputs, (tuple, list))
             else as_batch(example_inputs)).map(lambda t: t.detach().cpu())
    if exporters is not None and (not exporters or any(e not in EXPORTERS for e in exporters)):
        raise ValueError(f"exporters must be a non-empty subset of {EXPORTERS}, got {exporters}")
    dynamic_sequence = bool(batch.kwargs) if dynamic_sequence is None else dynamic_sequence
    model = moved(structural_copy(module), "cpu").eval()
    with torch.no_grad():
        out = batch(model)
    names, outs = _names(batch, out, model)
    out_dims = [t.dim() for t in tensor_leaves(out)]
    checks = [batch] + ([_widen(batch)] if dynamic_batch else []) + (
        [s] if dynamic_sequence and (s := _shorter(batch)) is not None else [])

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

    failures: dict[str, str] = {}
    for exporter in exporters or _exporters(module, batch):
        start = time.perf_counter()
        chosen = opset if opset is not None else default_opset(exporter)
        model.eval()  # whatever an earlier attempt left behind
        try:
            _export(model, path, batch, names, outs, out_dims, exporter, chosen, dynamic_batch,
                    dynamic_sequence)
            parity = check_parity(path, reference, checks, names, tolerance,
                                  reference64) if check else None
        except Exception as exc:  # any exporter/checker failure: record it, try the next one
            path.unlink(missing_ok=True)
            failures[exporter] = summarise(exc)
            log.info("ONNX export with %s failed: %s", exporter, failures[exporter])
            continue
        result = ExportResult(path, chosen, exporter,
                              parity.max_abs_err if parity else None,
                              parity.max_rel_err if parity else None,
                              parity.max_elementwise_rel_err if parity else None, tolerance,
                              parity.float32_noise if parity else None,
                              time.perf_counter() - start, names, outs)
        log.info("exported %s (opset %d, %s, %.2fs): max abs err %s, relative to the output "
                 "scale %s", path, chosen, exporter, result.seconds, result.max_abs_err,
                 result.max_rel_err)
        return result
    raise ExportError(failure_message(model, batch, path, failures))
