"""Inspect what compress() did: per-layer decisions, graph diff, graph export, pictures, HTML.

    gm = egp_fx.compress(model, loader)
    ins = egp_fx.inspect.inspect(gm)          # or egp_fx.inspect(gm) once exported at top level
    print(ins.table)                          # one row per activation call, with its decision
    print(ins.diff)                           # removed / folded / added / modified, per block
    ins.graph                                 # networkx DiGraph of the original, annotated
    ins.write_html("report.html")             # self-contained report
    ins.write_pictures("pictures/")           # before/after picture + entropy chart, SVG and PNG

Everything is derived from the compressed GraphModule: its CompressReport (gm.meta["egp_report"])
and the calibrated original (gm.meta["egp_original"]). Nothing is modified.

Under an initialised torch.distributed process group every rank holds the same compressed model
(egp_fx.distributed), and only rank 0 writes files: on the other ranks write_html,
write_pictures and save_graph write nothing and return the path (html() still renders).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from egp_fx.ir.batches import Batch, as_batch
from egp_fx.pipeline.report import (
    EXAMPLE_META_KEY,
    CompressReport,
    original_of,
    report_of,
)

from .blocks import BlockNamer
from .costs import node_costs
from .diff import BlockDiff, GraphDiff, NodeChange
from .graph import depths, graph_of, save_graph
from .table import DecisionRow, DecisionTable

__all__ = ["BlockDiff", "DecisionRow", "DecisionTable", "GraphDiff", "Inspection", "NodeChange",
           "inspect"]

log = logging.getLogger(__name__)


@dataclass
class Inspection:
    """What compress measured and changed, in forms to read, query and save."""

    original: fx.GraphModule          # traced, calibrated original (node.meta["egp"] stats)
    compressed: fx.GraphModule
    report: CompressReport
    table: DecisionTable              # one row per activation call of the original
    diff: GraphDiff
    graph: nx.DiGraph                 # the original graph, nodes annotated with their fate
    graph_after: nx.DiGraph           # the compressed graph, annotated likewise
    bench: Any = None                 # a BenchResult, its JSON/markdown text, or rows
    title: str = ""
    meta: dict = field(default_factory=dict)

    def depths(self) -> dict[str, dict[str, int]]:
        """Conv/linear and nonlinear calls on the longest path, before and after."""
        return {"before": depths(self.graph), "after": depths(self.graph_after)}

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.table.counts().items() if v)
        return f"{self.report.summary()}\nactivation calls: {len(self.table)} ({counts})"

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.table}\n\n{self.diff}"

    def to_dict(self) -> dict:
        return {"title": self.title, "report": self.report.to_dict(), "depths": self.depths(),
                "decision_counts": self.table.counts(), "table": self.table.to_dicts(),
                "diff": self.diff.to_dict()}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def save_graph(self, path: str | Path, *, after: bool = False) -> Path:
        """Save the annotated original (or, with after=True, compressed) graph: .graphml or .json."""
        if _not_writer(path):
            return Path(path)
        return save_graph(self.graph_after if after else self.graph, path)

    def figures(self) -> dict:
        """{"before_after": Figure, "entropy": Figure} (matplotlib; close them when done)."""
        from .charts import entropy_chart
        from .picture import before_after
        return {"before_after": before_after(self.graph, self.graph_after, title=self.title),
                "entropy": entropy_chart(self.table, title=self.title)}

    def write_pictures(self, directory: str | Path, formats: tuple[str, ...] = ("svg", "png")
                       ) -> list[Path]:
        """Write every figure in each format to `directory`; returns the paths written."""
        from .picture import save_figure
        directory = Path(directory)
        if _not_writer(directory):
            return []
        directory.mkdir(parents=True, exist_ok=True)
        return [p for name, fig in self.figures().items()
                for p in save_figure(fig, directory / name, formats)]

    def html(self) -> str:
        """The self-contained HTML report as a string."""
        from .html import render_html
        return render_html(self)

    def write_html(self, path: str | Path) -> Path:
        path = Path(path)
        if _not_writer(path):
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        log.info("wrote %s", path)
        return path


def _not_writer(path) -> bool:
    """True on a rank other than 0 of an initialised process group: it writes no file."""
    from egp_fx.distributed import is_writer, rank
    if is_writer():
        return False
    log.debug("rank %d: %s is written by rank 0", rank(), path)
    return True


def _example_input(gm: fx.GraphModule, given) -> Batch:
    if given is not None:
        return as_batch(given)
    stored = gm.meta.get(EXAMPLE_META_KEY)
    if stored is not None:
        return as_batch(stored)
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta") if node.op == "placeholder" else None
        if tm is not None and hasattr(tm, "shape"):
            return Batch((torch.zeros(tuple(tm.shape), dtype=tm.dtype),))
    raise ValueError("inspect() needs the input shape to count FLOPs per node: pass "
                     "example_input= (one batch of calibration data)")


def inspect(compressed: fx.GraphModule, *, example_input: torch.Tensor | None = None,
            bench: Any = None, title: str = "") -> Inspection:
    """Inspect a GraphModule returned by egp_fx.compress().

    example_input: one input batch (only its first sample is used, for shapes and FLOPs);
                   taken from the graph's recorded shapes when omitted.
    bench:         benchmark numbers to include in the HTML report (a BenchResult, its JSON or
                   markdown text, or a list of row dicts).
    """
    report = report_of(compressed)
    original = original_of(compressed)
    if not isinstance(original, fx.GraphModule):
        raise KeyError("this module carries no captured original (it is kept in memory only, "
                       "not saved with the module): inspect() needs the module egp_fx.compress() "
                       "returned in this process")
    x = _example_input(compressed, example_input)
    costs = (node_costs(original, x), node_costs(compressed, x))
    namer = BlockNamer(original)
    blocks = (namer.blocks(original), namer.blocks(compressed))
    table = DecisionTable.build(original, compressed, report, blocks[0])
    diff = GraphDiff.build(original, compressed, report, costs, blocks)
    rows, status = table.by_node(), diff.status()
    change = {c.name: f"into {c.into}" if c.into else c.detail for c in diff.changes}
    graph = graph_of(original, costs=costs[0], blocks=blocks[0], rows=rows, status=status,
                     change=change, name="before")
    graph_after = graph_of(compressed, costs=costs[1], blocks=blocks[1], rows=rows,
                           status={k: v for k, v in status.items() if v in ("added", "modified")},
                           change=change, name="after")
    return Inspection(original, compressed, report, table, diff, graph, graph_after, bench, title)
