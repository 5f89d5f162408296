"""Fold rule: x + L(x) becomes L'(x), with L' = L + identity.

Conv L with stride 1, as many output as input channels, and an output of x's shape (padding =
dilation * (k - 1) / 2): the identity is a Dirac kernel, one tap at the centre a = p / d of each
spatial dim. Output channel o of a conv with g groups reads input channel o at local index
o mod (C / g), so for any g (depthwise included):
    W'[o, o mod (C/g), a_h, a_w] = W[o, o mod (C/g), a_h, a_w] + 1,   b' = b.
The centre tap always reads an in-bounds pixel, so the padding mode does not matter.
Linear L with in_features == out_features (any leading dims):  W' = W + I,  b' = b.
Exact. The add is erased and its users read L's output; identity ops between L and the add are
skipped. Key: the add node's name.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from egp_fx.ir.layer import Layer
from egp_fx.ir.ops import Role
from egp_fx.ir.shapes import dtype_of, shape_of

from ..base import Candidate, Decision, DecisionKind, Refusal, Rewrite, RewriteKind
from ..reasons import Reason, Why
from .common import Sweep, padding_of

NAME = "fold_residual"


def _match(node: fx.Node, sweep: Sweep):
    """(x, branch output as added, the layer, skipped identity ops) or None."""
    if sweep.ctx.ops(node).role is not Role.ADD or len(node.args) != 2 or node.kwargs \
            or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    for added, x in (node.args, node.args[::-1]):
        first, skipped = sweep.producer(added)
        layer = sweep.layer(first)
        if layer is not None and layer.input is x and added is not x:
            return x, added, layer, skipped
    return None


def _centre(layer: Layer) -> tuple[int, int] | Why:
    """The tap that reads the output position itself, or why there is none."""
    pad = padding_of(layer)
    if layer.dims != 2 or layer.stride != (1, 1) or layer.in_channels != layer.out_channels \
            or pad is None:
        return Why(Reason.RES_NOT_SQUARE)
    taps = []
    for p, d, k in zip(pad, layer.dilation, layer.kernel_size):
        if 2 * p != d * (k - 1) or p % d:
            return Why(Reason.RES_PADDING, {"padding": pad})
        taps.append(p // d)
    return taps[0], taps[1]


def _check(x, added, layer: Layer, skipped, node, sweep: Sweep) -> Why | None:
    for n in (layer.node, *skipped):
        if len(n.users) != 1:
            return Why(Reason.RES_USERS, {"node": n.name, "users": len(n.users)})
    if (why := sweep.shared(layer)) is not None:
        return Why(Reason.RES_SHARED, {"sharing": why})
    shapes = {shape_of(x), shape_of(added), shape_of(node)}
    if len(shapes) != 1 or None in shapes:
        return Why(Reason.RES_SHAPES, {"shapes": sorted(map(str, shapes))})
    if dtype_of(x) != layer.weight.dtype:
        return Why(Reason.RES_DTYPE, {"node": x.name})
    if layer.is_linear:
        return None if layer.in_channels == layer.out_channels else Why(Reason.RES_LINEAR_NOT_SQUARE)
    centre = _centre(layer)
    return centre if isinstance(centre, Why) else None


def _apply(sweep: Sweep, x, node, layer: Layer, added, names) -> Rewrite:
    w = layer.weight.detach().double().clone()
    if layer.is_linear:
        w += torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    else:
        o = torch.arange(layer.out_channels, device=w.device)
        ah, aw = _centre(layer)
        w[o, o % w.shape[1], ah, aw] += 1.0
    layer.replace(w, layer.bias.detach().double() if layer.bias is not None else None)
    node.replace_all_uses_with(added)
    sweep.erase(node)
    kind = RewriteKind.RESIDUAL_INTO_LINEAR if layer.is_linear else RewriteKind.RESIDUAL_INTO_CONV
    return Rewrite(NAME, kind, node.name, names, True,
                   f"{x.name} + {layer.node.name}({x.name}) -> identity added to {layer.node.name}",
                   decision=Decision(DecisionKind.FOLDED, into=layer.path), path=layer.path)


def rule(node: fx.Node, sweep: Sweep) -> Candidate | Refusal | None:
    """Rule anchored at the add: x + L(x) -> (L + I)(x)."""
    match = _match(node, sweep)
    if match is None:
        return None
    x, added, layer, skipped = match
    names = [layer.node.name, *(n.name for n in skipped), node.name]
    why = _check(x, added, layer, skipped, node, sweep)
    if why is not None:
        return Refusal(NAME, node.name, names, why, path=layer.path)
    return Candidate(node.name, functools.partial(_apply, sweep, x, node, layer, added, names))
