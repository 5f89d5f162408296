"""Capture: turn an nn.Module into the fx GraphModule the passes read and rewrite.

    capture(model, example, mode="auto" | "fx" | "export")

- "fx": torch.fx.symbolic_trace (fx_trace.py): module-level graphs.
- "export": torch.export, non-strict (export_trace.py), then canonical.py: aten-level graphs,
  for models with Python control flow that fx cannot follow (Hugging Face transformers).
- "auto": fx first, then torch.export; the report and the log say which capture was used and
  why fx was not.
Either way the caller's model is left as it is: the graph is built on a copy of its module tree
in eval mode that shares its parameters (copying.structural_copy), so nothing is duplicated.
The captured module is checked against the model on the example batch: a capture whose output
differs is never used (no silent change of what the model computes). A model neither capture can
handle raises one TraceError naming both failures.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from egp_fx.errors import CalibrationError, TraceError
from egp_fx.ir.attrs import CAPTURE_META_KEY
from egp_fx.ir.batches import Batch, as_batch
from egp_fx.ir.compare import ErrorMeter, tensor_leaves
from egp_fx.ir.copying import structural_copy
from egp_fx.ir.shapes import call_quietly, failing_node

from .canonical import TRANSPOSED_META_KEY, canonical_modules, canonicalise
from .coverage import COVERAGE_META_KEY, Coverage, Hidden, activation_coverage
from .defaults import fixed_defaults
from .export_trace import export_capture, fixed_keywords
from .fx_trace import (
    LEAF_MODULES,
    fx_capture,
    register_leaf_module,
    register_wrapped_function,
    wrapped_functions,
)

log = logging.getLogger(__name__)

CAPTURES = ("auto", "fx", "export")
CHECK_TOLERANCE = 1e-5      # relative error allowed between the captured graph and the model

__all__ = ["CAPTURES", "COVERAGE_META_KEY", "CaptureInfo", "Coverage", "Hidden", "LEAF_MODULES",
           "activation_coverage", "capture", "capture_info", "coverage_of", "register_leaf_module",
           "register_wrapped_function", "rejected", "trace"]


@dataclass
class CaptureInfo:
    """How a graph was captured (GraphModule.meta["egp_capture"])."""

    mode: str                                  # "fx" or "export"
    prefix: str = ""                           # path prefix of the model's modules in the graph
    fx_failure: str | None = None              # why fx was not used ("auto")
    notes: list[str] = field(default_factory=list)
    check_error: float | None = None           # captured vs model on the example batch
    transposed: list[str] = field(default_factory=list)   # attributes held as the model's .T
    leaves: dict[str, str] = field(default_factory=dict)   # module kept whole -> why
    fixed: dict[str, str] = field(default_factory=dict)    # forward parameter -> repr(value)

    def describe(self) -> str:
        text = f"captured with {'torch.fx' if self.mode == 'fx' else 'torch.export'}"
        if self.fx_failure:
            text += f" (torch.fx could not: {self.fx_failure})"
        if self.fixed:
            text += ("; fixed to their defaults (the batches do not supply them): "
                     + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text

    def to_dict(self) -> dict:
        return {"mode": self.mode, "fx_failure": self.fx_failure, "notes": list(self.notes),
                "check_error": self.check_error, "leaves": dict(self.leaves),
                "fixed": dict(self.fixed)}


def capture_info(gm: fx.GraphModule) -> CaptureInfo | None:
    return getattr(gm, "meta", {}).get(CAPTURE_META_KEY)


def coverage_of(gm: fx.GraphModule, example: Batch, analysed: set[str],
                reasons: dict[str, str] | None = None) -> Coverage | None:
    """Activation calls of `gm` that run on `example` and those of `analysed` (coverage.py),
    with the reasons the capture recorded and `reasons` (activation node -> why calibration
    does not observe it); None (and a warning) when the count cannot run."""
    info = capture_info(gm)
    try:
        return activation_coverage(gm, example, analysed, leaves=info.leaves if info else {},
                                   functions=wrapped_functions(), reasons=reasons)
    except Exception as err:  # noqa: BLE001  (a diagnostic must not stop calibration)
        log.warning("could not count the activation calls that run (%s: %s)",
                    type(err).__name__, err)
        return None


def rejected(index: int, batch: Batch, err: BaseException, where: str | None = None) -> str:
    """The message for a batch the model does not accept."""
    text = (f"batch {index} (inputs {batch.describe()}) was rejected by the model"
            + (f" at node {where}" if where else "") + f": {type(err).__name__}: {err}")
    if batch.kwargs and isinstance(err, TypeError) and "argument" in str(err):
        text += (" (a dict batch is passed as keyword arguments, model(**batch); pass "
                 "input_key= to use one entry as the input)")
    return text


def _reference(root: nn.Module, example: Batch, gm: fx.GraphModule | None) -> list:
    """The model's own outputs on the example; CalibrationError when it rejects the batch."""
    call = Batch(example.args, {**example.kwargs, **fixed_keywords(root)}) \
        if example.kwargs else example
    try:
        with torch.no_grad():
            return tensor_leaves(call(root))
    except Exception as err:
        where = failing_node(gm, example) if gm is not None else None
        raise CalibrationError(rejected(0, example, err, where)) from err


def _check(gm: fx.GraphModule, reference: list, example: Batch) -> float:
    meter = ErrorMeter()
    with torch.no_grad():
        meter.add(tensor_leaves(call_quietly(gm, example)), reference)
    return meter.error


def _try_fx(root, plain, example, leaf_modules, fixed
            ) -> tuple[fx.GraphModule | None, str | None, float | None]:
    concrete = {**fixed, **fixed_keywords(root)} if example is not None and example.kwargs \
        else fixed
    try:
        gm, leaves = fx_capture(root, leaf_modules, concrete)
    except TraceError as err:
        if example is not None:
            _reference(plain, example, None)   # a batch the model rejects is the data's fault
        return None, str(err), None
    gm.meta[CAPTURE_META_KEY] = CaptureInfo("fx", leaves=leaves)
    if example is None:
        return gm, None, None
    reference = _reference(plain, example, gm)
    try:
        err = _check(gm, reference, example)
    except Exception as exc:  # noqa: BLE001  (a traced graph that cannot run is a failed capture)
        return None, f"the fx graph fails on the example batch: {type(exc).__name__}: {exc}", None
    if err > CHECK_TOLERANCE:
        return None, f"the fx graph's output differs from the model's (relative error {err:.3g})", err
    return gm, None, err


def _try_export(root, plain, example) -> tuple[fx.GraphModule | None, str | None, CaptureInfo | None]:
    if example is None:
        return None, "torch.export needs an example batch (pass calibration data)", None
    try:
        gm, prefix, notes = export_capture(root, example)
    except TraceError as err:
        return None, str(err), None
    notes += canonicalise(gm)
    try:
        err = _check(gm, _reference(plain, example, None), example)
    except Exception as exc:  # noqa: BLE001
        return None, f"the exported graph fails on the example batch: {type(exc).__name__}: {exc}", None
    if err > CHECK_TOLERANCE:
        return None, f"the exported graph's output differs from the model's (relative error {err:.3g})", None
    return gm, None, CaptureInfo("export", prefix, None, notes, err,
                                 gm.meta.pop(TRANSPOSED_META_KEY, []))


def capture(model: nn.Module, example: Batch | None = None, *, mode: str = "auto",
            leaf_modules: dict[type, str] | None = None) -> fx.GraphModule:
    """Capture `model` as a GraphModule in eval mode (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"capture expects an nn.Module, got {type(model).__name__}")
    if mode not in CAPTURES:
        raise TraceError(f"capture must be one of {CAPTURES}, got {mode!r}")
    if isinstance(model, fx.GraphModule):
        gm = structural_copy(model).eval()
        gm.meta = dict(getattr(model, "meta", {}))
        return gm
    plain = structural_copy(model).eval()       # the reference: the model as it is, in eval mode
    root = structural_copy(plain)
    swaps = canonical_modules(root)
    fixed = fixed_defaults(root, example)
    fx_failure = None
    if mode in ("auto", "fx"):
        gm, fx_failure, err = _try_fx(root, plain, example, leaf_modules, fixed)
        if gm is not None:
            info = gm.meta[CAPTURE_META_KEY]
            info.check_error, info.notes = err, swaps
            info.fixed = {k: repr(v) for k, v in fixed.items()}
            _log_fixed(model, info)
            return gm
        if mode == "fx":
            raise TraceError(f"{fx_failure}. Register the module as a leaf with "
                             "egp_fx.register_leaf_module(cls, reason=...) (its activations are "
                             "then not analysed), or use capture='export'")
        root = structural_copy(plain)           # what fx left behind is not reused
        canonical_modules(root)
    gm, export_failure, info = _try_export(root, plain, example)
    if gm is None:
        if mode == "export":
            raise TraceError(export_failure)
        raise TraceError(f"neither capture can handle {type(model).__name__}. torch.fx: "
                         f"{fx_failure}. {export_failure}")
    info.fx_failure = fx_failure
    info.notes = swaps + info.notes
    info.fixed = {k: repr(v) for k, v in fixed.items()
                  if not (example.kwargs and k in fixed_keywords(root))}
    gm.meta[CAPTURE_META_KEY] = info
    _log_fixed(model, info)
    log.info("%s: %s", type(model).__name__, info.describe())
    return gm


def _log_fixed(model: nn.Module, info: CaptureInfo) -> None:
    if info.fixed:
        log.info("%s: forward's %s fixed to their defaults (the batches do not supply them)",
                 type(model).__name__, ", ".join(f"{k}={v}" for k, v in info.fixed.items()))


_capture = capture     # trace() takes a keyword named "capture"


def trace(model: nn.Module, example=None, *, capture: str = "auto",
          leaf_modules: dict[type, str] | None = None) -> fx.GraphModule:
    """Capture a copy of `model` in eval mode as a GraphModule; the model is never touched.

    `example` (a tensor, tuple or dict batch, as a calibration loader yields) lets the capture
    be checked against the model, and is required for torch.export. `capture` is "auto"
    (torch.fx, then torch.export), "fx" or "export". `leaf_modules` adds {type: reason} entries
    for this call on top of the registry.
    """
    batch = as_batch(example) if example is not None else None
    return _capture(model, batch, mode=capture, leaf_modules=leaf_modules)
