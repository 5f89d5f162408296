"""compress(model, calib_loader): calibrate, rewrite pass by pass, verify, roll back what fails.

Pipeline (DESIGN.md): trace a copy -> calibrate (per-call region statistics) -> for each pass:
snapshot, run, compare outputs with the original on the verification batches; a pass whose
outputs move beyond the tolerance is bisected (its rewrites re-applied one at a time, each
verified) and the failing rewrites are rolled back and reported. The caller's model is never
modified. The result is a torch.fx.GraphModule whose meta holds the report ("egp_report") and the
calibrated original ("egp_original").

Error measure: max |y - y_ref| / max |y_ref| over every output tensor and verification batch.
It is first taken in float32, as deployed; a result beyond the tolerance is re-taken in float64
(module and inputs cast up for the check, then back: float32 -> float64 -> float32 is lossless),
which decides, with the tolerance raised to 10x the original model's own float32 rounding noise
(its float32 against its float64 output) where that is larger: a rewrite whose error is below
the noise floor of the model it replaces cannot be told apart from rounding. Rounding therefore
does not make an exact rewrite (BatchNorm folding in a 50-layer net, or a net whose output nearly
cancels) look wrong, and the tolerance stays tight.
A failed group is bisected: halves are re-applied and verified until the failing rewrites are
isolated, so a single bad rewrite costs O(log n) checks.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from typing import Callable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .calibrate import calibrate
from .data import iter_inputs
from .errors import CompressError
from .measures import measure
from .passes import PASSES
from .passes.base import PassContext, Refusal
from .passes.cleanup import unshare
from .report import REPORT_META_KEY, CompressReport, PassSummary
from .verify import ErrorMeter, tensor_leaves

log = logging.getLogger(__name__)

DEFAULT_PASSES = ("cleanup", "fold_bn", "constants", "dead_channels", "linear_units",
                  "fold_linear", "constants", "cleanup")


_leaves = tensor_leaves


def measure_error(gm: nn.Module, inputs: list[torch.Tensor], refs: list[list[torch.Tensor]]
                  ) -> ErrorMeter:
    """The ErrorMeter of gm's outputs against refs (see egp_fx.verify): NaN/Inf fail."""
    meter = ErrorMeter()
    dtype = next((p.dtype for p in gm.parameters()), None)  # inputs follow the module
    with torch.no_grad():
        for x, ref in zip(inputs, refs):
            meter.add(_leaves(gm(x.to(dtype) if dtype is not None and x.is_floating_point() else x)),
                      ref)
            if meter.failed:
                break
    return meter


def output_error(gm: nn.Module, inputs: list[torch.Tensor], refs: list[list[torch.Tensor]]) -> float:
    """max |y - y_ref| / max |y_ref| over all outputs and batches (0 when identical); inf when an
    output has a NaN/Inf the reference lacks, or its structure differs."""
    return measure_error(gm, inputs, refs).error


def _first_samples(batches: list, n: int | None) -> list:
    """The first n samples of a list of batches (each a tensor or a list of output tensors)."""
    if n is None:
        return batches
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        if isinstance(b, torch.Tensor):
            out.append(b[:left])
            left -= len(out[-1])
        else:
            out.append([t[:left] if t.dim() else t for t in b])
            left -= len(out[-1][0]) if out[-1] and out[-1][0].dim() else left
    return out


def _reference(gm: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [_leaves(gm(x)) for x in inputs]


def _float64_outputs(gm: nn.Module, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    gm.double()
    try:
        with torch.no_grad():
            return [_leaves(gm(x.double())) for x in inputs]
    finally:
        gm.float()


class _Verifier:
    def __init__(self, original, inputs, refs, holdout, tolerance, approx_tolerance):
        self.original, self.inputs, self.holdout = original, inputs, holdout
        self.refs32 = refs + _reference(original, holdout)
        self._refs64: list | None = None
        self.noise = 0.0    # the original's float32 rounding error, measured with the float64 refs
        self.tolerance, self.approx_tolerance = tolerance, approx_tolerance

    def error(self, gm, limit: float = 0.0) -> tuple[float, str | None]:
        """(output error of gm, why it is infinite or None); re-measured in float64 when the
        float32 error exceeds `limit`. A NaN/Inf the reference lacks is final: no re-check."""
        meter = measure_error(gm, self.inputs + self.holdout, self.refs32)
        if meter.failed or meter.error <= limit:
            return meter.error, meter.reason
        if self._refs64 is None:
            self._refs64 = _float64_outputs(self.original, self.inputs + self.holdout)
            self.noise = output_error(self.original, self.inputs + self.holdout, self._refs64)
        gm.double()
        try:
            meter = measure_error(gm, self.inputs + self.holdout, self._refs64)
        finally:
            gm.float()
        return meter.error, meter.reason

    def accepts(self, gm, rewrites) -> tuple[bool, float]:
        ok, err, _ = self.judge(gm, rewrites)
        return ok, err

    def judge(self, gm, rewrites) -> tuple[bool, float, str]:
        """(accepted, error, the reason a rejected rewrite is rolled back)."""
        limit = self.tolerance if all(r.exact for r in rewrites) else self.approx_tolerance
        err, reason = self.error(gm, limit)
        bound = max(limit, 10 * self.noise)
        if reason is not None:
            return False, err, f"output {reason}"
        return err <= bound, err, f"output error {err:.3g} beyond tolerance {bound:.3g}"


def _apply(run, gm, ctx, keys):
    """Run a pass on a copy of gm allowing only `keys`; (copy, outcome)."""
    trial = copy.deepcopy(gm)
    ctx.only = set(keys)
    try:
        return trial, run(trial, ctx)
    finally:
        ctx.only = None


def _run_group(passes, gm, ctx, verifier, report, progress) -> fx.GraphModule:
    """Run all passes and verify once; if the group fails, redo it pass by pass from a snapshot."""
    snapshot = copy.deepcopy(gm)
    done = []
    for name in tqdm(passes, desc="compress", disable=not progress, leave=False):
        t0 = time.perf_counter()
        done.append((name, PASSES[name](gm, ctx), time.perf_counter() - t0))
    rewrites = [r for _, outcome, _ in done for r in outcome.rewrites]
    ok, err = verifier.accepts(gm, rewrites) if rewrites else (True, 0.0)
    if ok:
        for name, outcome, seconds in done:
            for rw in outcome.rewrites:
                rw.error = err
            report.rewrites += outcome.rewrites
            report.refusals += outcome.refusals
            report.passes.append(PassSummary(name, len(outcome.rewrites), len(outcome.refusals),
                                             0, err if outcome.rewrites else 0.0, seconds))
        return gm
    log.info("compress: output error %.3g beyond tolerance; verifying pass by pass", err)
    gm = snapshot
    for name in passes:
        gm = _run_pass(name, PASSES[name], gm, ctx, verifier, report)
    return gm


def _run_pass(name, run, gm, ctx, verifier, report) -> fx.GraphModule:
    t0 = time.perf_counter()
    snapshot = copy.deepcopy(gm)
    outcome = run(gm, ctx)
    report.refusals += outcome.refusals
    rolled = 0
    if outcome.modified:
        ok, err = verifier.accepts(gm, outcome.rewrites)
        if ok:
            for rw in outcome.rewrites:
                rw.error = err
            report.rewrites += outcome.rewrites
        else:
            log.info("%s: output error %.3g beyond tolerance; bisecting %d rewrites",
                     name, err, len(outcome.rewrites))
            gm, rolled = _bisect(name, run, snapshot, ctx, verifier, report, outcome.rewrites)
    report.passes.append(PassSummary(name, len(outcome.rewrites), len(outcome.refusals), rolled,
                                     max((r.error or 0.0) for r in outcome.rewrites)
                                     if outcome.rewrites else 0.0, time.perf_counter() - t0))
    return gm


def _bisect(name, run, gm, ctx, verifier, report, rewrites, known_bad=True):
    """Apply the largest passing subsets of `rewrites` onto gm; roll back the failing ones."""
    if not known_bad:
        trial, outcome = _apply(run, gm, ctx, [r.key for r in rewrites])
        applied = outcome.rewrites
        ok, err = verifier.accepts(trial, applied or rewrites) if outcome.modified else (True, 0.0)
        if ok:
            for r in applied:
                r.error = err
            report.rewrites += applied
            return trial, 0
    if len(rewrites) == 1:
        rw = rewrites[0]
        trial, outcome = _apply(run, gm, ctx, [rw.key])
        _, rw.error, why = verifier.judge(trial, [rw])
        rw.status = "rolled back"
        report.rewrites.append(rw)
        report.refusals.append(Refusal(name, rw.key, rw.nodes, f"rolled back: {why}",
                                       activation=rw.activation))
        return gm, 1
    half = len(rewrites) // 2
    gm, rolled_a = _bisect(name, run, gm, ctx, verifier, report, rewrites[:half], known_bad=False)
    gm, rolled_b = _bisect(name, run, gm, ctx, verifier, report, rewrites[half:],
                           known_bad=rolled_a == 0)
    return gm, rolled_a + rolled_b


def compress(model: nn.Module, calib_loader: Iterable, *, max_batches: int | None = None,
             holdout_loader: Iterable | None = None, input_key: str | None = None,
             device: torch.device | str | None = None, tolerance: float = 1e-5,
             allow_approximate: bool = False, approx_tolerance: float = 1e-2,
             cost: str = "flops", latency_fn: Callable | None = None,
             passes: tuple[str, ...] = DEFAULT_PASSES, verify_samples: int | None = 8,
             channel_multiple: int = 16,
             progress: bool = True, calibrated: fx.GraphModule | None = None) -> fx.GraphModule:
    """Return a smaller GraphModule computing the same function as `model` on the calibration data.

    tolerance        relative output error allowed for exact rewrites (default 1e-5)
    allow_approximate apply rewrites that are not exact (kxk o kxk conv merges), checked against
                     approx_tolerance
    cost             "flops" (default) or "latency" (with latency_fn(module, x) -> seconds)
    channel_multiple narrowed widths stay a multiple of this (runtimes block channels by 16/8;
                     1 removes every dead channel)
    verify_samples   calibration samples used to verify each group of rewrites (None: all);
                     rewrites are exact on all calibration data by construction, this check
                     guards the implementation. The final error in the report is measured on
                     all calibration batches (and the held-out loader, which is always verified)
    calibrated       a GraphModule from calibrate() to reuse instead of calibrating again
    """
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise CompressError(f"unknown pass(es) {unknown}; available: {sorted(PASSES)}")
    if cost not in ("flops", "latency") or (cost == "latency" and latency_fn is None):
        raise CompressError("cost must be 'flops', or 'latency' together with latency_fn")
    inputs = [x.cpu() for x in iter_inputs(calib_loader, max_batches=max_batches, input_key=input_key)]
    refs: list = []
    original = calibrated if calibrated is not None else calibrate(
        model, inputs, device=device, progress=progress, keep_outputs=refs)
    dev = next((p.device for p in original.parameters()), torch.device("cpu"))
    inputs = [x.to(dev) for x in inputs]
    refs = [_leaves(r) for r in refs] if refs else _reference(original, inputs)
    holdout = [x for x in iter_inputs(holdout_loader, input_key=input_key, device=dev)] \
        if holdout_loader is not None else []
    t0 = time.perf_counter()
    verify = _first_samples(inputs, verify_samples)
    verifier = _Verifier(original, verify, _first_samples(refs, verify_samples), holdout, tolerance,
                         approx_tolerance)
    example = inputs[0][:1]
    report = CompressReport(before=measure(original, example), after=None, tolerance=tolerance)
    gm = copy.deepcopy(original)
    unshare(gm)
    ctx = PassContext(example_input=example, allow_approximate=allow_approximate, cost=cost,
                      latency_fn=latency_fn, options={"channel_multiple": channel_multiple})
    gm = _run_group(passes, gm, ctx, verifier, report, progress)
    report.after = measure(gm, example)
    report.max_error = output_error(gm, inputs, refs)  # float32, as deployed
    if holdout:
        report.holdout_error = output_error(gm, holdout, _reference(original, holdout))
    report.seconds = time.perf_counter() - t0
    gm.meta[REPORT_META_KEY] = report
    gm.meta["egp_original"] = original
    gm.meta["egp_example_input"] = example
    log.info("compress: %s", report.summary().replace("\n", "; "))
    return gm
