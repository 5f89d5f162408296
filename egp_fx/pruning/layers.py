"""Which layers EGP prunes, and the weight masks that keep pruned weights at zero.

Prunable layer (as in the EGP reference code): the conv/linear module that feeds an activation call (ReLU or GELU).
From the activation's input we walk back through BatchNorm/LayerNorm, dropout, identity and
element-wise arithmetic (the residual add) to the conv/linear modules that write the tensor.
A BasicBlock's second ReLU sits after `bn2(conv2(h)) + shortcut(x)`: the walk finds conv2 and,
in a downsampling block, the shortcut's 1x1 conv. The shortcut is told apart from the branch by
the graph alone: a producer is a shortcut when its input is a strict ancestor of another
producer's input (x feeds the shortcut conv directly, and conv2 only through conv1). Shortcut
convs and the classifier (it feeds no activation) are not prunable.

Masks: mask = (w != 0), taken when pruning starts, so a checkpoint of plain weights with zeros
is all that is needed to resume. Pruning n weights of a layer zeroes the n smallest |w| among
its nonzero ones (ties broken by position, so counts are exact).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from egp_fx.ir.ops import activation_kind
from egp_fx.ir.ops import main_input as activation_input

PRUNED_KINDS = frozenset({"relu", "gelu"})
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_THROUGH_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
                    nn.Dropout, nn.Identity)
_THROUGH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                      torch.sub, torch.mul, F.dropout, F.batch_norm, F.layer_norm}
_THROUGH_METHODS = {"add", "sub", "mul", "div", "contiguous", "add_", "mul_"}


@dataclass(frozen=True)
class PrunableLayer:
    module: str                    # qualified name of the conv/linear module
    activations: tuple[str, ...]   # the activation calls (fx node names) it feeds


def _passes_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _THROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _THROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _THROUGH_METHODS


def _producers(z: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    found, stack, seen = [], [z], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(node.target), PRODUCERS):
            found.append(node)
        elif _passes_through(node, modules):
            stack.extend(node.all_input_nodes)
    return found


def _ancestors(node: fx.Node) -> set[fx.Node]:
    out, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def _drop_shortcuts(producers: list[fx.Node]) -> list[fx.Node]:
    if len(producers) < 2:
        return producers
    inputs = {p: p.all_input_nodes[0] for p in producers}
    ancestry = {p: _ancestors(inputs[p]) for p in producers}
    return [p for p in producers
            if not any(q is not p and inputs[p] in ancestry[q] for q in producers)]


def find_prunable(gm: fx.GraphModule, kinds: frozenset[str] = PRUNED_KINDS) -> list[PrunableLayer]:
    """The prunable layers of a traced model, in graph order (one entry per module)."""
    modules = dict(gm.named_modules())
    feeds: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if activation_kind(node, modules) not in kinds:
            continue
        for prod in _drop_shortcuts(_producers(activation_input(node), modules)):
            feeds.setdefault(prod.target, []).append(node.name)
    return [PrunableLayer(name, tuple(acts)) for name, acts in feeds.items()]


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def masks_from_zeros(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """mask[name] = (weight != 0) as a bool tensor."""
    return {n: weight_of(model, n).detach() != 0 for n in names}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight (call after each optimizer step)."""
    for name, mask in masks.items():
        weight_of(model, name).masked_fill_(~mask, 0.0)


@torch.no_grad()
def prune_smallest(weight: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Zero the n smallest-|w| weights among those still in `mask`; returns the new mask."""
    alive = torch.nonzero(mask.flatten()).flatten()
    n = min(int(n), alive.numel())
    if n <= 0:
        return mask
    mags = weight.detach().flatten()[alive].abs()
    order = torch.sort(mags, stable=True).indices[:n]
    new = mask.flatten().clone()
    new[alive[order]] = False
    new = new.view_as(mask)
    weight.masked_fill_(~new, 0.0)
    return new


def count_nonzero(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(nonzero weights, all weights) over the named modules."""
    nz = tot = 0
    for n in names:
        w = weight_of(model, n)
        nz += int(torch.count_nonzero(w))
        tot += w.numel()
    return nz, tot


def weighted_modules(model: nn.Module) -> list[str]:
    """Names of all conv/linear modules (for the overall sparsity)."""
    return [n for n, m in model.named_modules() if isinstance(m, PRODUCERS)]
