"""Fold rule: a constant scale or shift next to a conv/linear goes into its weights.

y = x * s, x / s, x + t or x - t, with s, t constants (attribute tensors or numbers).
Into the producer P, y = P(z) * s or P(z) + t, always exact (any groups):
    W'[o] = s[o] W[o],  b' = s[o] b[o]          or          b' = b + t
Into the consumer C, C(x * s) or C(x + t), when y has no other user; Cg input channels per
group, g(o) the group of output channel o, i = g(o) Cg + j the input channel that tap j reads:
    W'[o, j] = W[o, j] s[i]                                   exact
    b'[o]    = b[o] + sum_{j, taps} W[o, j] t[i]
    exact for Linear, for convs without zero padding, and for t = 0; a zero-padded border
    sees 0 where the original saw t: approximate, applied only with allow_approximate.
The constant must be one value or one per channel along the layer's channel axis (dim 1 of a
conv's NCHW tensors, the last dim of a Linear's), must not broadcast y to a larger shape or
another dtype. The producer is preferred. Key: the mul/add node's name.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from egp_fx.ir.attrs import attr
from egp_fx.ir.layer import Layer
from egp_fx.ir.ops import Role
from egp_fx.ir.shapes import dtype_of, shape_of

from ..base import Candidate, Decision, DecisionKind, Refusal, Rewrite, RewriteKind
from ..reasons import Reason, Why
from .common import Sweep, padding_of

NAME = "fold_affine"
_OPS = {Role.MUL: "mul", Role.DIV: "div", Role.ADD: "add", Role.SUB: "sub"}


def _constant(arg, gm: fx.GraphModule) -> torch.Tensor | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attr(gm, arg.target)
        return value.detach().double() if isinstance(value, torch.Tensor) else None
    return None


def _match(node: fx.Node, sweep: Sweep):
    """(x, c, "mul" or "add", the constant's get_attr node or None) for y = x * c or x + c."""
    op = _OPS.get(sweep.ctx.ops(node).role)
    if op is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    ca, cb = _constant(a, sweep.gm), _constant(b, sweep.gm)
    if isinstance(a, fx.Node) and ca is None and cb is not None:
        x, c, const_arg = a, cb, b
    elif op in ("mul", "add") and isinstance(b, fx.Node) and cb is None and ca is not None:
        x, c, const_arg = b, ca, a
    else:
        return None
    if op == "sub":
        c, op = -c, "add"
    elif op == "div":
        if not bool(c.all()):
            return None
        c, op = 1.0 / c, "mul"
    return x, c, op, const_arg if isinstance(const_arg, fx.Node) else None


def _per_channel(c: torch.Tensor, y: fx.Node, x: fx.Node, layer: Layer, consumer: bool):
    """The constant as a float64 vector over the layer's channels, or why it is not one."""
    shape = shape_of(y)
    if shape is None or shape != shape_of(x) or dtype_of(y) != layer.weight.dtype:
        return Why(Reason.AFFINE_SHAPE_OR_DTYPE)
    axis = len(shape) - 1 if layer.is_linear else 1
    n = layer.in_channels if consumer else layer.out_channels
    full = (1,) * (len(shape) - c.dim()) + tuple(c.shape)
    if len(full) != len(shape) or shape[axis] != n or full[axis] not in (1, n) \
            or any(d != 1 for i, d in enumerate(full) if i != axis):
        return Why(Reason.AFFINE_NOT_PER_CHANNEL, {"shape": tuple(c.shape)})
    return c.reshape(-1).expand(n).to(layer.weight.device, copy=True)


def _into_producer(y, x, c, op, sweep: Sweep):
    layer = sweep.layer(x)
    if layer is None:
        return None
    if len(x.users) != 1:
        return Why(Reason.AFFINE_USERS, {"node": x.name, "users": len(x.users)})
    if (why := sweep.shared(layer)) is not None:
        return Why(Reason.AFFINE_SHARED, {"sharing": why})
    if isinstance(v := _per_channel(c, y, x, layer, False), Why):
        return v
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    if op == "mul":
        w, b = w * v.view(-1, *[1] * (w.dim() - 1)), b * v
    else:
        b = b + v
    return layer, (w, b if layer.bias is not None or op != "mul" else None), True


def _into_consumer(y, x, c, op, sweep: Sweep):
    user = next(iter(y.users)) if len(y.users) == 1 else None
    layer = sweep.layer(user)
    if layer is None or layer.input is not y:
        return None
    if (why := sweep.shared(layer)) is not None:
        return Why(Reason.AFFINE_SHARED, {"sharing": why})
    if isinstance(v := _per_channel(c, y, x, layer, True), Why):
        return v
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    if not layer.is_linear:   # v per input tap: row o reads channels g(o) Cg .. g(o) Cg + Cg
        g, cg = layer.groups, w.shape[1]
        v_w = v.view(g, 1, cg).expand(g, w.shape[0] // g, cg).reshape(w.shape[0], cg)
        taps = w.flatten(2).sum(2)
    else:
        v_w, taps = v.expand(w.shape[0], -1), w
    if op == "mul":
        w = w * v_w.reshape(*v_w.shape, *[1] * (w.dim() - 2))
        return layer, (w, b if layer.bias is not None else None), True
    pad = padding_of(layer)
    border = not layer.is_linear and layer.padding_mode == "zeros" and (pad is None or any(pad))
    exact = not border or not bool(v.any())
    return layer, (w, b + (taps * v_w).sum(1)), exact


def _apply(sweep: Sweep, node, x, c, op, const_node, where, layer: Layer, weights, exact) -> Rewrite:
    layer.replace(*weights)
    if where == "producer":
        node.replace_all_uses_with(x)
    else:
        layer.set_input(x)
    sweep.erase(*([const_node] if const_node is not None and len(const_node.users) == 1 else []),
                node)
    kind = RewriteKind(f"{'scale' if op == 'mul' else 'shift'}_into_{where}")
    return Rewrite(NAME, kind, node.name, [node.name, layer.node.name], exact,
                   f"{op} by constant {tuple(c.shape)} folded into {layer.node.name} ({where})",
                   decision=Decision(DecisionKind.FOLDED, into=layer.path), path=layer.path)


def rule(node: fx.Node, sweep: Sweep) -> Candidate | Refusal | None:
    """Rule anchored at the mul/div/add/sub node: fold the constant into a neighbouring layer."""
    match = _match(node, sweep)
    if match is None:
        return None
    x, c, op, const_node = match
    sides: dict[str, Why] = {}
    for where, attempt in (("producer", _into_producer), ("consumer", _into_consumer)):
        out = attempt(node, x, c, op, sweep)
        if isinstance(out, Why):
            sides[where] = out
        elif out is not None and not out[2] and not sweep.options.allow_approximate:
            sides[where] = Why(Reason.AFFINE_APPROXIMATE)
        elif out is not None:
            layer, weights, exact = out
            return Candidate(node.name, functools.partial(
                _apply, sweep, node, x, c, op, const_node, where, layer, weights, exact))
    if not sides:
        return None
    return Refusal(NAME, node.name, [node.name], Why(Reason.AFFINE_NOT_FOLDED, {"sides": sides}))
