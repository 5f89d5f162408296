"""What every rewrite pass takes and returns.

A pass is a function `run(gm, ctx) -> PassOutcome`. It mutates `gm` in place (compress hands it a
copy it can throw away), records one Rewrite per change and one Refusal per candidate it turned
down, and honours `ctx.allows(key)`: when compress bisects a failed group it re-runs the pass
allowing one key at a time. Keys are stable names (the anchor node's name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp


@dataclass
class Rewrite:
    pass_name: str
    kind: str                      # e.g. "fold_bn", "narrow_channels", "drop_branch", ...
    key: str                       # stable identity (anchor node name), used for bisection
    nodes: list[str]               # nodes of the ORIGINAL graph involved
    exact: bool
    detail: str
    params_saved: int = 0
    flops_saved: int = 0           # analytic, per sample
    activation: str | None = None  # the activation call this decision is about, if any
    decision: str | None = None    # "removed", "narrowed 64 -> 60", "linearised", "folded into X"
    error: float | None = None     # measured relative output error after the group was applied
    status: str = "applied"        # "applied" or "rolled back"


@dataclass
class Refusal:
    pass_name: str
    key: str
    nodes: list[str]
    reason: str
    activation: str | None = None


@dataclass
class PassContext:
    example_input: torch.Tensor              # one batch (size 1 is enough) for shapes
    allow_approximate: bool = False
    cost: str = "flops"                      # "flops" or "latency"
    only: set[str] | None = None
    latency_fn: Callable | None = None       # (nn.Module, input) -> seconds, for cost="latency"
    options: dict = field(default_factory=dict)

    def allows(self, key: str) -> bool:
        return self.only is None or key in self.only

    def shapes(self, gm: fx.GraphModule) -> None:
        """Fill node.meta['tensor_meta'] by running ShapeProp on the example input.

        Runs on fake tensors: shapes and dtypes only, no arithmetic (about 10x cheaper). Skipped
        when gm still carries the shapes of the last run (compress drops the mark after a pass
        that modified gm; deep copies keep both the shapes and the mark).
        """
        if gm.meta.get(SHAPES_MARK):
            return
        gm.meta[SHAPES_MARK] = True
        prop = ShapeProp(gm)  # built outside the fake mode: it would deep-copy gm to fake tensors
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            prop.propagate(mode.from_tensor(self.example_input))


SHAPES_MARK = "_egp_shapes_valid"


def invalidate_shapes(gm: fx.GraphModule) -> None:
    gm.meta.pop(SHAPES_MARK, None)


class PassOutcome(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite]
    refusals: list[Refusal]


def finish(gm: fx.GraphModule, name: str, rewrites: list[Rewrite],
           refusals: list[Refusal]) -> PassOutcome:
    """Common tail of every pass: clean the graph, check it, regenerate code."""
    if rewrites:
        invalidate_shapes(gm)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return PassOutcome(gm, bool(rewrites), rewrites, refusals)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
