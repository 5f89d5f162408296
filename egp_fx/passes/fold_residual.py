"""Residual folds (part of pass 5, fold_linear): x + L(x) becomes L'(x), with L' = L + identity.

Conv2d L with stride 1, as many output as input channels, and an output of x's shape (padding =
dilation * (k - 1) / 2): the identity is a Dirac kernel, one tap at the centre a = p / d of each
spatial dim. Output channel o of a conv with g groups reads input channel o at local index
o mod (C / g), so for any g (depthwise included):
    W'[o, o mod (C/g), a_h, a_w] = W[o, o mod (C/g), a_h, a_w] + 1,   b' = b.
The centre tap always reads an in-bounds pixel, so the padding mode does not matter.
Linear L with in_features == out_features (any leading dims):  W' = W + I,  b' = b.
Exact. The add is erased and its users read L's output; Identity / eval-mode Dropout calls
between L and the add are skipped. Key: the add node's name.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .base import PassContext, PassOutcome, Refusal, Rewrite, shape_of
from .fold_common import PASS, Sweep, fold_to_fixpoint, padding_of, pair
from .util import weight_bias, with_weights

_ADDS = {operator.add, operator.iadd, torch.add}


def _match(node: fx.Node, sweep: Sweep):
    """(x, branch output as added, the layer call, skipped pass-through calls) or None."""
    if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 \
            or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    for added, x in (node.args, node.args[::-1]):
        layer, skipped = sweep.producer(added)
        if sweep.layer(layer) is not None and layer.args[0] is x and added is not x:
            return x, added, layer, skipped
    return None


def _centre(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The tap that reads the output position itself, or why there is none."""
    pad = padding_of(conv)
    if pair(conv.stride) != (1, 1) or conv.in_channels != conv.out_channels or pad is None:
        return "not stride 1 with as many output as input channels"
    taps = []
    for p, d, k in zip(pad, pair(conv.dilation), pair(conv.kernel_size)):
        if 2 * p != d * (k - 1) or p % d:
            return f"padding {pad} does not keep the size"
        taps.append(p // d)
    return taps[0], taps[1]


def _check(x, added, layer, skipped, node, mod, sweep: Sweep) -> str | None:
    for n in (layer, *skipped):
        if len(n.users) != 1:
            return f"output of {n.name} has {len(n.users)} users"
    if (why := sweep.shared(layer)) is not None:
        return why
    shapes = {shape_of(x), shape_of(added), shape_of(node)}
    if len(shapes) != 1 or None in shapes:
        return f"shapes differ: {sorted(map(str, shapes))}"
    if x.meta["tensor_meta"].dtype != mod.weight.dtype:
        return f"dtype of {x.name} differs from the weights"
    if isinstance(mod, nn.Linear):
        return None if mod.in_features == mod.out_features else "linear is not square"
    centre = _centre(mod)
    return centre if isinstance(centre, str) else None


def _plus_identity(mod: nn.Module) -> nn.Module:
    w, b = weight_bias(mod)
    if isinstance(mod, nn.Linear):
        w += torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    else:
        o = torch.arange(mod.out_channels, device=w.device)
        ah, aw = _centre(mod)
        w[o, o % w.shape[1], ah, aw] += 1.0
    return with_weights(mod, w, b if mod.bias is not None else None)


def rule(node: fx.Node, sweep: Sweep) -> Rewrite | Refusal | None:
    """Rule anchored at the add: x + L(x) -> (L + I)(x)."""
    match = _match(node, sweep)
    if match is None or not sweep.ctx.allows(node.name):
        return None
    x, added, layer, skipped = match
    mod = sweep.layer(layer)
    names = [layer.name, *(n.name for n in skipped), node.name]
    why = _check(x, added, layer, skipped, node, mod, sweep)
    if why is not None:
        return Refusal(PASS, node.name, names, f"residual not folded: {why}")
    kind = "residual_into_linear" if isinstance(mod, nn.Linear) else "residual_into_conv"
    sweep.replace(layer, _plus_identity(mod))
    node.replace_all_uses_with(added)
    sweep.erase(node)
    return Rewrite(PASS, kind, node.name, names, True,
                   f"{x.name} + {layer.name}({x.name}) -> identity added to {layer.name}",
                   decision=f"folded into {layer.name}")


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    """Only the residual folds (fold_linear.run includes them)."""
    return fold_to_fixpoint(gm, ctx, [rule])
