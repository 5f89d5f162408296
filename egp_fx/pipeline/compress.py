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
Error measure: egp_fx.ir.compare; verification: egp_fx.pipeline.verify.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from egp_fx import distributed as ranks
from egp_fx.calibrate.calibration import calibrate, warn_unanalysed
from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.capture import COVERAGE_META_KEY
from egp_fx.errors import CompressError
from egp_fx.ir.batches import Batch, iter_batches
from egp_fx.ir.compare import ErrorMeter, tensor_leaves
from egp_fx.ir.copying import device_of, own_tensors, structural_copy, tensor_bytes
from egp_fx.ir.layer import CAPTURE_META_KEY
from egp_fx.ir.pickling import make_picklable
from egp_fx.ir.shapes import call_quietly
from egp_fx.passes import collect_options, pipeline_of
from egp_fx.passes.base import SHAPES_VALID, PassContext
from egp_fx.passes.cleanup import unshare

from . import ranks as shared
from .latency import WidthTable, timer_for
from .measures import measure
from .memory import check_fits, release_free_memory
from .report import (
    EXAMPLE_META_KEY,
    ORIGINAL_META_KEY,
    REPORT_META_KEY,
    CompressReport,
    Transient,
)
from .rollback import Run, only_no_ops
from .targets import TARGETS, target_options
from .verify import Verifier

log = logging.getLogger(__name__)


def output_error(gm: nn.Module, batches: list, refs: list[list[torch.Tensor]],
                 combine: Callable | None = None, what: str = "output error") -> float:
    """max |y - y_ref| / max |y_ref| over all outputs and batches (0 when identical); inf when an
    output has a NaN/Inf the reference lacks, or its structure differs. `combine`: over the
    batches of every rank (egp_fx.pipeline.ranks)."""
    meter = ErrorMeter()
    with torch.no_grad():
        for batch, ref in zip(batches, refs):
            batch = batch if isinstance(batch, Batch) else Batch((batch,))
            meter.add(tensor_leaves(call_quietly(gm, batch)), ref)
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

    BUDGET = 256 * 2 ** 20        # and at most a tenth of the weights, or FLOOR
    FLOOR = 16 * 2 ** 20          # a small model's outputs are kept whatever its size

    def __init__(self, model: nn.Module):
        self.outputs: list[list[torch.Tensor]] | None = []
        self.bytes = 0
        self.budget = min(self.BUDGET, max(tensor_bytes(model) // 10, self.FLOOR))

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


def _holds(report: CompressReport, tolerance: float) -> bool:
    errors = [report.max_error] + ([report.holdout_error] if report.holdout_error is not None
                                   else [])
    return all(e <= tolerance for e in errors)      # False for NaN and inf


def nothing_removed(original: fx.GraphModule, report: CompressReport) -> str | None:
    """The one line that says compress removed nothing (no rewrite but no-op drops applied),
    with what calibration saw; None when something was removed."""
    if not only_no_ops(report.applied):
        return None
    units = mixed = calls = 0
    for node in original.graph.nodes:
        st = node.meta.get(EGP_META_KEY)
        if isinstance(st, ActivationStats):
            affine = st.channel_affine()
            calls, units, mixed = calls + 1, units + len(affine), mixed + affine.count(None)
    if units and mixed == units:
        seen = f"all {units} units of the {calls} analysed activation calls are mixed"
    elif units:
        seen = (f"{units - mixed} of {units} units stay in one region, but no rewrite of them "
                "applies (see the refusals)")
    else:
        seen = "no activation call is analysed"
    folds = "; no fold applies" if not report.applied else "; only no-op nodes were dropped"
    return f"nothing to remove: {seen}{folds}"


def _check_options(passes, cost, target, options: dict) -> tuple[tuple[str, ...], dict]:
    """(the pipeline, each pass's options: the target's defaults under the given ones)."""
    passes = pipeline_of(passes)
    if cost not in ("flops", "latency"):
        raise CompressError(f"cost must be 'flops' or 'latency', got {cost!r}")
    if target not in TARGETS:
        raise CompressError(f"unknown target {target!r}; choose from {sorted(TARGETS)}")
    given = {**options, **target_options(target, options.get("channel_multiple"))}
    return passes, collect_options(given)


def compress(model: nn.Module, calib_loader: Iterable, *, max_batches: int | None = None,
             holdout_loader: Iterable | None = None, input_key: str | None = None,
             device: torch.device | str | None = None, tolerance: float = 1e-5,
             approx_tolerance: float = 1e-2,
             cost: str = "flops", latency_fn: Callable | None = None,
             passes: Sequence[str] | None = None, verify_samples: int | None = 8,
             target: str = "ort-cpu", capture: str = "auto", share_weights: bool = False,
             progress: bool = True, calibrated: fx.GraphModule | None = None,
             distributed: bool | None = None, **options) -> fx.GraphModule:
    """Return a smaller GraphModule computing the same function as `model` on the calibration data.

    tolerance         relative output error allowed for exact rewrites (default 1e-5)
    approx_tolerance  the same for rewrites that are not exact (allow_approximate=True)
    cost              "flops" (default) or "latency": measured on the target (egp_fx.pipeline.latency),
                      or by latency_fn(module, x) -> seconds when given
    passes            the pipeline: pass names in order (default egp_fx.passes.DEFAULT_PIPELINE)
    target            the hardware the model will run on: "ort-cpu", "cuda" or "generic"; sets
                      the width multiple of narrowed layers (egp_fx.pipeline.targets)
    **options         the passes' options, by name; each is a field of its pass's options
                      dataclass (egp_fx.passes.option_fields() lists them), among them
                      channel_multiple  overrides the target's width multiple (1 removes every
                                        dead channel) (dead_channels)
                      allow_approximate apply rewrites that are not exact (kxk o kxk conv
                                        merges), checked against approx_tolerance (fold_linear)
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
                      (egp_fx.pipeline.ranks)
    """
    passes, pass_options = _check_options(passes, cost, target, options)
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
    release_free_memory()             # calibration's activations, freed but still resident
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
    shapes_valid = calibrated is None and not reduce    # propagated by calibrate on `example`

    def working_copy() -> fx.GraphModule:
        gm = structural_copy(original)
        unshare(gm)
        gm.meta[SHAPES_VALID] = shapes_valid
        return gm

    timings = WidthTable(latency_fn or timer_for(target)) if cost == "latency" else None
    ctx = PassContext(example, pass_options, timings)
    run = Run(ctx, verifier, report, progress)
    gm, verdict = run.group(passes, working_copy)
    release_free_memory()
    # the last verdict holds for gm as it is; it covers all the calibration data when whole
    whole = combine is None and not holdout and (take is None or take >= sum(b.size for b in batches))
    report.max_error = verdict.float32 if whole and verdict is not None else \
        output_error(gm, batches, refs, combine)
    if holdout_loader is not None:
        report.holdout_error = output_error(gm, holdout, holdout_refs, combine, "held-out error")
    if run.unchecked is gm and not _holds(report, tolerance):
        # only no-op nodes were dropped, and the measurement above, their check, failed
        log.info("compress: dropping no-op nodes moved the output (error %.3g); verifying "
                 "pass by pass", report.max_error)
        report.rewrites, report.refusals, report.passes = [], [], []
        run.trust_no_ops = False
        gm, verdict = run.group(passes, working_copy)
        report.max_error = output_error(gm, batches, refs, combine)
        if holdout_loader is not None:
            report.holdout_error = output_error(gm, holdout, holdout_refs, combine,
                                                "held-out error")
    report.after = measure(gm, example)
    report.nothing_removed = nothing_removed(original, report)
    if report.nothing_removed:
        log.info("compress: %s", report.nothing_removed)
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
