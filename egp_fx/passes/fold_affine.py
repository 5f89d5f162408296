"""Constant scale/shift folds (part of pass 5, fold_linear): y = x * s, x / s, x + t or x - t, with s, t
constants (get_attr tensors or numbers), next to a Conv2d/Linear.

Into the producer P, y = P(z) * s or P(z) + t, always exact (any groups):
    W'[o] = s[o] W[o],  b' = s[o] b[o]          or          b' = b + t
Into the consumer C, C(x * s) or C(x + t), when y has no other user; Cg input channels per
group, g(o) the group of output channel o, i = g(o) Cg + j the input channel that tap j reads:
    W'[o, j] = W[o, j] s[i]                                   exact
    b'[o]    = b[o] + sum_{j, taps} W[o, j] t[i]
    exact for Linear, for convs without zero padding, and for t = 0; a zero-padded border
    sees 0 where the original saw t: approximate, applied only with ctx.allow_approximate.
The constant must be one value or one per channel along the layer's channel axis (dim 1 of a
conv's NCHW tensors, the last dim of a Linear's), must not broadcast y to a larger shape or
another dtype. The producer is preferred. Key: the mul/add node's name.
"""
from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
from torch import nn

from .base import PassContext, PassOutcome, Refusal, Rewrite, shape_of
from .fold_common import PASS, Sweep, fold_to_fixpoint, padding_of
from .util import weight_bias, with_weights

_OPS = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
        operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub"}


def _constant(arg, gm: fx.GraphModule) -> torch.Tensor | None:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = functools.reduce(getattr, str(arg.target).split("."), gm)
        return value.detach().double() if isinstance(value, torch.Tensor) else None
    return None


def _match(node: fx.Node, gm: fx.GraphModule):
    """(x, c, "mul" or "add", the constant's get_attr node or None) for y = x * c or x + c."""
    op = _OPS.get(node.target) if node.op == "call_function" else None
    if op is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    ca, cb = _constant(a, gm), _constant(b, gm)
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


def _per_channel(c: torch.Tensor, y: fx.Node, x: fx.Node, mod: nn.Module, consumer: bool):
    """The constant as a float64 vector over the layer's channels, or why it is not one."""
    shape, tm = shape_of(y), y.meta.get("tensor_meta")
    if shape is None or shape != shape_of(x) or tm.dtype != mod.weight.dtype:
        return "constant changes the shape or dtype"
    axis = len(shape) - 1 if isinstance(mod, nn.Linear) else 1
    n = mod.weight.shape[1] * getattr(mod, "groups", 1) if consumer else mod.weight.shape[0]
    full = (1,) * (len(shape) - c.dim()) + tuple(c.shape)
    if len(full) != len(shape) or shape[axis] != n or full[axis] not in (1, n) \
            or any(d != 1 for i, d in enumerate(full) if i != axis):
        return f"constant of shape {tuple(c.shape)} is not per channel"
    return c.reshape(-1).expand(n).to(mod.weight.device, copy=True)


def _into_producer(y, x, c, op, sweep: Sweep):
    mod = sweep.layer(x)
    if mod is None:
        return None
    if len(x.users) != 1:
        return f"output of {x.name} has {len(x.users)} users"
    if (why := sweep.shared(x)) is not None:
        return why
    if isinstance(v := _per_channel(c, y, x, mod, False), str):
        return v
    w, b = weight_bias(mod)
    if op == "mul":
        w, b = w * v.view(-1, *[1] * (w.dim() - 1)), b * v
    else:
        b = b + v
    return x, with_weights(mod, w, b if mod.bias is not None or op != "mul" else None), True


def _into_consumer(y, x, c, op, sweep: Sweep):
    user = next(iter(y.users)) if len(y.users) == 1 else None
    mod = sweep.layer(user)
    if mod is None:
        return None
    if (why := sweep.shared(user)) is not None:
        return why
    if isinstance(v := _per_channel(c, y, x, mod, True), str):
        return v
    w, b = weight_bias(mod)
    if isinstance(mod, nn.Conv2d):  # v per input tap: row o reads channels g(o) Cg .. g(o) Cg + Cg
        g, cg = mod.groups, w.shape[1]
        v_w = v.view(g, 1, cg).expand(g, w.shape[0] // g, cg).reshape(w.shape[0], cg)
        taps = w.sum((2, 3))
    else:
        v_w, taps = v.expand(w.shape[0], -1), w
    if op == "mul":
        w = w * v_w.reshape(*v_w.shape, *[1] * (w.dim() - 2))
        return user, with_weights(mod, w, b if mod.bias is not None else None), True
    border = isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and padding_of(mod) != (0, 0)
    exact = not border or not bool(v.any())
    return user, with_weights(mod, w, b + (taps * v_w).sum(1)), exact


def rule(node: fx.Node, sweep: Sweep) -> Rewrite | Refusal | None:
    """Rule anchored at the mul/div/add/sub node: fold the constant into a neighbouring layer."""
    match = _match(node, sweep.gm)
    if match is None or not sweep.ctx.allows(node.name):
        return None
    x, c, op, const_node = match
    reasons = []
    for where, attempt in (("producer", _into_producer), ("consumer", _into_consumer)):
        out = attempt(node, x, c, op, sweep)
        if isinstance(out, str):
            reasons.append(f"{where}: {out}")
        elif out is not None and not out[2] and not sweep.ctx.allow_approximate:
            reasons.append(f"{where}: shift into a zero-padded conv is approximate at the border "
                           "(allow_approximate is off)")
        elif out is not None:
            break
    else:
        return Refusal(PASS, node.name, [node.name], "constant not folded: " + "; ".join(reasons)) \
            if reasons else None
    layer, new, exact = out
    kind = f"{'scale' if op == 'mul' else 'shift'}_into_{where}"
    sweep.replace(layer, new)
    if where == "producer":
        node.replace_all_uses_with(x)
    else:
        layer.args = (x,)
    sweep.erase(*([const_node] if const_node is not None and len(const_node.users) == 1 else []),
                node)
    return Rewrite(PASS, kind, node.name, [node.name, layer.name], exact,
                   f"{op} by constant {tuple(c.shape)} folded into {layer.name} ({where})",
                   decision=f"folded into {layer.name}")


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    """Only the constant scale/shift folds (fold_linear.run includes them)."""
    return fold_to_fixpoint(gm, ctx, [rule])
