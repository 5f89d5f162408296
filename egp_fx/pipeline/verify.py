"""The Verifier: judges a rewritten module against the original on fixed batches, with the one
error measure of egp_fx.ir.compare (float32 as deployed, re-checked in float64 beyond the limit).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.fx as fx

from egp_fx.ir.compare import ErrorMeter, run_float64, tensor_leaves
from egp_fx.ir.shapes import call_quietly, first_failing

log = logging.getLogger(__name__)



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
    reference lacks is never accepted, and never re-checked.

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
        self._last32: tuple | None = None      # (module, its float32 error) of the last measure
        self.accepted: tuple | None = None     # the same, for the last module judge() accepted

    def _measure(self, run, refs, what: str = "verify", gm=None) -> ErrorMeter:
        """The error over all batches; a module that raises fails with the exception and the
        node that raised (node.format_node()) as reason: one line in the log at INFO, the
        traceback at DEBUG, nothing printed."""
        meter = ErrorMeter()
        with torch.no_grad():
            for batch, ref in zip(self.batches, refs):
                try:
                    out = run(batch)
                except Exception as err:  # noqa: BLE001  (a broken rewrite is rolled back, named)
                    meter.reason = _raised(err, gm, batch)
                    log.info("trial %s", meter.reason)
                    log.debug("the trial's traceback", exc_info=True)
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
        meter = self._measure(lambda b: tensor_leaves(call_quietly(gm, b)), self.refs32,
                              "float32 error", gm)
        self._last32 = None if meter.failed else (gm, meter.error)
        if meter.failed or meter.error <= limit:
            return meter.error, meter.reason
        if not self._float64_ready():
            return meter.error, meter.reason
        meter64 = self._measure(lambda b: run_float64(gm, b), self._refs64, "float64 error", gm)
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
