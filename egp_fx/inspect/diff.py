"""The graph diff between the traced original and the compressed GraphModule.

compress keeps the names of the nodes that survive, so nodes are matched by name:
- removed  : in the original only; `by` names the applied rewrite that lists the node, or
             "dead code" when it went with eliminate_dead_code after a rewrite cut its users;
- folded   : removed by a folding rewrite (fold_bn, a fold rule, or a FOLDED decision);
             `into` names the node that absorbed it;
- added    : in the compressed graph only (constants, explicit affine maps a pass inserted);
- modified : in both, but the module's tensors changed shape (narrowed), values (something was
             folded into it) or type.
Per block (see blocks.py) the diff sums parameters and FLOPs before and after from per-node
costs (costs.py), so the block figures add up to the report's totals.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from egp_fx.ir.ops import Ops
from egp_fx.passes.base import DecisionKind, Rewrite
from egp_fx.pipeline.measures import NONLINEAR, WEIGHTED
from egp_fx.pipeline.report import CompressReport

from ._markup import html_table, percent_change, text_table
from .costs import NodeCost

_INTO = re.compile(r"folded into (\S+)")
CHANGES = ("removed", "folded", "added", "modified")


@dataclass
class NodeChange:
    name: str
    op: str
    target: str
    block: str
    change: str                # one of CHANGES
    by: str                    # "pass/kind key" of the rewrite(s), or "dead code"
    into: str | None
    detail: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class BlockDiff:
    block: str
    nodes_before: int
    nodes_after: int
    removed: int
    folded: int
    added: int
    modified: int
    weighted_before: int
    weighted_after: int
    nonlinear_before: int
    nonlinear_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.folded or self.added or self.modified)


def _removal(rws: list[Rewrite], survivors: set[str], name: str) -> tuple[str, str | None, str]:
    """(change, into, detail) for a node that is gone: the last rewrite listing it decides.

    It was folded when that rewrite folds (fold_bn, a fold rule, a FOLDED decision) and
    the node is not the one folded into; otherwise it was removed.
    """
    if not rws:
        return "removed", None, "dead code: no rewrite lists it; its users went"
    last = rws[-1]
    folded = last.decision is not None and last.decision.kind is DecisionKind.FOLDED
    if "fold" in last.kind or folded:
        survivor = next((n for n in reversed(last.nodes) if n in survivors and n != name), None)
        m = _INTO.search(last.detail)
        into = survivor or (m.group(1) if m else None)
        if into != name:
            return "folded", into, last.detail
    return "removed", None, last.detail


def _tensor_state(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict[str, torch.Tensor]] | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return type(mod).__name__, dict(mod.state_dict())
    if node.op == "get_attr":
        *path, leaf = str(node.target).split(".")
        value = getattr(gm.get_submodule(".".join(path)) if path else gm, leaf, None)
        if isinstance(value, torch.Tensor):
            return "tensor", {"": value}
    return None


def _modification(before, after) -> str | None:
    """What changed between two (type, tensors) states, or None."""
    if before is None or after is None:
        return None
    (tb, sb), (ta, sa) = before, after
    if tb != ta:
        return f"replaced {tb} -> {ta}"
    parts = [f"{k or 'value'} {list(sb[k].shape)} -> {list(sa[k].shape)}"
             for k in sb if k in sa and sb[k].shape != sa[k].shape]
    parts += [f"{k} added" for k in sa if k not in sb] + [f"{k} removed" for k in sb if k not in sa]
    if not parts and any(not torch.equal(sb[k].detach().cpu(), sa[k].detach().cpu()) for k in sb):
        parts.append("weights changed")
    return "; ".join(parts) or None


def _by(rws: list[Rewrite]) -> str:
    return ", ".join(f"{rw.kind} {rw.key}" if rw.kind == rw.pass_name
                     else f"{rw.pass_name}/{rw.kind} {rw.key}" for rw in rws)


class GraphDiff:
    """Node changes and per-block totals between two graphs (build with GraphDiff.build)."""

    def __init__(self, changes: list[NodeChange], blocks: list[BlockDiff]):
        self.changes = changes
        self.blocks = blocks

    @classmethod
    def build(cls, original: fx.GraphModule, compressed: fx.GraphModule, report: CompressReport,
              costs: tuple[dict[str, NodeCost], dict[str, NodeCost]],
              blocks: tuple[dict[str, str], dict[str, str]]) -> GraphDiff:
        before, after = {n.name: n for n in original.graph.nodes}, {n.name: n for n in compressed.graph.nodes}
        cost_b, cost_a = costs
        zero, survivors = NodeCost(None, 0, 0), set(after)
        changes = []
        for name, node in before.items():
            rws = [rw for rw in report.applied if name in rw.nodes]
            by = _by(rws)
            cb, ca = cost_b.get(name, zero), cost_a.get(name, zero)
            if name not in after:
                change, into, detail = _removal(rws, survivors, name)
                changes.append(NodeChange(name, node.op, str(node.target), blocks[0][name], change,
                                          by or "dead code", into, detail, cb.params, 0, cb.flops, 0))
                continue
            what = _modification(_tensor_state(original, node), _tensor_state(compressed, after[name]))
            if what:
                changes.append(NodeChange(name, node.op, str(node.target), blocks[0][name], "modified",
                                          by, None, what, cb.params, ca.params, cb.flops, ca.flops))
        for name, node in after.items():
            if name not in before:
                ca = cost_a.get(name, zero)
                changes.append(NodeChange(name, node.op, str(node.target), blocks[1][name], "added",
                                          "", None, node.format_node(), 0, ca.params, 0, ca.flops))
        return cls(changes, _block_totals(original, compressed, changes, costs, blocks))

    def of(self, change: str) -> list[NodeChange]:
        return [c for c in self.changes if c.change == change]

    @property
    def removed(self) -> list[str]:
        return [c.name for c in self.of("removed")]

    @property
    def folded(self) -> list[str]:
        return [c.name for c in self.of("folded")]

    @property
    def added(self) -> list[str]:
        return [c.name for c in self.of("added")]

    @property
    def modified(self) -> list[str]:
        return [c.name for c in self.of("modified")]

    def status(self) -> dict[str, str]:
        """Node name (of either graph) -> its change; unchanged nodes are absent."""
        return {c.name: c.change for c in self.changes}

    def totals(self) -> dict[str, int]:
        keys = ("params_before", "params_after", "flops_before", "flops_after")
        return {k: sum(getattr(b, k) for b in self.blocks) for k in keys}

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "blocks": [asdict(b) for b in self.blocks],
                "changes": [asdict(c) for c in self.changes]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    _BLOCK_HEAD = ("block", "nodes", "removed", "folded", "added", "modified", "conv/linear",
                   "nonlinear", "params", "params %", "FLOPs", "FLOPs %")
    _CHANGE_HEAD = ("node", "change", "block", "by", "into / detail")

    def _block_cells(self, b: BlockDiff) -> list[str]:
        return [b.block, f"{b.nodes_before} -> {b.nodes_after}", str(b.removed), str(b.folded),
                str(b.added), str(b.modified), f"{b.weighted_before} -> {b.weighted_after}",
                f"{b.nonlinear_before} -> {b.nonlinear_after}",
                f"{b.params_before:,} -> {b.params_after:,}", percent_change(b.params_before, b.params_after),
                f"{b.flops_before:,} -> {b.flops_after:,}", percent_change(b.flops_before, b.flops_after)]

    @staticmethod
    def _change_cells(c: NodeChange) -> list[str]:
        return [c.name, c.change, c.block, c.by, f"into {c.into}: {c.detail}" if c.into else c.detail]

    def __str__(self) -> str:
        blocks = text_table(self._BLOCK_HEAD, [self._block_cells(b) for b in self.blocks],
                            right=(2, 3, 4, 5, 9, 11))
        changes = text_table(self._CHANGE_HEAD, [self._change_cells(c) for c in self.changes])
        return f"{blocks}\n\n{changes}"

    def blocks_html(self) -> str:
        return html_table(self._BLOCK_HEAD, [self._block_cells(b) for b in self.blocks],
                          row_classes=["changed" if b.changed else "" for b in self.blocks],
                          numeric=(2, 3, 4, 5, 8, 9, 10, 11), css_class="blocks")

    def changes_html(self) -> str:
        return html_table(self._CHANGE_HEAD, [self._change_cells(c) for c in self.changes],
                          row_classes=[f"c-{c.change}" for c in self.changes], css_class="changes")


def _block_totals(original, compressed, changes, costs, blocks) -> list[BlockDiff]:
    order = list(dict.fromkeys([*blocks[0].values(), *blocks[1].values()]))
    rows = {b: dict(nodes_before=0, nodes_after=0, removed=0, folded=0, added=0, modified=0,
                    weighted_before=0, weighted_after=0, nonlinear_before=0, nonlinear_after=0,
                    params_before=0, params_after=0, flops_before=0, flops_after=0) for b in order}
    for gm, cost, block, side in ((original, costs[0], blocks[0], "before"),
                                  (compressed, costs[1], blocks[1], "after")):
        ops = Ops(gm)
        for node in gm.graph.nodes:
            row = rows[block[node.name]]
            if node.op not in ("placeholder", "output", "get_attr"):
                row[f"nodes_{side}"] += 1
            role = ops(node).role
            row[f"weighted_{side}"] += role in WEIGHTED
            row[f"nonlinear_{side}"] += role in NONLINEAR
            c = cost.get(node.name)
            if c is not None:
                row[f"params_{side}"] += c.params
                row[f"flops_{side}"] += c.flops
    for c in changes:
        rows[c.block][c.change] += 1
    return [BlockDiff(b, **v) for b, v in rows.items()
            if v["nodes_before"] or v["nodes_after"] or v["params_before"] or v["params_after"]]
