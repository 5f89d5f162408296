"""constants: dead activations and collapsed layers become constants; constants propagate, and a
constant that is zero up to rounding is zero.

Seeds (each exact):
- an activation call whose every channel stayed in a constant region on the calibration data
  (ReLU OFF, ReLU6 OFF/saturated, GELU/SiLU beyond their float32 margins) outputs a per-channel
  constant k_c, whatever its input;
- a conv/linear whose weights are all zero (what EGP's pruning produces) outputs its bias
  everywhere, zero-padded borders included, without looking at data.

A constant flows forward through per-sample ops (layers, BatchNorm, activations, pooling,
identity, flatten, arithmetic among constants): they are evaluated once, on a batch of one, in
float64, and the node becomes a buffer. Where a constant meets a live tensor in an add/sub/mul it
broadcasts over the batch. A constant that would reach anything else (a concat, the output, a
reshape that reads the batch size) makes the seed refused.

Zero up to rounding. Next to each value v the evaluation carries e, a bound on the error with
which the float32 model computes it (standard forward error analysis, u = 2^-24):
    layer      e = |W| e_in + n u |W| |v_in| + e_b + u |v|      (n: the fan-in)
    BatchNorm  e = |s| e_in + 3 u (|s v_in| + |mean s| + |beta|)
    add / sub  e = e_a + e_b + u |v|,   mul  e = |a| e_b + |b| e_a + u |v|
    activation, pooling, identity: e of the input (plus u |v|)
A dead activation's output is exactly 0 (e = 0); a bias that fold_bn computed brings the bound
of the float32 BatchNorm arithmetic it replaced, 3 u (|b s| + |mean s| + |beta|). A constant whose
every entry has |v| <= e is zero to within the rounding of its own computation: it becomes
exactly zero (rewrite kind "zero_up_to_rounding", with the bound). A BatchNorm whose shift
cancels its mean term then leaves no `x + 1e-8` behind, while a constant of any real size stays.

Then algebra: x + 0 -> x, (x + c1) + c2 -> x + (c1 + c2), and a ReLU whose input is provably
non-negative (relu/relu6 outputs, non-negative constants, sums, pools and concats of those)
goes. A BasicBlock whose first ReLU is dead thus loses both convs, its add and its second ReLU.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call

from ..layer import attr, layer_of, module_path, norm_of, set_attr
from ..ops import ARITHMETIC, Role, main_input
from .. import activations
from ..activations import region_spec
from ..shapes import dtype_of, shape_of
from ..stats import EGP_META_KEY, ActivationStats
from . import register
from .base import Candidate, Decision, DecisionKind, PassContext, PassRun, Refusal, Rewrite
from .util import ROUNDING, arithmetic, bias_rounding, constant, layer_params

NAME = "constants"
_PER_SAMPLE = frozenset({Role.LAYER, Role.NORM, Role.ACTIVATION, Role.NONLINEAR,
                         Role.LAYER_NORM, Role.POOL, Role.IDENTITY, Role.FLATTEN}) | ARITHMETIC
_BROADCAST = frozenset({Role.ADD, Role.SUB, Role.MUL})


@dataclass
class _Const:
    """A constant's value (float64, batch of one) and the bound on its float32 rounding error."""

    value: torch.Tensor
    bound: torch.Tensor


def _full(per_channel: torch.Tensor, shape, channel_dim: int) -> torch.Tensor:
    """A batch-1 float64 tensor of `shape` holding per_channel along channel_dim."""
    shape = (1, *shape[1:])
    view = [1] * len(shape)
    view[channel_dim % len(shape)] = -1
    return per_channel.double().view(view).expand(shape).clone()


def _seed(gm, node: fx.Node, ctx) -> tuple[_Const | None, str]:
    shape = shape_of(node)
    if shape is None:
        return None, ""
    st = node.meta.get(EGP_META_KEY)
    if isinstance(st, ActivationStats):
        affine = st.channel_affine()
        if all(a is not None and a.is_constant for a in affine):
            k = _full(torch.tensor([a.offset for a in affine]), shape, st.channel_dim)
            what = "all channels dead" if not bool(k.any()) else "all channels constant"
            return _Const(k, torch.zeros_like(k)), what
    layer = layer_of(gm, node, ctx.ops.modules)
    if layer is not None and not bool(layer.weight.any()):
        n = layer.out_channels
        b = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros(n, dtype=torch.float64)
        e = bias_rounding(gm, layer)
        e = e if e is not None else torch.zeros(n, dtype=torch.float64)
        return _Const(_full(b, shape, layer.out_axis), _full(e, shape, layer.out_axis)), \
            "all weights zero (collapsed layer)"
    return None, ""


def _closure(gm, seed: fx.Node, ctx, index: dict) -> tuple[list[fx.Node], str | None]:
    """Nodes that become constant from `seed` (topological order), or a reason to refuse."""
    const, order, frontier = {seed}, [seed], list(seed.users)
    while frontier:
        user = frontier.pop()
        if user in const:
            continue
        role = ctx.ops(user).role
        inputs = user.all_input_nodes
        if role in _PER_SAMPLE and all(i in const or i.op == "get_attr" for i in inputs):
            const.add(user)
            order.append(user)
            frontier.extend(user.users)
        elif role in _BROADCAST:
            continue
        else:
            return [], f"constant would reach {user.name} ({user.op} {getattr(user.target, '__name__', user.target)}), which needs the batch"
    return sorted(order, key=index.__getitem__), None


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


def _layer_const(layer, x: _Const, e_bias) -> _Const:
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
    return _Const(value, bound)


def _norm_const(norm, x: _Const) -> _Const:
    s, t = norm.scale_shift()
    view = [1, -1] + [1] * (x.value.dim() - 2)
    s, t = s.view(view), t.view(view)
    beta = norm.tensors["bias"]
    terms = (norm.tensors["running_mean"].detach().double().cpu() * norm.scale_shift()[0]).abs() + (
        beta.detach().double().cpu().abs() if beta is not None else 0.0)
    return _Const(x.value * s + t,
                  x.bound * s.abs() + 3 * ROUNDING * ((x.value * s).abs() + terms.view(view)))


def _activation_bound(spec, x: _Const) -> torch.Tensor:
    """Lipschitz <= 1.2 for every supported activation, and no error at all where the input's
    whole error interval lies in a region the activation maps to a constant (a ReLU of -1 +- e
    is exactly 0)."""
    bound = 1.2 * x.bound
    if spec is None:
        return bound
    lo, hi = x.value - x.bound, x.value + x.bound
    exact = torch.zeros_like(bound, dtype=torch.bool)
    if spec.low is not None and spec.low.is_constant:
        exact |= hi <= spec.lo
    if spec.high is not None and spec.high.is_constant:
        exact |= (lo > spec.hi) if spec.hi_strict else (lo >= spec.hi)
    return torch.where(exact, torch.zeros_like(bound), bound)


def _evaluate(gm, node: fx.Node, env: dict, ctx) -> _Const:
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
    return _Const(value, bound.expand_as(value))


def _compact(v: torch.Tensor) -> torch.Tensor:
    """Reduce dims along which v is constant to size 1 (it still broadcasts the same way)."""
    for d in range(1, v.dim()):
        first = v.narrow(d, 0, 1)
        if bool((v == first).all()):
            v = first
    return v


def _apply_seed(gm, node, order, env, what, live, made: dict) -> Rewrite:
    saved = sum(layer_params(lay) for n in order
                if (lay := layer_of(gm, n)) is not None)
    for n in reversed(order):
        if live[n]:
            made[n] = constant(gm, _compact(env[n].value).to(dtype_of(n)), n.name, before=n)
            n.replace_all_uses_with(made[n])
    is_act = EGP_META_KEY in node.meta
    return Rewrite(NAME, "constant_branch" if len(order) > 1 else "constant", node.name,
                   [n.name for n in order], True,
                   f"{node.name}: {what}; {len(order)} node(s) folded", params_saved=saved,
                   activation=node.name if is_act else None,
                   decision=Decision(DecisionKind.REMOVED, "constant output") if is_act else None,
                   path=module_path(node, gm))


def _apply_rounding_zero(gm, node, const: fx.Node, value: torch.Tensor, bound: float) -> Rewrite:
    """The constant that replaced `node` becomes exact zeros."""
    set_attr(gm, const.target, torch.zeros_like(attr(gm, const.target)))
    return Rewrite(NAME, "zero_up_to_rounding", node.name + ":zero", [node.name], True,
                   f"{node.name}: constant of at most {float(value.abs().max()):.3g} is zero "
                   f"to within its float32 rounding (bound {bound:.3g})",
                   path=module_path(node, gm), bound=bound)


def _is_zero_const(gm, a) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr" and not bool(attr(gm, a.target).any())


def _nonnegative(gm, node, memo, ctx) -> bool:
    if node in memo:
        return memo[node]
    memo[node] = False
    op = ctx.ops(node)
    if op.role is Role.ACTIVATION:
        ok = op.kind in activations.NONNEGATIVE_KINDS
    elif node.op == "get_attr":
        ok = bool((attr(gm, node.target) >= 0).all())
    elif op.role in (Role.ADD, Role.CAT):
        ins = node.all_input_nodes
        ok = bool(ins) and all(_nonnegative(gm, i, memo, ctx) for i in ins)
    elif op.role in (Role.POOL, Role.IDENTITY, Role.FLATTEN):
        ok = main_input(node) is not None and _nonnegative(gm, main_input(node), memo, ctx)
    else:
        ok = False
    memo[node] = ok
    return ok


def _add_operands(gm, node, ctx):
    """(x, constant get_attr) for x + c or c + x, else None."""
    if ctx.ops(node).role is not Role.ADD or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if isinstance(b, fx.Node) and b.op == "get_attr" and isinstance(a, fx.Node) and a.op != "get_attr":
        return a, b
    if isinstance(a, fx.Node) and a.op == "get_attr" and isinstance(b, fx.Node) and b.op != "get_attr":
        return b, a
    return None


def _drop_add(gm, node, keep) -> Rewrite:
    node.replace_all_uses_with(keep)
    gm.graph.erase_node(node)
    return Rewrite(NAME, "drop_add", node.name, [node.name], True, f"{node.name}: adds a zero constant",
                   path=module_path(node, gm))


def _merge_adds(gm, node, inner, x, c_outer, c_inner) -> Rewrite:
    total = attr(gm, c_inner.target) + attr(gm, c_outer.target)
    merged = constant(gm, total, node.name + "_merged", before=node)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(arithmetic(gm, "add"), (x, merged))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    gm.graph.erase_node(inner)
    return Rewrite(NAME, "merge_adds", node.name, [inner.name, node.name], True,
                   f"{inner.name} and {node.name}: two constant adds merged", path=module_path(node, gm))


def _drop_relu(gm, node, src) -> Rewrite:
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    return Rewrite(NAME, "drop_relu", node.name, [node.name], True,
                   f"{node.name}: input {src.name} is non-negative", activation=node.name,
                   decision=Decision(DecisionKind.REMOVED, "input is non-negative"),
                   path=module_path(node, gm))


def _simplify(gm, ctx) -> PassRun:
    memo: dict = {}
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        operands = _add_operands(gm, node, ctx)
        if operands is not None:
            x, c = operands
            if _is_zero_const(gm, c) and attr(gm, c.target).dim() <= len(shape_of(node) or ()) \
                    and (shape_of(x) is None or shape_of(x) == shape_of(node)):
                yield Candidate(node.name, functools.partial(_drop_add, gm, node, x))
                continue
            inner = _add_operands(gm, x, ctx)
            if inner is not None and len(x.users) == 1:
                yield Candidate(node.name, functools.partial(_merge_adds, gm, node, x, inner[0],
                                                             c, inner[1]))
                continue
        op = ctx.ops(node)
        if op.role is Role.ACTIVATION and op.kind == "relu":
            src = main_input(node)
            if src is not None and _nonnegative(gm, src, memo, ctx):
                yield Candidate(node.name, functools.partial(_drop_relu, gm, node, src))


@register(NAME, positions=(20, 60), shapes=True)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    done: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in done or not node.users:
            continue
        seed, what = _seed(gm, node, ctx)
        if seed is None:
            continue
        order, reason = _closure(gm, node, ctx, index)
        if reason is not None:
            yield Refusal(NAME, node.name, [node.name], f"{what}, but {reason}",
                          activation=node.name if EGP_META_KEY in node.meta else None,
                          path=module_path(node, gm))
            continue
        env = {node: seed}
        for n in order[1:]:
            env[n] = _evaluate(gm, n, env, ctx)
        members = set(order)
        live = {n: any(u not in members for u in n.users) for n in order}
        made: dict[fx.Node, fx.Node] = {}
        applied = yield Candidate(node.name, functools.partial(_apply_seed, gm, node, order, env,
                                                                 what, live, made))
        if not applied:
            continue
        done.update(order)
        for n, const in made.items():
            c = env[n]
            if bool(c.value.any()) and bool((c.value.abs() <= c.bound).all()):
                yield Candidate(n.name + ":zero", functools.partial(
                    _apply_rounding_zero, gm, n, const, c.value, float(c.bound.max())))
    gm.graph.eliminate_dead_code()
    yield from _simplify(gm, ctx)
