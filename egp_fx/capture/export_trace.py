"""Capture with torch.export (non-strict): aten-level graphs for models fx cannot trace.

    root (eval copy) --torch.export.export(dynamic batch / sequence)--> ExportedProgram
         --run_decompositions({}) (functional: no in-place ops), ExportedProgram.module()-->
         GraphModule --canonical.canonicalise--> the graph the passes read

- A batch of keyword tensors (Hugging Face: input_ids, attention_mask, ...) is captured through
  a wrapper whose forward takes exactly those names and adds the fixed keywords (use_cache=False
  where the model takes it: a generation cache is not part of the captured function). The
  returned module is called like the model: gm(**batch).
- The batch dim of every input is dynamic (Dim.AUTO), and so is dim 1 of 2-D inputs given by
  keyword (the sequence of token inputs). A batch of one sample is repeated to two for the
  capture, since export specialises a dimension of size one.
- The exported module shares the model's parameters (nothing is copied).
"""
from __future__ import annotations

import inspect
import logging

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from egp_fx.errors import TraceError
from egp_fx.ir.batches import Batch

log = logging.getLogger(__name__)
WRAPPER_PREFIX = "model."


class _Keywords(nn.Module):
    """Calls `model(**inputs, **fixed)`; forward's signature names the inputs (set per instance)."""

    def __init__(self, model: nn.Module, fixed: dict):
        super().__init__()
        self.model = model
        self.fixed = fixed

    def forward(self, **inputs):
        return self.model(**inputs, **self.fixed)


def _keywords_module(model: nn.Module, names: list[str], fixed: dict) -> nn.Module:
    wrapper = _Keywords(model, fixed)
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(*args, **kwargs):
        kwargs.update(zip(names, args))
        return _Keywords.forward(wrapper, **kwargs)

    forward.__signature__ = inspect.Signature(params)
    wrapper.forward = forward
    return wrapper


def fixed_keywords(model: nn.Module) -> dict:
    """Keywords the capture fixes: use_cache=False where forward accepts it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _widen(batch: Batch) -> Batch:
    """A batch of one sample repeated to two (export specialises a size-one dim)."""
    return batch.map(lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t) \
        if batch.size == 1 else batch


def _dims(t: torch.Tensor, keyword: bool) -> dict | None:
    if not t.dim():
        return None
    dims = {0: Dim.AUTO}
    if keyword and t.dim() == 2:
        dims[1] = Dim.AUTO
    return dims


def _module(program) -> fx.GraphModule:
    try:
        return program.module(check_guards=False)
    except TypeError:  # torch without check_guards
        return program.module()


def export_capture(root: nn.Module, example: Batch) -> tuple[fx.GraphModule, str, list[str]]:
    """(GraphModule, prefix of the model's paths in it, notes). Raises TraceError with the cause."""
    example = _widen(example)
    notes: list[str] = []
    fixed = fixed_keywords(root) if example.kwargs else {}
    if fixed:
        notes.append("captured with " + ", ".join(f"{k}={v}" for k, v in fixed.items())
                     + " (a generation cache is not part of the captured function)")
    if example.args and example.kwargs:
        raise TraceError("torch.export capture takes a batch of positional tensors or of keyword "
                         "tensors, not both")
    args, kwargs = example.args, dict(example.kwargs)
    module, prefix = root, ""
    if fixed:
        module, prefix = _keywords_module(root, list(kwargs), fixed), WRAPPER_PREFIX
    shapes = {k: _dims(t, True) for k, t in kwargs.items()} if kwargs \
        else tuple(_dims(t, False) for t in args)
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=shapes,
                                          strict=False)
            program = program.run_decompositions({})
    except Exception as err:  # export raises many types; summarised for the user
        raise TraceError(export_failure(err)) from err
    gm = _module(program)
    for name in ("train", "eval"):   # ExportedProgram.module() makes both raise; the captured
        gm.__dict__.pop(name, None)  # graph is functional, so its mode is only a flag here
    gm.eval()
    return gm, prefix, notes


_DATA_DEPENDENT = ("data-dependent", "GuardOnDataDependentSymNode", "Could not guard on data-dependent",
                   "Could not extract specialized integer from data-dependent")


def export_failure(err: BaseException) -> str:
    """One paragraph: the exception, the model source line it names, and a hint."""
    text = str(err)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    where = ""
    for line in text.splitlines():
        if line.strip().startswith("File ") and "site-packages/torch" not in line:
            where = line.strip()
    msg = f"torch.export failed: {type(err).__name__}: {first[:400]}"
    if where:
        msg += f" (at {where[:300]})"
    if any(k in text for k in _DATA_DEPENDENT):
        msg += (". The model branches on tensor values (data-dependent control flow): rewrite "
                "that branch with torch.cond, or make it depend on shapes only")
    return msg
