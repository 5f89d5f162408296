"""The machinery of the folding rules that fold_linear sweeps (chain.py, residual.py, affine.py).

A rule is a function `rule(node, sweep) -> Candidate | Refusal | None`: it looks at one node of
the graph (its anchor), returns None when the node is not a candidate, a Refusal with the reason
when a check fails, and otherwise a Candidate whose apply() rewrites the graph. FOLD_RULES
(fold/__init__.py) lists them in the order they are tried. `fold_to_fixpoint` sweeps the rules
over the graph until a sweep applies nothing; every rule keeps the output shape of the node it
rewrites, so the shapes propagated at the start stay valid. Refusals come from the last sweep
(the final graph), so each is reported once. The rules read fold_linear's options (FoldOptions)
from the sweep.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx

from egp_fx.ir.channels import keeps_last_dim
from egp_fx.ir.layer import Layer, layer_of, share_index
from egp_fx.ir.ops import Role, main_input

from ..base import PassContext, PassRun, Refusal
from ..registry import option
from ..util import single_tensor_input


@dataclass(frozen=True)
class FoldOptions:
    """The options of fold_linear (and so of every folding rule)."""

    allow_approximate: bool = option(
        False, "apply inexact rewrites too (kxk o kxk merges of padded convs, shifts into "
               "zero-padded convs), checked against approx_tolerance")


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def padding_of(layer: Layer) -> tuple[int, ...] | None:
    """Symmetric padding per spatial dim; None for padding='same' that pads asymmetrically."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0,) * layer.dims
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return layer.padding


def is_pointwise(layer: Layer) -> bool:
    """A 1x1, stride-1, unpadded, undilated, ungrouped conv: a Linear over channels."""
    return (not layer.is_linear and layer.dims == 2 and layer.kernel_size == (1, 1)
            and layer.stride == (1, 1) and padding_of(layer) == (0, 0)
            and layer.dilation == (1, 1) and layer.groups == 1)


class Sweep:
    """One pass of the rules over the graph, with its share index built once."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, cache: dict):
        self.gm, self.ctx, self.cache = gm, ctx, cache
        self.options = ctx.options_of(FoldOptions)
        self.index = share_index(gm.graph)
        self.erased: set[fx.Node] = set()

    def layer(self, node) -> Layer | None:
        """The conv/linear that `node` calls on a single tensor, else None."""
        return layer_of(self.gm, node, self.ctx.ops.modules)

    def producer(self, node: fx.Node, tokens: bool = False) -> tuple[fx.Node, list[fx.Node]]:
        """Walk back from `node` through identity ops (and, with `tokens`, reshapes that keep
        the last dim): (producer, skipped)."""
        skipped = []
        while isinstance(main_input(node), fx.Node) and single_tensor_input(node) and (
                self.ctx.ops(node).role is Role.IDENTITY
                or (tokens and keeps_last_dim(node, self.ctx.ops))):
            skipped.insert(0, node)
            node = main_input(node)
        return node, skipped

    def shared(self, layer: Layer) -> str | None:
        return layer.shared_with(self.index)

    def erase(self, *nodes: fx.Node) -> None:
        """Erase nodes that have lost their users, last first."""
        for n in reversed(nodes):
            self.gm.graph.erase_node(n)
            self.erased.add(n)


def fold_to_fixpoint(gm: fx.GraphModule, ctx: PassContext, rules: Sequence[Callable]) -> PassRun:
    """Sweep `rules` over the graph until a sweep applies nothing."""
    cache: dict = {}  # latency measurements, kept across sweeps
    while True:
        sweep, refusals, applied = Sweep(gm, ctx, cache), [], 0
        for node in list(gm.graph.nodes):
            if node in sweep.erased or node._erased:
                continue
            for rule in rules:
                out = rule(node, sweep)
                if out is None:
                    continue
                if isinstance(out, Refusal):
                    refusals.append(out)
                elif (yield out) is not None:
                    applied += 1
                break
        if not applied:
            yield from refusals
            return


Rule = Callable[[fx.Node, Sweep], "Candidate | Refusal | None"]
