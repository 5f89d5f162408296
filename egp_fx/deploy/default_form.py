"""The ONNX file a user gets from torch.onnx.export's defaults: what egp_fx is measured against.

    result = export_default_form(model, "m.onnx", example)

This is the call a user makes without egp_fx: `torch.onnx.export(model, args, path,
kwargs=..., input_names=..., output_names=..., dynamic_axes=...)` on the model itself,
with the dynamic axes of inputs.py and every other argument at torch's default: the exporter
(dynamo in torch >= 2.9, TorchScript before), its opset, its graph optimisation and, for the
dynamo exporter, its external data file. The example is exported at two samples when the batch
axis is dynamic (export would specialise a batch of one). The file is checked like any export
(parity.py) and the result says which exporter the default was (ExportResult.exporter).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from egp_fx.errors import ExportError
from egp_fx.ir.compare import tensor_leaves
from egp_fx.ir.copying import moved, structural_copy

from .diagnose import summarise
from .inputs import InputSpec
from .onnx import DEFAULT_TOLERANCE, Choice, ExporterTrial, ExportResult, _widen, example_batch, \
    output_names
from .parity import check_parity


def default_exporter() -> str:
    """The exporter torch.onnx.export uses when `dynamo=` is not given."""
    param = inspect.signature(torch.onnx.export).parameters.get("dynamo")
    return "dynamo" if param is not None and param.default is True else "torchscript"


def export_default_form(module: nn.Module, path: str | Path, example_inputs: Any, *,
                        dynamic_batch: bool = True,
                        tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Write `module` as torch.onnx.export's defaults write it, checked against torch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = example_batch(example_inputs)
    spec = InputSpec.of(batch, dynamic_batch)
    model = moved(structural_copy(module), "cpu").eval()
    with torch.no_grad():
        out = batch(model)
    outs = dict(zip(output_names(out), (t.dim() for t in tensor_leaves(out))))
    exporter = default_exporter()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            wide = spec.exportable(batch)
            torch.onnx.export(model, wide.args, str(path), kwargs=dict(wide.kwargs) or None,
                              input_names=spec.names(), output_names=list(outs),
                              dynamic_axes=spec.dynamic_axes(outs))

        def reference(b):
            with torch.no_grad():
                return tensor_leaves(b(model))

        parity = check_parity(path, reference, [batch] + ([_widen(batch)] if dynamic_batch else []),
                              spec.names(), tolerance)
    except Exception as exc:  # any exporter/checker failure: say which and why
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        raise ExportError(f"torch.onnx.export's default ({exporter} exporter) failed for "
                          f"{type(module).__name__}: {summarise(exc)}") from exc
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    trial = ExporterTrial(exporter, opset, True, time.perf_counter() - start)
    return ExportResult(path, opset, exporter, parity.max_abs_err, parity.max_rel_err,
                        parity.max_elementwise_rel_err, tolerance, parity.float32_noise,
                        trial.seconds, spec.names(), list(outs), [trial], Choice.DEFAULT_FORM)
