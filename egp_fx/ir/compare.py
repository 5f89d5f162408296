"""The one error measure every check uses: how far a module's outputs are from the reference.

    error = max |y - y_ref| / max |y_ref|        over every tensor leaf and every batch

(the absolute error when the reference is all zeros). Non-finite values are failures, never
noise: an output with a NaN or an Inf where the reference is finite, a reference NaN/Inf that the
output does not reproduce exactly, a missing or extra leaf, or a shape change each make the error
`math.inf`, which no tolerance accepts. Python's `max` is never given a NaN (it would drop it:
`max(0.0, nan)` is 0.0); every comparison is explicit.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from .shapes import flat_args

log = logging.getLogger(__name__)


def tensor_leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, tuple, dict, ModelOutput, nested), in order."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass
class Mismatch:
    """Why two outputs cannot be compared by size (the error is then infinite)."""

    reason: str


CHUNK = 1 << 20     # elements compared at a time: language-model logits are large


def _finite_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float] | Mismatch:
    """(max |out - ref| over finite entries, max |ref| over finite entries), or a Mismatch.

    Compared in float64, a chunk of CHUNK elements at a time, so that the check of a large
    output costs a few MB, not several copies of it."""
    if out.shape != ref.shape:
        return Mismatch(f"shape {tuple(out.shape)} instead of {tuple(ref.shape)}")
    if not (out.is_floating_point() or out.is_complex()):
        return (0.0, 0.0) if torch.equal(out, ref.to(out.dtype)) else Mismatch("integer output differs")
    o_all, r_all = out.detach().reshape(-1), ref.detach().reshape(-1)
    worst = scale = 0.0
    for start in range(0, o_all.numel(), CHUNK):
        o = o_all[start:start + CHUNK].double()
        r = r_all[start:start + CHUNK].double()
        ref_ok, out_ok = torch.isfinite(r), torch.isfinite(o)
        if not bool(torch.equal(ref_ok, out_ok)):
            bad = int((out_ok != ref_ok).sum())
            return Mismatch(f"{bad} NaN/Inf value(s) where the reference has "
                            f"{'finite values' if bool((~out_ok & ref_ok).any()) else 'NaN/Inf'}")
        if not bool(ref_ok.all()):
            same = (torch.isnan(o) & torch.isnan(r)) | (o == r)  # infinities must match in sign
            if not bool(same[~ref_ok].all()):
                return Mismatch("NaN/Inf values differ from the reference's")
            o, r = o[ref_ok], r[ref_ok]
        if r.numel():
            d, m = float((o - r).abs().max()), float(r.abs().max())
            if d > worst:
                worst = d
            if m > scale:
                scale = m
    return worst, scale


def compare(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, float] | Mismatch:
    """(max abs difference, max |reference|) over matching leaf lists, or a Mismatch."""
    if len(outs) != len(refs):
        return Mismatch(f"{len(outs)} output tensors instead of {len(refs)}")
    worst = scale = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        got = _finite_diff(o, r)
        if isinstance(got, Mismatch):
            return Mismatch(f"output {i}: {got.reason}")
        diff, s = got
        if not (math.isfinite(diff) and math.isfinite(s)):
            return Mismatch(f"output {i}: difference not finite")
        if diff > worst:
            worst = diff
        if s > scale:
            scale = s
    return worst, scale


def relative_error(worst: float, scale: float) -> float:
    return worst / scale if scale > 0 else worst


class ErrorMeter:
    """Accumulates compare() over batches; `.error` is the relative error, `.reason` why inf."""

    def __init__(self) -> None:
        self.worst = self.scale = 0.0
        self.reason: str | None = None

    def add(self, outs: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
        if self.reason is not None:
            return
        got = compare(outs, refs)
        if isinstance(got, Mismatch):
            self.reason = got.reason
            return
        if got[0] > self.worst:
            self.worst = got[0]
        if got[1] > self.scale:
            self.scale = got[1]

    @property
    def failed(self) -> bool:
        return self.reason is not None

    @property
    def error(self) -> float:
        return math.inf if self.reason is not None else relative_error(self.worst, self.scale)


# ----------------------------------------------------------------------------- float64 runs

class Float64Run(fx.Interpreter):
    """Runs a GraphModule in float64 without a float64 copy of it.

    Each parameter is cast when the node that reads it runs (get_attr, call_module), float
    tensors and float32 dtype arguments are promoted, and the interpreter frees every value
    after its last use: the extra memory is one layer's float64 weights and the activations.
    """

    def get_attr(self, target, args, kwargs):
        return _promote(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        tensors = {**dict(mod.named_parameters()), **dict(mod.named_buffers())}
        return functional_call(mod, {k: _promote(v) for k, v in tensors.items()},
                               _promote(tuple(args)), _promote(dict(kwargs)))

    def call_function(self, target, args, kwargs):
        return target(*_promote(args), **_promote(kwargs))

    def call_method(self, target, args, kwargs):
        self_obj, *rest = _promote(args)
        return getattr(self_obj, target)(*rest, **_promote(kwargs))


def _promote(value):
    """float32 tensors and dtype arguments become float64 (nested containers followed)."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.dtype in (torch.float32, torch.float16, torch.bfloat16) else value
    if isinstance(value, torch.dtype) and value in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float64
    if isinstance(value, (list, tuple)):
        return type(value)(_promote(v) for v in value)
    if isinstance(value, dict):
        return {k: _promote(v) for k, v in value.items()}
    return value


def run_float64(gm: fx.GraphModule, batch) -> list[torch.Tensor]:
    """The tensor outputs of gm on `batch` (a data.Batch), computed in float64."""
    with torch.no_grad():
        out = Float64Run(gm).run(*[_promote(t) for t in flat_args(gm, batch)])
    return tensor_leaves(out)
