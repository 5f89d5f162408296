"""compress(model, calib_loader): capture, calibrate, rewrite pass by pass, verify, roll back what fails.

    capture a copy (torch.fx or torch.export) -> calibrate (per-call region statistics)
    -> run the pipeline of passes (passes/) on a working copy -> verify the group against the
    original on the verification samples -> on failure redo it pass by pass, and bisect a failing
    pass: the failing rewrites are rolled back and reported, the others stay.

The caller's model is never modified. Memory: the captured original shares the model's tensors;
working copies and snapshots are structural copies that share them too (copying.py); only the
tensors a rewrite creates are new, and at the end the result gets its own copy of what it still
shares with the model (unless share_weights=True). A model that would not fit fails before it
starts (memory.py).
The result is a torch.fx.GraphModule called like the model, whose meta holds the report
("egp_report") and, not pickled with it, the calibrated original ("egp_original"); it survives
torch.save / torch.load with its report (pickling.py).
Error measure and verification: egp_fx.verify.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from . import distributed as ranks
from .calibrate import calibrate, warn_unanalysed
from .capture import COVERAGE_META_KEY
from .copying import device_of, own_tensors, structural_copy, tensor_bytes
from .data import Batch, iter_batches
from .distributed import verification as shared
from .errors import CompressError
from .layer import CAPTURE_META_KEY
from .measures import measure
from .latency import WidthTable, timer_for
from .memory import check_fits
from .passes import PASSES, default_pipeline, run_pass
from .passes.base import SHAPES_VALID, PassContext, PassOptions, Refusal, Status
from .passes.cleanup import unshare
from .pickling import make_picklable
from .report import EXAMPLE_META_KEY, ORIGINAL_META_KEY, REPORT_META_KEY, CompressReport, \
    PassSummary, Transient
from .targets import TARGETS, target_options
from .verify import ErrorMeter, Verifier, tensor_leaves

log = logging.getLogger(__name__)


def output_error(gm: nn.Module, batches: list, refs: list[list[torch.Tensor]],
                 combine: Callable | None = None, what: str = "output error") -> float:
    """max |y - y_ref| / max |y_ref| over all outputs and batches (0 when identical); inf when an
    output has a NaN/Inf the reference lacks, or its structure differs. `combine`: over the
    batches of every rank (egp_fx.distributed.verification)."""
    meter = ErrorMeter()
    with torch.no_grad():
        for batch, ref in zip(batches, refs):
            batch = batch if isinstance(batch, Batch) else Batch((batch,))
            meter.add(tensor_leaves(batch(gm)), ref)
    return (combine(meter, what) if combine is not None else meter).error


def _first_samples(batches: list[Batch], n: int | None) -> list[Batch]:
    """The first n samples of a list of batches."""
    if n is None:
        return batches
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b.head(left))
        left -= out[-1].size
    return out


def _outputs(gm, batches: list[Batch]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [tensor_leaves(b(gm)) for b in batches]


class _Keeper:
    """Keeps the model's outputs seen during calibration, up to a byte budget: with them the
    references need no second forward of the original. Past the budget they are dropped and
    recomputed (language-model logits can be large)."""

    BUDGET = 256 * 2 ** 20        # and at most a tenth of the weights

    def __init__(self, model: nn.Module):
        self.outputs: list[list[torch.Tensor]] | None = []
        self.bytes = 0
        self.budget = min(self.BUDGET, tensor_bytes(model) // 10)

    def __call__(self, batch, out) -> None:
        if self.outputs is None:
            return
        leaves = [t.detach() for t in tensor_leaves(out)]
        self.bytes += sum(t.numel() * t.element_size() for t in leaves)
        self.outputs = self.outputs + [leaves] if self.bytes <= self.budget else None

    def refs(self, gm, batches: list[Batch]) -> list[list[torch.Tensor]]:
        if self.outputs is not None and len(self.outputs) == len(batches):
            return self.outputs
        return _outputs(gm, batches)


def _heads(outputs: list[list[torch.Tensor]], batches: list[Batch], n: int | None) -> list:
    """The outputs of the first n samples (the verification samples of _first_samples)."""
    if n is None:
        return outputs
    out, left = [], n
    for leaves, batch in zip(outputs, batches):
        if left <= 0:
            break
        out.append([t[:left] if t.dim() and t.shape[0] == batch.size else t for t in leaves])
        left -= min(left, batch.size)
    return out


class _Run:
    """One compress run: the pass context, the verifier and the report being written."""

    def __init__(self, ctx, verifier: Verifier, report: CompressReport, progress: bool):
        self.ctx, self.verifier, self.report, self.progress = ctx, verifier, report, progress

    def run_pass(self, name: str, gm: fx.GraphModule, **kw):
        """run_pass, after which no module judged before counts as verified as it is now."""
        self.verifier.accepted = None
        return run_pass(name, gm, self.ctx, **kw)

    def group(self, names: tuple[str, ...], gm: fx.GraphModule) -> fx.GraphModule:
        """Run all passes and verify once; if the group fails, redo it pass by pass."""
        snapshot = structural_copy(gm)
        done = []
        try:
            for name in tqdm(names, desc="compress", disable=not self.progress, leave=False):
                t0 = time.perf_counter()
                done.append((name, self.run_pass(name, gm), time.perf_counter() - t0))
        except Exception:  # noqa: BLE001  (a failing pass is isolated below, not fatal)
            log.debug("a pass failed in the group; running pass by pass", exc_info=True)
            done = None
        rewrites = [r for _, outcome, _ in done for r in outcome.rewrites] if done else []
        ok, err, _ = self.verifier.judge(gm, rewrites) if rewrites else (done is not None, 0.0, "")
        if ok:
            for name, outcome, seconds in done:
                self._record(name, outcome.rewrites, outcome.refusals, 0, err, seconds)
            return gm
        log.info("compress: output error %.3g beyond tolerance; verifying pass by pass", err)
        gm = snapshot
        for name in names:
            gm = self.one(name, gm)
        return gm

    def one(self, name: str, gm: fx.GraphModule) -> fx.GraphModule:
        """Run one pass and verify it; bisect its rewrites when it fails."""
        t0 = time.perf_counter()
        snapshot = structural_copy(gm)
        first = len(self.report.rewrites)
        try:
            outcome = self.run_pass(name, gm)
        except Exception as err:  # noqa: BLE001  (the pass is skipped, the model kept as it was)
            log.warning("compress: pass %s failed (%s: %s); its changes are rolled back", name,
                        type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
            self.report.refusals.append(Refusal(name, name, [], f"pass failed: "
                                                f"{type(err).__name__}: {err}"))
            self.report.passes.append(PassSummary(name, 0, 1, 0, 0.0, time.perf_counter() - t0))
            return snapshot
        rolled = 0
        if outcome.modified:
            ok, err, _ = self.verifier.judge(gm, outcome.rewrites)
            if ok:
                for rw in outcome.rewrites:
                    rw.error = err
                self.report.rewrites += outcome.rewrites
            else:
                log.info("%s: output error %.3g beyond tolerance; bisecting %d rewrites",
                         name, err, len(outcome.rewrites))
                gm, rolled = self.bisect(name, snapshot, outcome.rewrites)
        self.report.refusals += outcome.refusals
        errors = [r.error or 0.0 for r in self.report.rewrites[first:] if r.status is Status.APPLIED]
        self.report.passes.append(PassSummary(name, len(outcome.rewrites), len(outcome.refusals),
                                              rolled, max(errors, default=0.0),
                                              time.perf_counter() - t0))
        return gm

    def bisect(self, name, base, rewrites, known_bad=True) -> tuple[fx.GraphModule, int]:
        """Apply the largest passing subsets of `rewrites` onto `base`; roll back failing ones."""
        if not known_bad:
            trial = structural_copy(base)
            keys = {r.key for r in rewrites}
            outcome = self.run_pass(name, trial, allow=keys.__contains__)
            applied = outcome.rewrites
            ok, err, _ = self.verifier.judge(trial, applied or rewrites) \
                if outcome.modified else (True, 0.0, "")
            if ok:
                for r in applied:
                    r.error = err
                self.report.rewrites += applied
                return trial, 0
        if len(rewrites) == 1:
            rw = rewrites[0]
            trial = structural_copy(base)
            self.run_pass(name, trial, allow={rw.key}.__contains__)
            _, rw.error, why = self.verifier.judge(trial, [rw])
            rw.status = Status.ROLLED_BACK
            self.report.rewrites.append(rw)
            self.report.refusals.append(Refusal(name, rw.key, rw.nodes, f"rolled back: {why}",
                                                activation=rw.activation, path=rw.path))
            return base, 1
        half = len(rewrites) // 2
        gm, rolled_a = self.bisect(name, base, rewrites[:half], known_bad=False)
        gm, rolled_b = self.bisect(name, gm, rewrites[half:], known_bad=rolled_a == 0)
        return gm, rolled_a + rolled_b

    def _record(self, name, rewrites, refusals, rolled, err, seconds) -> None:
        for rw in rewrites:
            rw.error = err
        self.report.rewrites += rewrites
        self.report.refusals += refusals
        self.report.passes.append(PassSummary(name, len(rewrites), len(refusals), rolled,
                                              err if rewrites else 0.0, seconds))


def _check_options(passes, cost, latency_fn, target) -> tuple[str, ...]:
    passes = default_pipeline() if passes is None else tuple(passes)
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise CompressError(f"unknown pass(es) {unknown}; available: {sorted(PASSES)}")
    if cost not in ("flops", "latency"):
        raise CompressError(f"cost must be 'flops' or 'latency', got {cost!r}")
    if target not in TARGETS:
        raise CompressError(f"unknown target {target!r}; choose from {sorted(TARGETS)}")
    return passes


def compress(model: nn.Module, calib_loader: Iterable, *, max_batches: int | None = None,
             holdout_loader: Iterable | None = None, input_key: str | None = None,
             device: torch.device | str | None = None, tolerance: float = 1e-5,
             allow_approximate: bool = False, approx_tolerance: float = 1e-2,
             cost: str = "flops", latency_fn: Callable | None = None,
             passes: tuple[str, ...] | None = None, verify_samples: int | None = 8,
             target: str = "ort-cpu", channel_multiple: int | None = None,
             capture: str = "auto", share_weights: bool = False, progress: bool = True,
             calibrated: fx.GraphModule | None = None,
             distributed: bool | None = None) -> fx.GraphModule:
    """Return a smaller GraphModule computing the same function as `model` on the calibration data.

    tolerance         relative output error allowed for exact rewrites (default 1e-5)
    allow_approximate apply rewrites that are not exact (kxk o kxk conv merges), checked against
                      approx_tolerance
    cost              "flops" (default) or "latency": measured on the target (egp_fx.latency),
                      or by latency_fn(module, x) -> seconds when given
    target            the hardware the model will run on: "ort-cpu", "cuda" or "generic"; sets
                      the width multiple of narrowed layers (egp_fx.targets)
    channel_multiple  overrides the target's width multiple (1 removes every dead channel)
    capture           "auto" (torch.fx, then torch.export), "fx" or "export"
    verify_samples    calibration samples used to verify each group of rewrites (None: all);
                      rewrites are exact on all calibration data by construction, this check
                      guards the implementation. The final error in the report is measured on
                      all calibration batches (and the held-out loader, always verified)
    share_weights     let the result share the layers it did not rewrite with `model` (no copy;
                      then do not train either in place)
    calibrated        a GraphModule from calibrate() to reuse instead of calibrating again
    distributed       work across the ranks of the default torch.distributed process group
                      (default: when one is initialised; False keeps the call local): each rank
                      passes its own shard (and held-out shard); statistics are reduced, the
                      verification errors combined, and every rank returns the same graph
                      (egp_fx.distributed.verification)
    """
    passes = _check_options(passes, cost, latency_fn, target)
    reduce = ranks.enabled(distributed)
    with ranks.together("compress: calibration data", reduce):
        if calibrated is None:
            check_fits(model, device, share_weights)
        batches = [b.to("cpu") for b in iter_batches(calib_loader, max_batches=max_batches,
                                                      input_key=input_key, allow_empty=reduce)]
        holdout = [b.to("cpu") for b in iter_batches(holdout_loader, input_key=input_key,
                                                      allow_empty=reduce)] \
            if holdout_loader is not None else []
    keeper = _Keeper(model)
    original = calibrated if calibrated is not None else calibrate(
        model, batches, device=device, progress=progress, capture_mode=capture,
        distributed=reduce, on_output=keeper)
    coverage = warn_unanalysed(original) if calibrated is not None else \
        original.meta.get(COVERAGE_META_KEY)
    dev = device_of(original)
    batches, holdout = [b.to(dev) for b in batches], [b.to(dev) for b in holdout]
    t0 = time.perf_counter()
    if calibrated is not None:
        keeper.outputs = None
    refs = keeper.refs(original, batches)
    holdout_refs = _outputs(original, holdout)
    example, take, combine = shared.plan(batches, verify_samples, reduce)
    example = example.to(dev)
    verifier = Verifier(original, _first_samples(batches, take) + holdout,
                        _heads(refs, batches, take) + holdout_refs, tolerance,
                        approx_tolerance, combine)
    report = CompressReport(before=measure(original, example), after=None, tolerance=tolerance,
                            target=target, capture=original.meta.get("egp_capture"),
                            coverage=coverage)
    gm = structural_copy(original)
    unshare(gm)
    if calibrated is None and not reduce:   # calibrate propagated shapes on this same example
        gm.meta[SHAPES_VALID] = True
    timings = WidthTable(latency_fn or timer_for(target)) if cost == "latency" else None
    options = PassOptions(**target_options(target, channel_multiple),
                          allow_approximate=allow_approximate, cost=cost, latency_fn=latency_fn,
                          timings=timings)
    gm = _Run(PassContext(example, options), verifier, report, progress).group(passes, gm)
    report.after = measure(gm, example)
    verified = verifier.accepted      # verified on all the calibration data as it is now?
    whole = combine is None and not holdout and (take is None or take >= sum(b.size for b in batches))
    report.max_error = verified[1] if whole and verified and verified[0] is gm else \
        output_error(gm, batches, refs, combine)
    if holdout_loader is not None:
        report.holdout_error = output_error(gm, holdout, holdout_refs, combine, "held-out error")
    del refs, verifier        # the result gets its own copy of the weights last: the peak is
    if not share_weights:     # that copy, not that copy plus a forward's activations
        own_tensors(gm, model)
    report.seconds = time.perf_counter() - t0
    gm.meta[REPORT_META_KEY] = report
    gm.meta[ORIGINAL_META_KEY] = Transient(original)
    gm.meta[EXAMPLE_META_KEY] = example
    make_picklable(gm, (REPORT_META_KEY, EXAMPLE_META_KEY, CAPTURE_META_KEY))
    log.info("compress: %s", report.summary().replace("\n", "; "))
    return gm
