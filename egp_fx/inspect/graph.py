"""The graph as a networkx DiGraph that users can query and save, and depth measures on it.

Every fx node becomes a DiGraph node (keyed by its name) with scalar attributes only, so the
graph saves as GraphML as well as node-link JSON:

    op, target, module_type, block, role (conv/linear/matmul/norm/act/add/concat/pool, compute
    for any other op that does FLOPs such as a fused attention, input/output/attr/other),
    shape ("1x64x56x56"), flops, params, weighted, nonlinear,
    activation (kind or ""), channels, dead, constant, linear, egp_entropy, margin,
    decision, category (see table.py), status (kept/removed/folded/added/modified), change
    (what the diff says happened to it: "weight [8, 8, 3, 3] -> [7, 8, 3, 3]", "folded into x")

Depths are longest-path counts over the DAG, as egp_fx.pipeline.measures defines them: conv/linear
layers on the longest path (`weighted` nodes) and nonlinear calls on it (`nonlinear` nodes).
"""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import torch.fx as fx

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.ir.attrs import module_path
from egp_fx.ir.ops import Ops, Role
from egp_fx.pipeline.measures import NONLINEAR, WEIGHTED
from egp_fx.pipeline.measures import longest_path as measures_longest_path

from .costs import NodeCost
from .table import DecisionRow

_PICTURE_ROLES = {Role.MATMUL: "matmul", Role.NORM: "norm", Role.LAYER_NORM: "norm",
                  Role.ACTIVATION: "act", Role.NONLINEAR: "act", Role.POOL: "pool",
                  Role.ADD: "add", Role.CAT: "concat"}


def role_of(node: fx.Node, ops: Ops) -> str:
    """A coarse role for pictures and queries (conv, linear, matmul, norm, act, add, ...)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return {"placeholder": "input", "output": "output", "get_attr": "attr"}[node.op]
    op = ops(node)
    if op.role is Role.LAYER:
        return "linear" if op.kind == "linear" else "conv"
    role = _PICTURE_ROLES.get(op.role, "other")
    if role == "add" and sum(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args) < 2:
        return "other"   # x + constant: not a join of two branches
    return role


def _role(node: fx.Node, ops: Ops, cost: NodeCost | None) -> str:
    role = role_of(node, ops)
    return "compute" if role == "other" and cost is not None and cost.flops > 0 else role


def _shape_text(cost: NodeCost | None) -> str:
    return "x".join(map(str, cost.shape)) if cost is not None and cost.shape is not None else ""


def _stats_attrs(node: fx.Node) -> dict:
    st = node.meta.get(EGP_META_KEY)
    if not isinstance(st, ActivationStats):
        return dict(channels=0, dead=0, constant=0, linear=0, egp_entropy=0.0)
    return dict(channels=st.num_channels, dead=len(st.dead_channels), constant=len(st.constant_channels),
                linear=len(st.linear_channels), egp_entropy=float(st.egp_entropy))


def graph_of(gm: fx.GraphModule, *, costs: dict[str, NodeCost] | None = None,
             blocks: dict[str, str] | None = None, rows: dict[str, DecisionRow] | None = None,
             status: dict[str, str] | None = None, change: dict[str, str] | None = None,
             name: str = "") -> nx.DiGraph:
    """The DiGraph of `gm`, annotated with costs, blocks, decisions and diff status when given."""
    ops = Ops(gm)
    modules = ops.modules
    costs, blocks, rows = costs or {}, blocks or {}, rows or {}
    status, change = status or {}, change or {}
    g = nx.DiGraph(name=name)
    for node in gm.graph.nodes:
        cost, row = costs.get(node.name), rows.get(node.name)
        mod = modules.get(node.target) if node.op == "call_module" else None
        op = ops(node)
        g.add_node(
            node.name, op=node.op, target=str(node.target),
            module_type=type(mod).__name__ if mod is not None else "",
            block=blocks.get(node.name, ""), role=_role(node, ops, cost), shape=_shape_text(cost),
            flops=cost.flops if cost else 0, params=cost.params if cost else 0,
            weighted=op.role in WEIGHTED, nonlinear=op.role in NONLINEAR,
            activation=op.kind if op.role is Role.ACTIVATION else "", **_stats_attrs(node),
            path=module_path(node, gm),
            margin=row.margin if row else 0.0, decision=row.decision if row else "",
            category=row.category if row else "", status=status.get(node.name, "kept"),
            change=change.get(node.name, ""))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    g.graph.update(depths(g))
    return g


def longest_path(g: nx.DiGraph, attr: str) -> int:
    """Largest number of nodes with a true `attr` on any path through the DAG."""
    return measures_longest_path(nx.topological_sort(g), g.predecessors,
                                 lambda n: bool(g.nodes[n].get(attr)))


def depths(g: nx.DiGraph) -> dict[str, int]:
    """{"weighted_depth", "nonlinear_depth"}: conv/linear and nonlinear calls on the longest path."""
    return {"weighted_depth": longest_path(g, "weighted"),
            "nonlinear_depth": longest_path(g, "nonlinear")}


def save_graph(g: nx.DiGraph, path: str | Path) -> Path:
    """Write `g` as GraphML (.graphml) or node-link JSON (.json)."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(g, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(_node_link_data(g), indent=1))
    else:
        raise ValueError(f"save_graph: unknown format {path.suffix!r}; use .graphml or .json")
    return path


def load_graph(path: str | Path) -> nx.DiGraph:
    """Read a graph written by save_graph."""
    path = Path(path)
    if path.suffix == ".graphml":
        return nx.read_graphml(path)
    data = json.loads(path.read_text())
    try:
        return nx.node_link_graph(data, edges="edges")
    except TypeError:  # networkx < 3.4 has no `edges` keyword and calls them "links"
        return nx.node_link_graph({**data, "links": data.pop("edges")})


def _node_link_data(g: nx.DiGraph) -> dict:
    try:
        return nx.node_link_data(g, edges="edges")
    except TypeError:  # networkx < 3.4
        data = nx.node_link_data(g)
        data["edges"] = data.pop("links")
        return data
