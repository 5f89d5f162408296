"""A deliverable is never slower than the original as the user would deploy it.

    d = export_deliverable(original, compressed, "model.onnx", example)
    d.written          # "compressed", or "original" when the compressed model is slower
    d.message()        # None, or one line: how much slower, and why

1. the original and the compressed module are exported with export_onnx, each in its fastest
   form on the target (several exporters tried, the fastest kept);
2. `compare` times the two files side by side on the target (latency.py; `timer=` replaces it)
   at each of `latency_batches` (the example's first sample repeated): speed = original ms /
   compressed ms per batch size;
3. the compressed model counts as slower when the geometric mean of its speeds is below
   SLOWER (0.98: within 2% is measurement noise on a shared machine). Then the original's
   file is written to `path`, and the Deliverable says so, with the reason as a code and its
   facts (Reason): compress removed nothing, so only the form differs; or the two graphs were
   exported by different exporters; or the smaller graph runs slower on this runtime.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from egp_fx.pipeline.report import CompressReport

from . import onnx as onnx_export     # looked up at call time: export_onnx can be replaced
from .latency import TIMERS, Timer
from .onnx import DEFAULT_TARGET, LATENCY_BATCHES, ExportResult, example_batch, serving_batch

log = logging.getLogger(__name__)

SLOWER = 0.98


class Reason(str, Enum):
    """Why the compressed model is slower (its facts are in Deliverable.facts)."""
    NOTHING_REMOVED = "nothing-removed"       # parameters and FLOPs unchanged: only the form differs
    EXPORT_FORM = "export-form"               # the two graphs were written by different exporters
    NARROWED_SLOWER = "narrowed-slower"       # smaller, but the runtime runs it slower
    UNKNOWN = "unknown"                       # no report, and the same exporter for both


@dataclass
class Verdict:
    latency_ms: dict[int, dict[str, float]]   # batch size -> {"original": ms, "compressed": ms}
    speed: dict[int, float]                   # batch size -> original ms / compressed ms
    slower: bool
    reason: Reason | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    target: str = DEFAULT_TARGET

    @property
    def mean_speed(self) -> float:
        return math.exp(sum(math.log(s) for s in self.speed.values()) / len(self.speed))

    def speeds(self) -> str:
        return ", ".join(f"{s:.2f}x at batch {b} ({self.latency_ms[b]['original']:.3g} ms -> "
                         f"{self.latency_ms[b]['compressed']:.3g} ms)"
                         for b, s in self.speed.items())

    def message(self) -> str | None:
        """One line when the compressed model is slower: how much, and why; else None."""
        if not self.slower:
            return None
        return (f"the compressed model is slower than the original on {self.target}: "
                f"{self.speeds()}; {render(self.reason, self.facts)}")


@dataclass
class Deliverable:
    path: Path
    written: str                              # "compressed" or "original"
    original: ExportResult
    compressed: ExportResult
    verdict: Verdict

    def message(self) -> str | None:
        text = self.verdict.message()
        return f"{text}. Wrote the original's ONNX to {self.path} instead" if text else None


def render(reason: Reason | None, facts: dict) -> str:
    """The reason in words, from its code and facts (the one place this text is made)."""
    if reason is Reason.NOTHING_REMOVED:
        if "compressed_exporter" not in facts:
            form = "only the form it runs in differs"
        elif facts["compressed_exporter"] == facts["original_exporter"]:
            form = f"the two were exported alike ({facts['compressed_exporter']} exporter)"
        else:
            form = (f"its graph exports to a slower form ({facts['compressed_exporter']} "
                    f"exporter; the original: {facts['original_exporter']})")
        return (f"compress removed nothing ({facts['params_before']:,} parameters and "
                f"{facts['flops_before']:,} FLOPs unchanged), and {form}")
    if reason is Reason.EXPORT_FORM:
        return (f"the compressed graph's fastest ONNX form is the {facts['compressed_exporter']} "
                f"exporter's, the original's the {facts['original_exporter']} exporter's")
    if reason is Reason.NARROWED_SLOWER:
        return (f"compress removed {facts['params_before'] - facts['params_after']:,} parameters "
                f"and {facts['flops_before'] - facts['flops_after']:,} FLOPs, but onnxruntime "
                f"runs the smaller graph slower (layer widths off its preferred blocks, or "
                f"fewer fused operators)")
    return "the reason is not known (no compress report to compare the graphs by)"


def reason_for(report: CompressReport | None,
               exporters: tuple[str, str] | None = None) -> tuple[Reason, dict]:
    """(why the compressed model is slower, the facts): from compress's report and, for ONNX
    files, the exporters of (original, compressed)."""
    facts: dict[str, Any] = {} if exporters is None else {
        "original_exporter": exporters[0], "compressed_exporter": exporters[1]}
    if report is not None and report.after is not None:
        facts |= {"params_before": report.before.params, "params_after": report.after.params,
                  "flops_before": report.before.flops, "flops_after": report.after.flops}
        if (report.before.params, report.before.flops) == (report.after.params,
                                                           report.after.flops):
            return Reason.NOTHING_REMOVED, facts
        if exporters is None or exporters[0] == exporters[1]:
            return Reason.NARROWED_SLOWER, facts
    if exporters is not None and exporters[0] != exporters[1]:
        return Reason.EXPORT_FORM, facts
    return Reason.UNKNOWN, facts


def compare(original: ExportResult, compressed: ExportResult, example_inputs: Any, *,
            report: CompressReport | None = None, timer: Timer | None = None,
            latency_batches: Sequence[int] = LATENCY_BATCHES,
            dynamic_batch: bool = True) -> Verdict:
    """Time the two exported files side by side (see the module docstring)."""
    batch = example_batch(example_inputs)
    timer = timer or TIMERS[DEFAULT_TARGET]
    files = {"original": original.path, "compressed": compressed.path}
    latency: dict[int, dict[str, float]] = {}
    for size in (dict.fromkeys(latency_batches) if dynamic_batch else [batch.size]):
        feed = serving_batch(batch, size) if dynamic_batch else batch
        seconds = timer(files, feed, original.inputs)
        latency[size] = {k: 1e3 * float(seconds[k]) for k in files}
    speed = {b: t["original"] / t["compressed"] for b, t in latency.items()}
    verdict = Verdict(latency, speed, False)
    verdict.slower = verdict.mean_speed < SLOWER
    if verdict.slower:
        verdict.reason, verdict.facts = reason_for(report, (original.exporter,
                                                            compressed.exporter))
    log.info("compressed vs original on %s: %s", verdict.target, verdict.speeds())
    return verdict


def export_deliverable(original: nn.Module, compressed: nn.Module, path: str | Path,
                       example_inputs: Any, *, report: CompressReport | None = None,
                       timer: Timer | None = None,
                       latency_batches: Sequence[int] = LATENCY_BATCHES,
                       **export_options) -> Deliverable:
    """Export both, time them, and write the faster to `path` (see the module docstring).
    `report` (compress's) names the reason when the compressed model is slower;
    `export_options` go to export_onnx for both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(export_options, timer=timer, latency_batches=latency_batches)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".egp_deliver_") as tmp:
        ours = onnx_export.export_onnx(compressed, Path(tmp) / "compressed.onnx", example_inputs, **options)
        theirs = onnx_export.export_onnx(original, Path(tmp) / "original.onnx", example_inputs, **options)
        verdict = compare(theirs, ours, example_inputs, report=report, timer=timer,
                          latency_batches=latency_batches,
                          dynamic_batch=export_options.get("dynamic_batch", True))
        written = "original" if verdict.slower else "compressed"
        kept = theirs if verdict.slower else ours
        os.replace(kept.path, path)
        kept.path = path
    deliverable = Deliverable(path, written, theirs, ours, verdict)
    if verdict.slower:
        log.warning("%s", deliverable.message())
    return deliverable
