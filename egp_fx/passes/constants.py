"""Passes 3 and 6: dead activations and collapsed layers become constants; constants propagate.

Seeds (each exact):
- an activation call whose every channel stayed in a constant region on the calibration data
  (ReLU OFF, ReLU6 OFF/saturated, GELU/SiLU beyond their float32 margins) outputs a per-channel
  constant k_c, whatever its input;
- a conv/linear whose weights are all zero (what EGP's pruning produces) outputs its bias
  everywhere, zero-padded borders included, without looking at data.

A constant flows forward through per-sample ops (conv, linear, BatchNorm, activations, pooling,
dropout, identity, flatten, arithmetic among constants): they are evaluated once, on a batch of
one, and the node becomes a buffer. Where a constant meets a live tensor in an add/sub/mul it
broadcasts over the batch. A constant that would reach anything else (a concat, the output, a
reshape that reads the batch size) makes the seed refused.

Then algebra: x + 0 -> x, x * 1 -> x, and an activation whose input is provably non-negative
(relu/relu6 outputs, non-negative constants, sums/pools of those) becomes the identity for relu.
A BasicBlock whose first ReLU is dead thus loses both convs; its add and, when its BatchNorm shift
is zero, the second ReLU vanish too.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..regions import NONNEGATIVE_KINDS, activation_kind
from ..stats import EGP_META_KEY, ActivationStats
from .base import PassContext, PassOutcome, Refusal, Rewrite, finish, shape_of
from .util import add_constant, params_of

NAME = "constants"
_FOLDABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
                     nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                     nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity,
                     nn.Flatten, nn.LayerNorm)
_BROADCAST = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul,
              operator.iadd, operator.imul}
_BROADCAST_METHODS = {"add", "sub", "mul", "add_", "mul_"}
_FOLDABLE_FUNCTIONS = _BROADCAST | {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                                    F.leaky_relu, F.dropout, torch.flatten, F.adaptive_avg_pool2d}


def _is_broadcast(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _BROADCAST) or \
        (node.op == "call_method" and node.target in _BROADCAST_METHODS)


def _foldable(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _FOLDABLE_MODULES)
    if node.op == "call_function":
        return node.target in _FOLDABLE_FUNCTIONS
    return node.op == "call_method" and node.target in _BROADCAST_METHODS | {"relu", "flatten"}


def _full(value_per_channel: torch.Tensor, shape, channel_dim: int) -> torch.Tensor:
    """A batch-1 tensor of `shape` holding value_per_channel along channel_dim."""
    shape = (1, *shape[1:])
    dim = channel_dim % len(shape)
    view = [1] * len(shape)
    view[dim] = -1
    return value_per_channel.view(view).expand(shape).clone()


def _dtype(node: fx.Node) -> torch.dtype:
    tm = node.meta.get("tensor_meta")
    return getattr(tm, "dtype", torch.float32)


def _seed_value(gm, node: fx.Node) -> tuple[torch.Tensor | None, str]:
    shape = shape_of(node)
    st = node.meta.get(EGP_META_KEY)
    if isinstance(st, ActivationStats) and shape is not None:
        affine = st.channel_affine()
        if all(a is not None and a.is_constant for a in affine):
            k = torch.tensor([a.offset for a in affine], dtype=_dtype(node))
            what = "all channels dead" if bool((k == 0).all()) else "all channels constant"
            return _full(k, shape, st.channel_dim), what
    if node.op == "call_module" and shape is not None:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not bool(mod.weight.any()):
            b = mod.bias.detach() if mod.bias is not None else mod.weight.new_zeros(mod.weight.shape[0])
            dim = -1 if isinstance(mod, nn.Linear) else 1
            return _full(b, shape, dim), "all weights zero (collapsed layer)"
    return None, ""


def _closure(gm, seed: fx.Node) -> tuple[list[fx.Node], str | None]:
    """Nodes that become constant from `seed` (topological order), or a reason to refuse."""
    const, order, frontier = {seed}, [seed], list(seed.users)
    while frontier:
        user = frontier.pop(0)
        if user in const:
            continue
        inputs = user.all_input_nodes
        if all(i in const or i.op == "get_attr" for i in inputs) and _foldable(gm, user):
            const.add(user)
            order.append(user)
            frontier.extend(user.users)
        elif _is_broadcast(user):
            continue
        else:
            return [], f"constant would reach {user.name} ({user.op} {user.target}), which needs the batch"
    nodes = list(gm.graph.nodes)
    return sorted(order, key=nodes.index), None


def _evaluate(gm, node: fx.Node, env: dict) -> torch.Tensor:
    load = lambda a: env[a] if isinstance(a, fx.Node) and a in env else (  # noqa: E731
        operator.attrgetter(a.target)(gm) if isinstance(a, fx.Node) else a)
    args = fx.node.map_aggregate(node.args, load)
    kwargs = fx.node.map_aggregate(node.kwargs, load)
    with torch.no_grad():
        if node.op == "call_module":
            return gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def _compact(v: torch.Tensor) -> torch.Tensor:
    """Reduce dims along which v is constant to size 1 (it still broadcasts the same way)."""
    for d in range(1, v.dim()):
        first = v.narrow(d, 0, 1)
        if bool((v == first).all()):
            v = first
    return v


def _seed(gm, node, ctx, rewrites, refusals, done: set) -> None:
    if node in done:
        return
    value, what = _seed_value(gm, node)
    if value is None or not ctx.allows(node.name):
        return
    order, reason = _closure(gm, node)
    if reason is not None:
        refusals.append(Refusal(NAME, node.name, [node.name], f"{what}, but {reason}",
                                activation=node.name if EGP_META_KEY in node.meta else None))
        return
    done.update(order)
    env = {node: value}
    for n in order[1:]:
        env[n] = _evaluate(gm, n, env)
    removed, saved = [n.name for n in order], 0
    for n in order:
        if n.op == "call_module":
            saved += params_of(gm.get_submodule(n.target))
    # the node's own producer chain becomes dead code: count what it held
    for n in reversed(order):
        live_users = [u for u in n.users if u not in env]
        if live_users:
            with gm.graph.inserting_before(n):
                const = gm.graph.get_attr(add_constant(gm, _compact(env[n].to(_dtype(n))), n.name))
            n.replace_all_uses_with(const)
    is_act = EGP_META_KEY in node.meta
    rewrites.append(Rewrite(NAME, "constant_branch" if len(order) > 1 else "constant", node.name,
                            removed, True, f"{node.name}: {what}; {len(order)} node(s) folded",
                            params_saved=saved, activation=node.name if is_act else None,
                            decision="removed (constant output)" if is_act else None))


def _is_zero_const(gm, a) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr" \
        and not bool(operator.attrgetter(a.target)(gm).any())


def _nonnegative(gm, node, memo, modules) -> bool:
    if node in memo:
        return memo[node]
    memo[node] = False
    kind = activation_kind(node, modules)
    if kind in NONNEGATIVE_KINDS:
        ok = True
    elif node.op == "get_attr":
        ok = bool((operator.attrgetter(node.target)(gm) >= 0).all())
    elif node.op == "call_function" and node.target in (operator.add, torch.add, operator.iadd,
                                                        torch.cat, torch.flatten):
        ins = node.all_input_nodes
        ok = bool(ins) and all(_nonnegative(gm, i, memo, modules) for i in ins)
    elif node.op == "call_module" and isinstance(
            gm.get_submodule(node.target),
            (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten)):
        ok = _nonnegative(gm, node.args[0], memo, modules)
    else:
        ok = False
    memo[node] = ok
    return ok


def _simplify(gm, ctx, rewrites) -> None:
    memo: dict = {}
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _is_broadcast(node) and node.target in (operator.add, torch.add, "add", operator.iadd) \
                and len(node.args) == 2 and ctx.allows(node.name):
            a, b = node.args
            keep = a if _is_zero_const(gm, b) else b if _is_zero_const(gm, a) else None
            if isinstance(keep, fx.Node):
                node.replace_all_uses_with(keep)
                gm.graph.erase_node(node)
                rewrites.append(Rewrite(NAME, "drop_add", node.name, [node.name], True,
                                        f"{node.name}: adds a zero constant"))
                continue
        if activation_kind(node, modules) == "relu" and ctx.allows(node.name):
            src = node.args[0]
            if isinstance(src, fx.Node) and _nonnegative(gm, src, memo, modules):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                rewrites.append(Rewrite(NAME, "drop_relu", node.name, [node.name], True,
                                        f"{node.name}: input {src.name} is non-negative",
                                        activation=node.name,
                                        decision="removed (input is non-negative)"))


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    ctx.shapes(gm)
    rewrites: list[Rewrite] = []
    refusals: list[Refusal] = []
    done: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.users:
            _seed(gm, node, ctx, rewrites, refusals, done)
    gm.graph.eliminate_dead_code()
    _simplify(gm, ctx, rewrites)
    return finish(gm, NAME, rewrites, refusals)
