"""The per-layer decision table: one row per activation call of the traced original.

Each row joins what calibration measured (channels; dead, constant and linear channels; the EGP
and EASIER entropies; the smallest margin from a region boundary) with what compress decided
(CompressReport.decisions(): a passes.base.Decision, removed / narrowed / linearised / folded /
kept, with the reason every pass gave for leaving it). An activation that vanished without a
decision of its own (it sat in a branch another rewrite removed) says which rewrite took it.
Activation calls that run but were not observed (inside a leaf module the capture kept whole,
or an op the classifier does not know: capture/coverage.py) get one row per hiding node, with
category "not analysed" and the reason ("3 activation call(s) inside blocks.2 (MyBlock) not
analysed: ..."). Layers are named by their module path. Rendered as text, JSON and an HTML
fragment.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch.fx as fx

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.capture.coverage import COVERAGE_META_KEY, Hidden
from egp_fx.ir.attrs import module_path
from egp_fx.passes.base import Decision, DecisionKind
from egp_fx.pipeline.report import CompressReport

from ._markup import html_table, text_table

CATEGORIES = tuple(k.value for k in DecisionKind)


@dataclass
class DecisionRow:
    node: str                  # activation call in the original graph
    path: str                  # its module path in the model
    block: str
    kind: str                  # relu, gelu, ...
    channels: int
    dead: int
    constant: int
    linear: int
    egp_entropy: float
    easier_entropy: float
    margin: float              # smallest margin over single-region channels (0 if none)
    decision: str              # the Decision as text ("narrowed 64 -> 48", ...)
    category: str              # its kind: one of CATEGORIES
    reason: str                # why it was kept, or what the rewrite did
    params_saved: int = 0
    flops_saved: int = 0
    dead_channels: list[int] = field(default_factory=list)
    history: list[str] = field(default_factory=list)   # every rewrite/refusal about this call

    @property
    def single_region(self) -> int:
        return self.dead + self.constant + self.linear


def _undecided(st: ActivationStats, node: str, report: CompressReport,
               survivors: set[str]) -> tuple[Decision, str]:
    """(decision, reason) for an activation the report has no decision for."""
    if node not in survivors:
        by = [rw for rw in report.applied if node in rw.nodes]
        if by:
            return Decision(DecisionKind.REMOVED), f"removed with {by[0].key} ({by[0].kind}: {by[0].detail})"
        return Decision(DecisionKind.REMOVED), "removed as dead code after the rewrites around it"
    if not (st.dead_channels or st.constant_channels or st.linear_channels):
        return Decision(DecisionKind.KEPT), "every channel is nonlinear on the calibration data"
    return Decision(DecisionKind.KEPT), "single-region channels, but no pass proposed a rewrite"


def _row(gm: fx.GraphModule, node: fx.Node, st: ActivationStats, block: str,
         report: CompressReport, decisions: dict[str, Decision], survivors: set[str]) -> DecisionRow:
    applied = [rw for rw in report.applied if rw.activation == node.name]
    refused = [rf for rf in report.refusals if rf.activation == node.name]
    history = [f"{rw.pass_name}/{rw.kind} {rw.status}: {rw.detail}" for rw in report.rewrites
               if rw.activation == node.name]
    history += [f"{rf.pass_name} refused: {rf.reason}" for rf in refused]
    if node.name in decisions:
        decision = decisions[node.name]
        if decision.kind is DecisionKind.KEPT:
            decision = Decision(DecisionKind.KEPT)
            reason = "; ".join(dict.fromkeys(rf.reason for rf in refused))
        else:
            reason = "; ".join(rw.detail for rw in applied)
    else:
        decision, reason = _undecided(st, node.name, report, survivors)
    return DecisionRow(
        node.name, module_path(node, gm), block, st.kind, st.num_channels, len(st.dead_channels),
        len(st.constant_channels), len(st.linear_channels), st.egp_entropy, st.easier_entropy,
        st.min_margin(), str(decision), decision.kind.value, reason,
        sum(rw.params_saved for rw in applied), sum(rw.flops_saved for rw in applied),
        st.dead_channels, history)


def _hidden_row(h: Hidden, block: str) -> DecisionRow:
    return DecisionRow(h.node, h.path, block, "+".join(sorted(h.kinds)), 0, 0, 0, 0, 0.0, 0.0,
                       0.0, DecisionKind.NOT_ANALYSED.value, DecisionKind.NOT_ANALYSED.value,
                       h.describe())


class DecisionTable(list):
    """A list of DecisionRow, printable, with to_json() and to_html()."""

    @classmethod
    def build(cls, original: fx.GraphModule, compressed: fx.GraphModule, report: CompressReport,
              blocks: dict[str, str]) -> DecisionTable:
        """One row per calibrated activation call of `original`, and one per node hiding
        activation calls that were not analysed, in graph order."""
        decisions = report.decisions()
        survivors = {n.name for n in compressed.graph.nodes}
        coverage = getattr(original, "meta", {}).get(COVERAGE_META_KEY)
        hidden = {h.node: h for h in coverage.hidden} if coverage is not None else {}
        rows = []
        for n in original.graph.nodes:
            if isinstance(n.meta.get(EGP_META_KEY), ActivationStats):
                rows.append(_row(original, n, n.meta[EGP_META_KEY], blocks.get(n.name, ""),
                                 report, decisions, survivors))
            if n.name in hidden:
                rows.append(_hidden_row(hidden[n.name], blocks.get(n.name, "")))
        return cls(rows)

    def by_node(self) -> dict[str, DecisionRow]:
        return {r.node: r for r in self}

    def counts(self) -> dict[str, int]:
        """Number of rows per decision category (all categories present, in CATEGORIES order)."""
        return {c: sum(r.category == c for r in self) for c in CATEGORIES}

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self]

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dicts(), **kw)

    _HEAD = ("activation", "module", "kind", "ch", "dead", "const", "linear", "H_egp", "margin",
             "decision", "reason")

    def _cells(self, r: DecisionRow) -> list[str]:
        return [r.node, r.path, r.kind, str(r.channels), str(r.dead), str(r.constant),
                str(r.linear), f"{r.egp_entropy:.3f}", f"{r.margin:.3g}", r.decision, r.reason]

    def __str__(self) -> str:
        return text_table(self._HEAD, [self._cells(r) for r in self], right=(3, 4, 5, 6, 7, 8))

    def to_html(self) -> str:
        """An HTML <table> fragment; each row has the class `d-<category>`."""
        return html_table(self._HEAD, [self._cells(r) for r in self],
                          row_classes=[f"d-{r.category.replace(' ', '-')}" for r in self],
                          numeric=(3, 4, 5, 6, 7, 8), css_class="decisions")
