"""The report that travels with a compressed module (gm.meta["egp_report"])."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch.fx as fx

from .measures import Totals
from .passes.base import Refusal, Rewrite

REPORT_META_KEY = "egp_report"


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
    after: Totals
    tolerance: float
    rewrites: list[Rewrite] = field(default_factory=list)      # applied and rolled back
    refusals: list[Refusal] = field(default_factory=list)
    passes: list[PassSummary] = field(default_factory=list)
    max_error: float = 0.0                                      # final output error, calib data
    holdout_error: float | None = None
    seconds: float = 0.0

    @property
    def applied(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.status == "applied"]

    @property
    def rolled_back(self) -> list[Rewrite]:
        return [r for r in self.rewrites if r.status != "applied"]

    def decisions(self) -> dict[str, str]:
        """Activation node -> what was decided for it (the last applied decision wins)."""
        out: dict[str, str] = {}
        for ref in self.refusals:
            if ref.activation:
                out.setdefault(ref.activation, f"kept: {ref.reason}")
        for rw in self.applied:
            if rw.activation and rw.decision:
                out[rw.activation] = rw.decision
        return out

    def to_dict(self) -> dict:
        """Plain JSON types; an infinite error (NaN/Inf output, see egp_fx.verify) is "inf"."""
        return _json_safe({"before": self.before.to_dict(), "after": self.after.to_dict(),
                           "tolerance": self.tolerance, "max_error": self.max_error,
                           "holdout_error": self.holdout_error, "seconds": self.seconds,
                           "passes": [asdict(p) for p in self.passes],
                           "rewrites": [asdict(r) for r in self.rewrites],
                           "refusals": [asdict(r) for r in self.refusals]})

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kw)

    def summary(self) -> str:
        b, a = self.before, self.after
        lines = [
            f"{'':22}{'before':>14}{'after':>14}",
            f"{'params':22}{b.params:>14,}{a.params:>14,}",
            f"{'FLOPs':22}{b.flops:>14,}{a.flops:>14,}",
            f"{'conv/linear depth':22}{b.weighted_depth:>14}{a.weighted_depth:>14}",
            f"{'nonlinear depth':22}{b.nonlinear_depth:>14}{a.nonlinear_depth:>14}",
            f"{'graph nodes':22}{b.nodes:>14}{a.nodes:>14}",
            f"rewrites applied: {len(self.applied)}, rolled back: {len(self.rolled_back)}, "
            f"refused: {len(self.refusals)}; max relative output error {self.max_error:.2e} "
            f"(tolerance {self.tolerance:.0e})",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_of(gm: fx.GraphModule) -> CompressReport:
    """The CompressReport of a module returned by compress()."""
    try:
        return gm.meta[REPORT_META_KEY]
    except (AttributeError, KeyError):
        raise KeyError("this module carries no egp_fx report: it was not returned by compress()") from None
