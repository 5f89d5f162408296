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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

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
    from .shapes import flat_args  # noqa: PLC0415  (shapes imports data, data imports errors)

    with torch.no_grad():
        out = Float64Run(gm).run(*[_promote(t) for t in flat_args(gm, batch)])
    return tensor_leaves(out)


# ----------------------------------------------------------------------------- verifier

class Verifier:
    """Judges a rewritten module against the original on fixed batches.

    The error is first taken in float32, as deployed. Beyond the limit it is re-taken in float64
    (Float64Run: original and candidate both, without float64 copies), which decides, with the
    tolerance raised to 10x the original model's own float32 rounding noise (its float32 against
    its float64 output) where that is larger: a rewrite whose error is below the noise floor of
    the model it replaces cannot be told apart from rounding. An output with a NaN or Inf the
    reference lacks is never accepted, and never re-checked.

    `combine(meter, what)`, when given, turns each measured meter into the one every rank of a
    process group agrees on (egp_fx.distributed.verification): every decision, the float64
    re-check included, is then taken on the combined numbers, the same on every rank.
    """

    def __init__(self, original, batches: list, refs32: list, tolerance: float,
                 approx_tolerance: float,
                 combine: Callable[[ErrorMeter, str], ErrorMeter] | None = None):
        self.original, self.batches, self.refs32 = original, batches, refs32
        self.tolerance, self.approx_tolerance = tolerance, approx_tolerance
        self.combine = combine
        self._refs64: list | None = None
        self._float64: bool | None = None      # None: not tried yet
        self.noise = 0.0
        self._last32: tuple | None = None      # (module, its float32 error) of the last measure
        self.accepted: tuple | None = None     # the same, for the last module judge() accepted

    def _measure(self, run, refs, what: str = "verify") -> ErrorMeter:
        """The error over all batches; a module that raises fails with the exception as reason."""
        meter = ErrorMeter()
        with torch.no_grad():
            for batch, ref in zip(self.batches, refs):
                try:
                    out = run(batch)
                except Exception as err:  # noqa: BLE001  (a broken rewrite is rolled back, named)
                    meter.reason = f"raises {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    break
                meter.add(out, ref)
                if meter.failed:
                    break
        return self.combine(meter, what) if self.combine is not None else meter

    def _float64_ready(self) -> bool:
        """Float64 references (and the original's own float32 noise) once; False when some op
        has no float64 support (on any rank: the ranks decide together), and float32 decides."""
        if self._refs64 is None and self._float64 is None:
            probe = ErrorMeter()
            try:
                self._refs64 = [run_float64(self.original, b) for b in self.batches]
            except Exception as err:  # noqa: BLE001  (an op without float64 support)
                log.debug("float64 re-check not possible; the float32 error decides", exc_info=True)
                probe.reason = f"no float64: {type(err).__name__}"
            if self.combine is not None:
                probe = self.combine(probe, "float64 references")
            self._float64 = not probe.failed
            if self._float64:
                self.noise = self._measure(lambda b: tensor_leaves(b(self.original)),
                                           self._refs64, "float32 noise").error
        return bool(self._float64)

    def error(self, gm, limit: float = 0.0) -> tuple[float, str | None]:
        """(output error of gm, why it is infinite or None); float64 beyond `limit`."""
        meter = self._measure(lambda b: tensor_leaves(b(gm)), self.refs32, "float32 error")
        self._last32 = None if meter.failed else (gm, meter.error)
        if meter.failed or meter.error <= limit:
            return meter.error, meter.reason
        if not self._float64_ready():
            return meter.error, meter.reason
        meter64 = self._measure(lambda b: run_float64(gm, b), self._refs64, "float64 error")
        return (meter.error, meter.reason) if meter64.reason and meter64.reason.startswith(
            "raises") else (meter64.error, meter64.reason)

    def judge(self, gm, rewrites) -> tuple[bool, float, str]:
        """(accepted, error, the reason a rejected rewrite is rolled back). An accepted module
        is kept in `accepted` with its float32 error until the caller changes a graph again
        (compress then reports that error instead of measuring the same thing twice)."""
        limit = self.tolerance if all(r.exact for r in rewrites) else self.approx_tolerance
        err, reason = self.error(gm, limit)
        bound = max(limit, 10 * self.noise)
        ok = reason is None and err <= bound
        self.accepted = self._last32 if ok and self._last32 and self._last32[0] is gm else None
        if reason is not None:
            return False, err, f"output {reason}"
        return ok, err, f"output error {err:.3g} beyond tolerance {bound:.3g}"
