"""ONNX export with a checked result: the file is either right or not there.

`export_onnx(module, path, example_inputs)`:
1. deep-copies the module to CPU in eval mode (the caller's model is never touched);
2. exports it with the exporters of torch.onnx in turn (`exporters`, default TorchScript first:
   on ResNet-18 / ViT-tiny it is 5-10x faster than the torch.export path on torch 2.14, and it
   exists in every torch egp_fx supports; the dynamo path is the fallback). The batch axis of
   every input and output is dynamic unless `dynamic_batch=False`. The TorchScript exporter's
   DeprecationWarning ("legacy TorchScript-based ONNX export", torch >= 2.9) and its
   TracerWarnings, and what either exporter prints, go to this module's DEBUG log: the parity
   check below is what decides whether the trace was right;
3. picks the opset, unless given, as the highest that onnx, onnxruntime and that exporter all
   support (onnxruntime is probed with a one-node model: it refuses opsets it does not know);
4. runs onnx.checker, then onnxruntime (CPUExecutionProvider) on the example inputs and, with a
   dynamic batch, on the inputs repeated twice along the batch axis. An element passes when
   |ort - torch| <= atol + rtol * |torch| (torch.allclose's rule). The errors are logged;
5. on any failure tries the next exporter; when none succeeds the file is deleted and ExportError
   says why for each exporter. An unsupported operator is named, with the fx node or the module
   that calls it (found by running the model once under a dispatch mode that records aten ops).

max_rel_err is max |ort - torch| / max(|torch|, atol): elements far below atol count against atol.
"""
from __future__ import annotations

import copy
import functools
import io
import logging
import contextlib
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import EGPError, ExportError

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")



@dataclass
class ExportResult:
    path: Path
    opset: int
    exporter: str                 # "torchscript" or "dynamo"
    max_abs_err: float | None     # None when check=False
    max_rel_err: float | None
    seconds: float = 0.0          # wall time of export + checks


def export_onnx(module: nn.Module, path: str | Path, example_inputs: Any, *,
                dynamic_batch: bool = True, opset: int | None = None, rtol: float = 1e-4,
                atol: float = 1e-5, check: bool = True,
                exporters: Sequence[str] = EXPORTERS) -> ExportResult:
    """Export `module` (an nn.Module or fx.GraphModule) to `path` and check it against torch.

    `example_inputs` is a tensor or a tuple of tensors, batch axis first. Raises ExportError
    (and leaves no file at `path`) when no exporter produces a model that passes the checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = _as_tuple(example_inputs)
    model = copy.deepcopy(module).cpu().eval()
    unknown = [e for e in exporters if e not in EXPORTERS]
    if unknown or not exporters:
        raise ValueError(f"exporters must be a non-empty subset of {EXPORTERS}, got {exporters}")
    with torch.no_grad():
        reference = [t.numpy() for t in _flatten(model(*inputs))]
    failures: dict[str, str] = {}
    for exporter in exporters:
        start = time.perf_counter()
        chosen = opset if opset is not None else default_opset(exporter)
        model.eval()  # whatever an earlier attempt left behind
        try:
            _export(model, path, inputs, len(reference), exporter, chosen, dynamic_batch)
            errors = _check(model, path, inputs, reference, dynamic_batch, rtol, atol) \
                if check else None
        except Exception as exc:  # any exporter/checker failure: record it, try the next one
            path.unlink(missing_ok=True)
            failures[exporter] = _summarise(exc)
            log.info("ONNX export with %s failed: %s", exporter, failures[exporter])
            continue
        result = ExportResult(path, chosen, exporter, *(errors or (None, None)),
                              seconds=time.perf_counter() - start)
        log.info("exported %s (opset %d, %s, %.2fs): max abs err %s, max rel err %s",
                 path, chosen, exporter, result.seconds, result.max_abs_err, result.max_rel_err)
        return result
    raise ExportError(_failure_message(model, inputs, path, failures))


class _ParityError(Exception):
    """onnxruntime and torch disagree beyond the tolerance."""


# ----------------------------------------------------------------------------- opset

@functools.lru_cache(maxsize=None)
def _ort_max_opset() -> int:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    options = ort.SessionOptions()
    options.log_severity_level = 4  # probes that fail are expected: keep ORT quiet
    value = helper.make_tensor_value_info
    for version in range(onnx.defs.onnx_opset_version(), 6, -1):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [value("x", TensorProto.FLOAT, [1])],
                                  [value("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)],
                                  ir_version=8)
        try:
            ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001  (ORT raises a generic Fail for an unknown opset)
            continue
        return version
    raise ExportError("onnxruntime accepts no ONNX opset >= 7; is it installed correctly?")


def default_opset(exporter: str) -> int:
    """Highest opset supported by onnx, onnxruntime and torch's `exporter`."""
    import onnx
    from torch.onnx import _constants

    if exporter == "torchscript":
        torch_max = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)
    else:
        torch_max = getattr(_constants, "ONNX_MAX_OPSET", 18)
    return min(onnx.defs.onnx_opset_version(), _ort_max_opset(), torch_max)


# ----------------------------------------------------------------------------- export

def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors")
    return tuple(t.detach().cpu() for t in inputs)


def _names(inputs: tuple, outputs: int) -> tuple[list[str], list[str]]:
    ins = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    outs = ["output"] if outputs == 1 else [f"output_{i}" for i in range(outputs)]
    return ins, outs


class _TensorsOnly(nn.Module):
    """Calls the model with the example tensors only. The TorchScript exporter would otherwise
    append the defaults of further forward() arguments to the inputs and trace them as tensors
    (timm's ViT, once traced by fx, has forward(x, attn_mask=None, is_causal=False))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)


def _export(model: nn.Module, path: Path, inputs: tuple, n_out: int, exporter: str, opset: int,
            dynamic_batch: bool) -> None:
    in_names, out_names = _names(inputs, n_out)
    # eval(): the exporter restores the wrapper's training flag afterwards, recursively
    model = _TensorsOnly(model).eval() if exporter == "torchscript" else model
    chatter = io.StringIO()  # exporters and fx print to stdout/stderr; keep it for the log
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(chatter), \
            contextlib.redirect_stderr(chatter):
        warnings.simplefilter("always")
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
            torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=in_names, output_names=out_names, dynamic_axes=axes)
        else:
            # torch.export may specialise a size-1 dimension: trace a dynamic batch at batch 2
            args = tuple(torch.cat([t, t]) for t in inputs) if dynamic_batch and \
                inputs[0].shape[0] == 1 else inputs
            shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) \
                if dynamic_batch else None
            torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset,
                              input_names=in_names, output_names=out_names,
                              dynamic_shapes=shapes, external_data=False, verbose=False)
    for message in sorted({f"{w.category.__name__}: {w.message}" for w in caught}):
        log.debug("%s exporter warned: %s", exporter, message)
    if chatter.getvalue().strip():
        log.debug("%s exporter printed: %s", exporter, chatter.getvalue())


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _flatten(item)]
    return []


# ----------------------------------------------------------------------------- checks

def _check(model: nn.Module, path: Path, inputs: tuple, reference: list[np.ndarray],
           dynamic_batch: bool, rtol: float, atol: float) -> tuple[float, float]:
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [(inputs, reference)]
    if dynamic_batch:
        doubled = tuple(torch.cat([t, t]) for t in inputs)
        with torch.no_grad():
            batches.append((doubled, [t.numpy() for t in _flatten(model(*doubled))]))
    worst_abs = worst_rel = 0.0
    for batch, want in batches:
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), batch)}
        got = session.run(None, feed)
        if len(got) != len(want):
            raise _ParityError(f"onnxruntime gave {len(got)} outputs, torch {len(want)}")
        for k, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                raise _ParityError(f"output {k} at batch {batch[0].shape[0]}: onnxruntime shape "
                                   f"{g.shape}, torch shape {w.shape}")
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            ref = np.abs(w.astype(np.float64))
            abs_err = float(diff.max(initial=0.0))
            rel_err = float((diff / np.maximum(ref, atol)).max(initial=0.0))
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
            if not np.all(diff <= atol + rtol * ref):
                raise _ParityError(
                    f"output {k} at batch {batch[0].shape[0]} differs from torch beyond "
                    f"rtol={rtol}, atol={atol}: max abs err {abs_err:.3g}, max rel err "
                    f"{rel_err:.3g}")
    return worst_abs, worst_rel


# ----------------------------------------------------------------------------- diagnosis

_OP_PATTERNS = (re.compile(r"operator '(\w+)::(\w+)'"),          # TorchScript exporter
                re.compile(r"OpOverload\(op='(\w+)\.(\w+)'"),     # dynamo exporter
                re.compile(r"target=torch\.ops\.(\w+)\.(\w+)"))


def _summarise(exc: BaseException) -> str:
    """The first line of the two innermost causes of an exporter failure (they name the op)."""
    if isinstance(exc, _ParityError):
        return f"parity check failed: {exc}"
    texts = []
    while exc is not None:
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().split("\n", 1)[0]
        texts.append(f"{type(exc).__name__}: {first_line[:300]}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(reversed(texts[-2:]))  # outer layers only add boilerplate


def _unsupported_op(failures: dict[str, str]) -> str | None:
    for text in failures.values():
        for pattern in _OP_PATTERNS:
            found = pattern.search(text)
            if found:
                return f"{found.group(1)}::{found.group(2)}"
    return None


def _failure_message(model: nn.Module, inputs: tuple, path: Path,
                     failures: dict[str, str]) -> str:
    lines = [f"ONNX export of {type(model).__name__} to {path} failed with every exporter "
             f"({', '.join(failures)}); no file was written."]
    op = _unsupported_op(failures)
    if op is not None:
        where = _locate_op(model, inputs, op)
        lines.insert(1, f"Operator {op} is not supported by the ONNX exporters"
                        + (f"; it is called by {where}." if where else "."))
    lines += [f"  {name}: {why}" for name, why in failures.items()]
    return "\n".join(lines)


class _OpRecorder(TorchDispatchMode):
    def __init__(self, op: str, where: list[str], context: list[str]):
        super().__init__()
        self.op, self.where, self.context = op, where, context

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == self.op and self.context and self.context[-1] not in self.where:
            self.where.append(self.context[-1])
        return func(*args, **(kwargs or {}))


class _NodeTracker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, context: list[str]):
        super().__init__(gm)
        self.context = context

    def run_node(self, n: fx.Node) -> Any:
        self.context.append(f"fx node `{n.format_node()}`")
        try:
            return super().run_node(n)
        finally:
            self.context.pop()


def _locate_op(model: nn.Module, inputs: tuple, op: str) -> str | None:
    """Where `op` is called: the fx node (GraphModule) or the innermost module path."""
    context: list[str] = []
    where: list[str] = []
    handles = []

    def enter(label: str):
        return lambda *_: context.append(label)  # list.append returns None: input unchanged

    def leave(*_) -> None:  # a forward hook must return None or it replaces the output
        context.pop()

    for name, sub in model.named_modules():
        handles.append(sub.register_forward_pre_hook(
            enter(f"module `{name or '<root>'}` ({type(sub).__name__})")))
        handles.append(sub.register_forward_hook(leave))
    try:
        with torch.no_grad(), _OpRecorder(op, where, context):
            if isinstance(model, fx.GraphModule):
                _NodeTracker(model, context).run(*inputs)
            else:
                model(*inputs)
    except Exception:  # noqa: BLE001  (diagnosis is best effort; the export error stands)
        log.debug("could not locate %s in the model", op, exc_info=True)
    finally:
        for handle in handles:
            handle.remove()
    return ", ".join(where[:3]) or None
