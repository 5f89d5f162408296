"""Shared machinery of the folding rules (fold_linear, fold_residual, fold_affine).

A rule is a function `rule(node, sweep) -> Rewrite | Refusal | None`: it looks at one node of the
graph (its anchor), returns None when the node is not a candidate, a Refusal with the reason when a
check fails, and otherwise rewrites the graph in place and returns the Rewrite. `fold_to_fixpoint`
sweeps the graph with a list of rules until a sweep changes nothing; every rule keeps the output
shape of the node it rewrites, so the shapes ShapeProp computed once at the start stay valid.
Refusals come from the last sweep (the final graph), so each is reported once.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .base import PassContext, PassOutcome, Refusal, Rewrite, finish
from .util import set_module

PASS = "fold_linear"
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def plain_layer(mod) -> bool:
    """A Conv2d/Linear running torch's own forward (timm's Conv2dSame / StdConv2d do not)."""
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    return (isinstance(mod, nn.Conv2d) and type(mod).forward is nn.Conv2d.forward
            and type(mod)._conv_forward is nn.Conv2d._conv_forward)


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def padding_of(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric padding per spatial dim; None for padding='same' that pads asymmetrically."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return pair(conv.padding)


def is_pointwise(conv: nn.Module) -> bool:
    """A 1x1, stride-1, unpadded, undilated, ungrouped conv: a Linear over channels."""
    return (isinstance(conv, nn.Conv2d) and pair(conv.kernel_size) == (1, 1)
            and pair(conv.stride) == (1, 1) and padding_of(conv) == (0, 0)
            and pair(conv.dilation) == (1, 1) and conv.groups == 1)


def new_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, *, stride,
             padding, dilation=(1, 1), padding_mode: str = "zeros") -> nn.Conv2d:
    """An ungrouped Conv2d carrying `weight`/`bias` (cast to `like`'s dtype and device)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, bias=bias is not None,
                     padding_mode=padding_mode, device="meta")
    conv.weight = nn.Parameter(weight.to(like.weight), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.to(like.weight), requires_grad=False)
    return conv.eval()


class Sweep:
    """One pass over the graph: the module table and call counts, kept current as rules fire."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, cache: dict):
        self.gm, self.ctx, self.cache = gm, ctx, cache
        self.modules = dict(gm.named_modules())
        self.calls = Counter(id(self.modules[n.target]) for n in gm.graph.nodes
                             if n.op == "call_module")
        self.read = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        self.erased: set[fx.Node] = set()

    def layer(self, node) -> nn.Module | None:
        """The Conv2d/Linear that `node` calls with a single tensor argument, else None."""
        if not (isinstance(node, fx.Node) and node.op == "call_module") or node.kwargs \
                or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        mod = self.modules.get(node.target)
        return mod if plain_layer(mod) else None

    def producer(self, node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
        """Walk back from `node` through Identity / eval-mode Dropout calls: (producer, skipped)."""
        skipped = []
        while node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
                and isinstance(node.args[0], fx.Node):
            mod = self.modules.get(node.target)
            if not isinstance(mod, _PASS_THROUGH) or (mod.training and not isinstance(mod, nn.Identity)):
                break
            skipped.insert(0, node)
            node = node.args[0]
        return node, skipped

    def shared(self, node: fx.Node) -> str | None:
        """Why the module of `node` may not be replaced, or None."""
        n = self.calls[id(self.modules[node.target])]
        if n != 1:
            return f"module {node.target} shared by {n} calls"
        prefix = f"{node.target}."
        if any(t.startswith(prefix) for t in self.read):
            return f"weights of {node.target} are read elsewhere (get_attr)"
        return None

    def replace(self, node: fx.Node, new: nn.Module) -> None:
        """Give the call `node` a new module (its old one is deleted by finish if unused)."""
        set_module(self.gm, node.target, new)
        self.modules[node.target] = new
        self.calls[id(new)] = 1

    def erase(self, *nodes: fx.Node) -> None:
        """Erase nodes that have lost their users, last first."""
        for n in reversed(nodes):
            self.gm.graph.erase_node(n)
            self.erased.add(n)


Rule = Callable[[fx.Node, Sweep], "Rewrite | Refusal | None"]


def fold_to_fixpoint(gm: fx.GraphModule, ctx: PassContext, rules: list[Rule]) -> PassOutcome:
    """Sweep `rules` over the graph until a sweep changes nothing."""
    ctx.shapes(gm)
    rewrites: list[Rewrite] = []
    cache: dict = {}  # latency measurements, kept across sweeps
    while True:
        sweep, refusals, before = Sweep(gm, ctx, cache), [], len(rewrites)
        for node in list(gm.graph.nodes):
            if node in sweep.erased:
                continue
            for rule in rules:
                out = rule(node, sweep)
                if out is not None:
                    (rewrites if isinstance(out, Rewrite) else refusals).append(out)
                    break
        if len(rewrites) == before:
            return finish(gm, PASS, rewrites, refusals)
