"""The rewrite loop of compress: passes on a working copy, verification, bisection, roll back.

    Run(ctx, verifier, report, progress).group(passes, working_copy) -> (graph, verdict)

All passes run as one group and are verified once; when the group fails, each pass is run and
verified alone, and a failing pass is bisected: the largest subsets of its rewrites that pass
stay, the rewrites that fail alone are rolled back and reported with the reason. Snapshots and
trial copies are structural copies (copying.py): they share the weights and hold only the
tensors a rewrite created. The report (report.py) receives every rewrite, refusal and pass
summary. Each step returns the graph with the Verdict that holds for it as it is (None when no
verification saw its last change), so that compress need not measure it again.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch.fx as fx
from tqdm.auto import tqdm

from egp_fx.ir.copying import structural_copy
from egp_fx.passes import run_pass
from egp_fx.passes.base import Refusal, RewriteKind, Status
from egp_fx.passes.reasons import Reason, Why

from .report import CompressReport, PassSummary
from .verify import Verdict, Verifier

log = logging.getLogger(__name__)


# Rewrites that only delete nodes computing nothing (eval-mode no-ops, dead code): every output
# is computed by the same arithmetic as before, so there is nothing to re-check in float64.
NO_OP_KINDS = frozenset({RewriteKind.DROP_NOOP, RewriteKind.DEAD_CODE})


def only_no_ops(rewrites) -> bool:
    return all(r.kind in NO_OP_KINDS for r in rewrites)


class Run:
    """One compress run: the pass context, the verifier and the report being written.

    `trust_no_ops`: a group whose rewrites are all no-op drops is not verified here; it is left
    in `unchecked`, and the caller's final measurement of the result (float32, on all the
    calibration data) is its check. If that check fails, the caller runs the group again with
    trust_no_ops=False."""

    def __init__(self, ctx, verifier: Verifier, report: CompressReport, progress: bool,
                 trust_no_ops: bool = True):
        self.ctx, self.verifier, self.report, self.progress = ctx, verifier, report, progress
        self.trust_no_ops = trust_no_ops
        self.unchecked: fx.GraphModule | None = None

    def group(self, names: tuple[str, ...], start: Callable[[], fx.GraphModule]
              ) -> tuple[fx.GraphModule, Verdict | None]:
        """Run all passes on start() and verify once; if the group fails, redo it pass by pass
        on a second start() (a fresh working copy: no snapshot taken for the common case)."""
        gm = start()
        done = []
        try:
            for name in tqdm(names, desc="compress", disable=not self.progress, leave=False):
                t0 = time.perf_counter()
                done.append((name, run_pass(name, gm, self.ctx), time.perf_counter() - t0))
        except Exception:  # noqa: BLE001  (a failing pass is isolated below, not fatal)
            log.debug("a pass failed in the group; running pass by pass", exc_info=True)
            done = None
        rewrites = [r for _, outcome, _ in done for r in outcome.rewrites] if done else []
        self.unchecked = None
        if done is not None and self.trust_no_ops and only_no_ops(rewrites):
            verdict, self.unchecked = None, gm      # checked by the caller's final measure
        else:
            verdict = self.verifier.judge(gm, rewrites) if rewrites else None
        if done is not None and (verdict is None or verdict.accepted):
            err = verdict.error if verdict is not None else 0.0
            for name, outcome, seconds in done:
                self._record(name, outcome.rewrites, outcome.refusals, 0, err, seconds)
            return gm, verdict
        log.info("compress: %s; verifying pass by pass",
                 verdict.why if verdict is not None else "a pass failed")
        gm, verdict = start(), None
        for name in names:
            gm, verdict = self.one(name, gm)
        return gm, verdict

    def one(self, name: str, gm: fx.GraphModule) -> tuple[fx.GraphModule, Verdict | None]:
        """Run one pass and verify it; bisect its rewrites when it fails."""
        t0 = time.perf_counter()
        snapshot = structural_copy(gm)
        first = len(self.report.rewrites)
        try:
            outcome = run_pass(name, gm, self.ctx)
        except Exception as err:  # noqa: BLE001  (the pass is skipped, the model kept as it was)
            log.warning("compress: pass %s failed (%s: %s); its changes are rolled back", name,
                        type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
            self.report.refusals.append(Refusal(name, name, [], Why(
                Reason.PASS_FAILED, {"error": f"{type(err).__name__}: {err}"})))
            self.report.passes.append(PassSummary(name, 0, 1, 0, 0.0, time.perf_counter() - t0))
            return snapshot, None
        rolled, verdict = 0, None
        if outcome.modified:
            verdict = self.verifier.judge(gm, outcome.rewrites)
            if verdict.accepted:
                for rw in outcome.rewrites:
                    rw.error = verdict.error
                self.report.rewrites += outcome.rewrites
            else:
                log.info("%s: %s; bisecting %d rewrites", name, verdict.why,
                         len(outcome.rewrites))
                gm, verdict, rolled = self.bisect(name, snapshot, outcome.rewrites)
        self.report.refusals += outcome.refusals
        errors = [r.error or 0.0 for r in self.report.rewrites[first:] if r.status is Status.APPLIED]
        self.report.passes.append(PassSummary(name, len(outcome.rewrites), len(outcome.refusals),
                                              rolled, max(errors, default=0.0),
                                              time.perf_counter() - t0))
        return gm, verdict

    def bisect(self, name, base, rewrites, known_bad=True
               ) -> tuple[fx.GraphModule, Verdict | None, int]:
        """Apply the largest passing subsets of `rewrites` onto `base`; roll back failing ones.
        (graph, the verdict that holds for it or None, rewrites rolled back)."""
        if not known_bad:
            trial = structural_copy(base)
            keys = {r.key for r in rewrites}
            outcome = run_pass(name, trial, self.ctx, allow=keys.__contains__)
            applied = outcome.rewrites
            verdict = self.verifier.judge(trial, applied or rewrites) if outcome.modified else None
            if verdict is None or verdict.accepted:
                for r in applied:
                    r.error = verdict.error if verdict is not None else 0.0
                self.report.rewrites += applied
                return trial, verdict, 0
        if len(rewrites) == 1:
            rw = rewrites[0]
            trial = structural_copy(base)
            run_pass(name, trial, self.ctx, allow={rw.key}.__contains__)
            verdict = self.verifier.judge(trial, [rw])
            rw.error, rw.status = verdict.error, Status.ROLLED_BACK
            self.report.rewrites.append(rw)
            self.report.refusals.append(Refusal(
                name, rw.key, rw.nodes, Why(Reason.ROLLED_BACK, {"verdict": verdict.why}),
                activation=rw.activation, path=rw.path))
            return base, None, 1
        half = len(rewrites) // 2
        gm, _, rolled_a = self.bisect(name, base, rewrites[:half], known_bad=False)
        gm, verdict, rolled_b = self.bisect(name, gm, rewrites[half:], known_bad=rolled_a == 0)
        return gm, verdict, rolled_a + rolled_b

    def _record(self, name, rewrites, refusals, rolled, err, seconds) -> None:
        for rw in rewrites:
            rw.error = err
        self.report.rewrites += rewrites
        self.report.refusals += refusals
        self.report.passes.append(PassSummary(name, len(rewrites), len(refusals), rolled,
                                              err if rewrites else 0.0, seconds))
