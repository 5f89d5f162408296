"""Values of constant branches, in float64, with a bound on their float32 rounding error.

See constants.py for the rules (how the bound grows through layers, BatchNorm, additions,
activations) and how a constant within its bound becomes an exact zero.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call

from egp_fx.ir.activations import region_spec
from egp_fx.ir.attrs import attr
from egp_fx.ir.layer import layer_of
from egp_fx.ir.norm import norm_of
from egp_fx.ir.ops import Role

from .util import ROUNDING, bias_rounding


@dataclass
class Const:
    """A constant's value (float64, batch of one) and the bound on its float32 rounding error."""

    value: torch.Tensor
    bound: torch.Tensor


def full(per_channel: torch.Tensor, shape, channel_dim: int) -> torch.Tensor:
    """A batch-1 float64 tensor of `shape` holding per_channel along channel_dim."""
    shape = (1, *shape[1:])
    view = [1] * len(shape)
    view[channel_dim % len(shape)] = -1
    return per_channel.double().view(view).expand(shape).clone()


def _value(gm, a, env: dict):
    if isinstance(a, fx.Node):
        if a in env:
            return env[a].value
        v = attr(gm, a.target)
        return v.detach().to("cpu", torch.float64, copy=True) \
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return a


def _same_op(gm, node: fx.Node, env: dict, field: str):
    """Run node's op on the `field` ("value" or "bound") of its constant inputs (float64)."""
    def load(a):   # a copy: an in-place op (ReLU(inplace=True)) must not change env's values
        if isinstance(a, fx.Node) and a in env:
            return getattr(env[a], field).clone()
        return _value(gm, a, env)

    args = fx.node.map_aggregate(node.args, load)
    kwargs = fx.node.map_aggregate(node.kwargs, load)
    with torch.no_grad():
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            params = {k: v.detach().double().cpu() if v.is_floating_point() else v
                      for k, v in {**dict(mod.named_parameters()), **dict(mod.named_buffers())}.items()}
            return functional_call(mod, params, tuple(args), kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def _layer_const(layer, x: Const, e_bias) -> Const:
    w = layer.weight.detach().double().cpu()
    b = layer.bias.detach().double().cpu() if layer.bias is not None else None
    if layer.is_linear:
        run = F.linear
    else:
        conv = F.conv1d if layer.dims == 1 else F.conv2d
        geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                    "groups": layer.groups}
        run = lambda t, w_, b_: conv(t, w_, b_, **geometry)  # noqa: E731
    value = run(x.value, w, b)
    n = w[0].numel()
    bound = run(x.bound + n * ROUNDING * x.value.abs(), w.abs(), e_bias) + ROUNDING * value.abs()
    return Const(value, bound)


def _norm_const(norm, x: Const) -> Const:
    s, t = norm.scale_shift()
    view = [1, -1] + [1] * (x.value.dim() - 2)
    s, t = s.view(view), t.view(view)
    beta = norm.tensors["bias"]
    terms = (norm.tensors["running_mean"].detach().double().cpu() * norm.scale_shift()[0]).abs() + (
        beta.detach().double().cpu().abs() if beta is not None else 0.0)
    return Const(x.value * s + t,
                  x.bound * s.abs() + 3 * ROUNDING * ((x.value * s).abs() + terms.view(view)))


def _activation_bound(spec, x: Const) -> torch.Tensor:
    """The activation's Lipschitz bound times the input's error (1.2 without a spec), plus its
    jump where the input's error interval straddles a region boundary (Hardshrink, Threshold);
    no error at all where that whole interval lies in a region the activation maps to a
    constant (a ReLU of -1 +- e is exactly 0)."""
    if spec is None:
        return 1.2 * x.bound
    bound = spec.lipschitz * x.bound
    lo, hi = x.value - x.bound, x.value + x.bound
    above = (lo > spec.hi) if spec.hi_strict else (lo >= spec.hi)
    if spec.jump:
        inside = (hi <= spec.lo) | above | ((lo > spec.lo) & ((hi <= spec.hi) if spec.hi_strict
                                                               else (hi < spec.hi)))
        bound = torch.where(inside, bound, bound + spec.jump)
    exact = torch.zeros_like(bound, dtype=torch.bool)
    if spec.low is not None and spec.low.is_constant:
        exact |= hi <= spec.lo
    if spec.high is not None and spec.high.is_constant:
        exact |= above
    return torch.where(exact, torch.zeros_like(bound), bound)


def evaluate(gm, node: fx.Node, env: dict, ctx) -> Const:
    """The float64 value of `node` on constant inputs, with its rounding bound."""
    role = ctx.ops(node).role
    layer = layer_of(gm, node, ctx.ops.modules) if role is Role.LAYER else None
    if layer is not None:
        return _layer_const(layer, env[layer.input], bias_rounding(gm, layer))
    norm = norm_of(gm, node, ctx.ops.modules) if role is Role.NORM else None
    if norm is not None:
        return _norm_const(norm, env[norm.input])
    ins = [env[i] for i in node.all_input_nodes if i in env]
    value = _same_op(gm, node, env, "value")
    own = ROUNDING * value.abs()
    if role is Role.ACTIVATION and len(ins) == 1 and ins[0].bound.shape == value.shape:
        bound = _activation_bound(region_spec(ctx.ops(node)), ins[0]) + own
    elif role in (Role.POOL, Role.IDENTITY, Role.FLATTEN) and len(ins) == 1:
        bound = _same_op(gm, node, env, "bound") + own
    elif role in (Role.ADD, Role.SUB) and len(ins) == len(node.all_input_nodes):
        bound = functools.reduce(operator.add, (c.bound for c in ins)) + own
    elif role is Role.MUL and len(ins) == 2:
        a, b = ins
        bound = a.value.abs() * b.bound + b.value.abs() * a.bound + own
    else:                                     # no bound known: only an exact zero is zero
        bound = torch.zeros_like(value)
    return Const(value, bound.expand_as(value))


def compact(v: torch.Tensor) -> torch.Tensor:
    """Reduce dims along which v is constant to size 1 (it still broadcasts the same way)."""
    for d in range(1, v.dim()):
        first = v.narrow(d, 0, 1)
        if bool((v == first).all()):
            v = first
    return v
