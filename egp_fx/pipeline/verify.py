"""The Verifier: judges a rewritten module against the original on fixed batches, with the one
error measure of egp_fx.ir.compare (float32 as deployed, re-checked in float64 beyond the limit),
and returns a Verdict: accepted or not, the error that decided, why (a reason code and its facts,
egp_fx.passes.reasons) and the float32 error on the verification batches.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from egp_fx.ir.compare import ErrorMeter, run_float64, tensor_leaves
from egp_fx.ir.shapes import call_quietly, first_failing
from egp_fx.passes.reasons import Reason, Why

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What the Verifier decided about one module."""

    accepted: bool
    error: float                  # the deciding error (float64 when re-checked; inf: see why)
    why: Why                      # BEYOND/WITHIN_TOLERANCE, OUTPUT_RAISES, OUTPUT_INVALID
    float32: float | None = None  # the float32 error on the verification batches, when finite


def _raised(err: BaseException, gm, batch) -> str:
    """One line: what a trial module raised, and at which node."""
    text = f"raises {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    node = first_failing(gm, batch) if isinstance(gm, fx.GraphModule) else None
    return text + (f" at {node.format_node()}" if node is not None else "")


class Verifier:
    """Judges a rewritten module against the original on fixed batches.

    The error is first taken in float32, as deployed. Beyond the limit it is re-taken in float64
    (Float64Run: original and candidate both, without float64 copies), which decides, with the
    tolerance raised to 10x the original model's own float32 rounding noise (its float32 against
    its float64 output) where that is larger: a rewrite whose error is below the noise floor of
    the model it replaces cannot be told apart from rounding. An output with a NaN or Inf the
    reference lacks is never accepted, and never re-checked. A candidate that runs in float32 but
    raises in float64 is judged on its float32 error.

    `combine(meter, what)`, when given, turns each measured meter into the one every rank of a
    process group agrees on (egp_fx.pipeline.ranks): every decision, the float64
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

    def _measure(self, run, refs, what: str = "verify", gm=None) -> tuple[ErrorMeter, bool]:
        """(the error over all batches, whether the module raised, on any rank); a module that
        raises fails with the exception and the node that raised (node.format_node()) as the
        meter's reason: one line in the log at INFO, the traceback at DEBUG, nothing printed."""
        meter, raised = ErrorMeter(), None
        with torch.no_grad():
            for batch, ref in zip(self.batches, refs):
                try:
                    out = run(batch)
                except Exception as err:  # noqa: BLE001  (a broken rewrite is rolled back, named)
                    raised = _raised(err, gm, batch)
                    meter.reason = raised
                    log.info("trial %s", raised)
                    log.debug("the trial's traceback", exc_info=True)
                    break
                meter.add(out, ref)
                if meter.failed:
                    break
        if self.combine is None:
            return meter, raised is not None
        meter = self.combine(meter, what)
        if not meter.failed:
            return meter, False
        probe = ErrorMeter()          # did it raise on some rank? (every rank asks, or none)
        probe.reason = raised
        return meter, self.combine(probe, what + ": raised").failed

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
                                           self._refs64, "float32 noise")[0].error
        return bool(self._float64)

    def error(self, gm, limit: float = 0.0) -> tuple[ErrorMeter, bool, float | None]:
        """(the deciding measure of gm, whether it raised, its float32 error when finite): the
        float32 measure, or the float64 one beyond `limit` (unless gm raises in float64)."""
        meter, raised = self._measure(lambda b: tensor_leaves(call_quietly(gm, b)), self.refs32,
                                      "float32 error", gm)
        float32 = None if meter.failed else meter.error
        if meter.failed or meter.error <= limit or not self._float64_ready():
            return meter, raised, float32
        meter64, raised64 = self._measure(lambda b: run_float64(gm, b), self._refs64,
                                          "float64 error", gm)
        return (meter, raised, float32) if raised64 else (meter64, False, float32)

    def judge(self, gm, rewrites) -> Verdict:
        """The Verdict on gm, rewritten by `rewrites` (exact ones against the tolerance, any
        inexact one against approx_tolerance)."""
        limit = self.tolerance if all(r.exact for r in rewrites) else self.approx_tolerance
        meter, raised, float32 = self.error(gm, limit)
        if meter.failed:
            code = Reason.OUTPUT_RAISES if raised else Reason.OUTPUT_INVALID
            return Verdict(False, meter.error, Why(code, {"failure": meter.reason}), float32)
        bound = max(limit, 10 * self.noise)
        ok = meter.error <= bound
        why = Why(Reason.WITHIN_TOLERANCE if ok else Reason.BEYOND_TOLERANCE,
                  {"error": meter.error, "bound": bound})
        return Verdict(ok, meter.error, why, float32)
