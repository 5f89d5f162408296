"""The report that travels with a compressed module (gm.meta["egp_report"]).

Rewrites, refusals and decisions are kept as data (kinds and reason codes with their facts);
to_dict gives each refusal its code, its details and its text (egp_fx.passes.reasons renders it).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch.fx as fx

from egp_fx.ir.pickling import pickled_meta
from egp_fx.passes.base import Decision, DecisionKind, Refusal, Rewrite, Status
from egp_fx.passes.reasons import Why

from .measures import Totals

REPORT_META_KEY = "egp_report"
ORIGINAL_META_KEY = "egp_original"
EXAMPLE_META_KEY = "egp_example_input"


class Transient:
    """Holds an object for this process only: it pickles to an empty holder.

    compress keeps the calibrated original in the result's meta this way, so that inspect can
    compare the two, while torch.save of the result does not store the original model too."""

    def __init__(self, value=None):
        self.value = value

    def __reduce__(self):
        return (Transient, ())

    def __deepcopy__(self, memo):
        return Transient(self.value)


def original_of(gm: fx.GraphModule) -> fx.GraphModule | None:
    """The calibrated original compress kept (None after a save and load)."""
    held = getattr(gm, "meta", {}).get(ORIGINAL_META_KEY)
    return held.value if isinstance(held, Transient) else held


@dataclass
class PassSummary:
    name: str
    rewrites: int
    refusals: int
    rolled_back: int
    max_error: float
    seconds: float


@dataclass
class CompressReport:
    before: Totals
    after: Totals | None
    tolerance: float
    rewrites: list[Rewrite] = field(default_factory=list)      # applied and rolled back
    refusals: list[Refusal] = field(default_factory=list)
    passes: list[PassSummary] = field(default_factory=list)
    max_error: float = 0.0                                      # final output error, calib data
    holdout_error: float | None = None
    seconds: float = 0.0
    target: str = "ort-cpu"
    capture: object = None                                      # capture.CaptureInfo
    coverage: object = None                                     # capture.Coverage
    nothing_removed: str | None = None                          # the line saying so, if so

    @property
    def applied(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.status is Status.APPLIED]

    @property
    def rolled_back(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.status is not Status.APPLIED]

    def decisions(self) -> dict[str, Decision]:
        """Activation node -> what was decided for it (the last applied decision wins; a
        refusal makes it KEPT with the first reason)."""
        out: dict[str, Decision] = {}
        for ref in self.refusals:
            if ref.activation:
                out.setdefault(ref.activation, Decision(DecisionKind.KEPT, ref.why))
        for rw in self.applied:
            if rw.activation and rw.decision:
                out[rw.activation] = rw.decision
        return out

    def decisions_by_path(self) -> dict[str, list[Decision]]:
        """Module path of an activation -> the decisions for its calls (a module called twice,
        as torchvision's BasicBlock calls its ReLU, has two entries)."""
        paths: dict[str, str] = {}
        for item in [*self.refusals, *self.rewrites]:
            if item.activation and item.path:
                paths.setdefault(item.activation, item.path)
        out: dict[str, list[Decision]] = {}
        for node, decision in self.decisions().items():
            if node in paths:
                out.setdefault(paths[node], []).append(decision)
        return out

    def to_dict(self) -> dict:
        """Plain JSON types; an infinite error (NaN/Inf output, see egp_fx.ir.compare) is "inf"."""
        def rewrite(r: Rewrite) -> dict:
            d = asdict(r)
            d["decision"] = r.decision.to_dict() if r.decision else None
            d["status"] = r.status.value
            return d

        def refusal(r: Refusal) -> dict:
            return {"pass_name": r.pass_name, "key": r.key, "nodes": r.nodes,
                    "code": r.code.value, "details": _facts(r.details), "reason": r.reason,
                    "activation": r.activation, "path": r.path}
        capture = self.capture.to_dict() if hasattr(self.capture, "to_dict") else None
        coverage = self.coverage.to_dict() if hasattr(self.coverage, "to_dict") else None
        return _json_safe({"before": self.before.to_dict(),
                           "after": self.after.to_dict() if self.after else None,
                           "tolerance": self.tolerance, "max_error": self.max_error,
                           "holdout_error": self.holdout_error, "seconds": self.seconds,
                           "target": self.target, "capture": capture, "coverage": coverage,
                           "nothing_removed": self.nothing_removed,
                           "passes": [asdict(p) for p in self.passes],
                           "rewrites": [rewrite(r) for r in self.rewrites],
                           "refusals": [refusal(r) for r in self.refusals]})

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    def summary(self) -> str:
        b, a = self.before, self.after or self.before
        w = max(14, len(f"{max(b.flops, b.params):,}") + 2)
        lines = [
            f"{'':22}{'before':>{w}}{'after':>{w}}",
            f"{'params':22}{b.params:>{w},}{a.params:>{w},}",
            f"{'FLOPs':22}{b.flops:>{w},}{a.flops:>{w},}",
            f"{'conv/linear depth':22}{b.weighted_depth:>{w}}{a.weighted_depth:>{w}}",
            f"{'nonlinear depth':22}{b.nonlinear_depth:>{w}}{a.nonlinear_depth:>{w}}",
            f"{'graph nodes':22}{b.nodes:>{w}}{a.nodes:>{w}}",
            f"rewrites applied: {len(self.applied)}, rolled back: {len(self.rolled_back)}, "
            f"refused: {len(self.refusals)}; max relative output error {self.max_error:.2e} "
            f"(tolerance {self.tolerance:.0e})",
        ]
        if self.nothing_removed:
            lines.append(self.nothing_removed)
        if self.capture is not None and hasattr(self.capture, "describe"):
            lines.append(self.capture.describe())
        if getattr(self.coverage, "unanalysed", 0) or getattr(self.coverage, "other", None):
            lines.append(self.coverage.describe())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _facts(details) -> dict:
    """A refusal's details as plain data: a nested Why becomes {code, details, text}."""
    def plain(v):
        if isinstance(v, Why):
            return {"code": v.code.value, "details": _facts(v.details), "text": str(v)}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in details.items()}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):   # str enums
        return value.value
    return value


def report_of(gm: fx.GraphModule) -> CompressReport:
    """The CompressReport of a module returned by compress() (also after torch.save/torch.load,
    see egp_fx.ir.pickling)."""
    report = getattr(gm, "meta", {}).get(REPORT_META_KEY) or pickled_meta(gm).get(REPORT_META_KEY)
    if report is None:
        raise KeyError("this module carries no egp_fx report: it was not returned by compress()")
    return report
