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
exactly zero (rewrite kind ZERO_UP_TO_ROUNDING, with the bound). A BatchNorm whose shift
cancels its mean term then leaves no `x + 1e-8` behind, while a constant of any real size stays.

Then algebra: x + 0 -> x, (x + c1) + c2 -> x + (c1 + c2), and a ReLU whose input is provably
non-negative (relu/relu6 outputs, non-negative constants, sums, pools and concats of those)
goes. A BasicBlock whose first ReLU is dead thus loses both convs, its add and its second ReLU.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats
from egp_fx.ir.activations import KINDS
from egp_fx.ir.attrs import attr, module_path, set_attr
from egp_fx.ir.layer import layer_of
from egp_fx.ir.ops import ARITHMETIC, Role, main_input
from egp_fx.ir.shapes import dtype_of, shape_of

from .base import (Candidate, Decision, DecisionKind, PassContext, PassRun, Refusal, Rewrite,
    RewriteKind)
from .constant_values import Const, compact, evaluate, full
from .reasons import Reason, Why, render
from .registry import register
from .util import arithmetic, bias_rounding, constant, layer_params

NAME = "constants"
_PER_SAMPLE = frozenset({Role.LAYER, Role.NORM, Role.ACTIVATION, Role.NONLINEAR,
                         Role.LAYER_NORM, Role.POOL, Role.IDENTITY, Role.FLATTEN}) | ARITHMETIC
_BROADCAST = frozenset({Role.ADD, Role.SUB, Role.MUL})


def _seed(gm, node: fx.Node, ctx) -> tuple[Const | None, Reason | None]:
    shape = shape_of(node)
    if shape is None:
        return None, None
    st = node.meta.get(EGP_META_KEY)
    if isinstance(st, ActivationStats):
        affine = st.channel_affine()
        if all(a is not None and a.is_constant for a in affine):
            k = full(torch.tensor([a.offset for a in affine]), shape, st.channel_dim)
            what = Reason.ALL_DEAD if not bool(k.any()) else Reason.ALL_CONSTANT
            return Const(k, torch.zeros_like(k)), what
    layer = layer_of(gm, node, ctx.ops.modules)
    if layer is not None and not bool(layer.weight.any()):
        n = layer.out_channels
        b = layer.bias.detach().double().cpu() if layer.bias is not None else torch.zeros(n, dtype=torch.float64)
        e = bias_rounding(gm, layer)
        e = e if e is not None else torch.zeros(n, dtype=torch.float64)
        return Const(full(b, shape, layer.out_axis), full(e, shape, layer.out_axis)), \
            Reason.ZERO_WEIGHTS
    return None, None


def _closure(gm, seed: fx.Node, ctx, index: dict, what: Reason) -> tuple[list[fx.Node], Why | None]:
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
            return [], Why(Reason.CONSTANT_NEEDS_BATCH, {
                "seed": what, "node": user.name, "op": user.op,
                "target": str(getattr(user.target, "__name__", user.target))})
    return sorted(order, key=index.__getitem__), None


def _apply_seed(gm, node, order, env, what, live, made: dict) -> Rewrite:
    saved = sum(layer_params(lay) for n in order
                if (lay := layer_of(gm, n)) is not None)
    for n in reversed(order):
        if live[n]:
            made[n] = constant(gm, compact(env[n].value).to(dtype_of(n)), n.name, before=n)
            n.replace_all_uses_with(made[n])
    is_act = EGP_META_KEY in node.meta
    return Rewrite(NAME, RewriteKind.CONSTANT_BRANCH if len(order) > 1 else RewriteKind.CONSTANT,
                   node.name, [n.name for n in order], True,
                   f"{node.name}: {render(what)}; {len(order)} node(s) folded", params_saved=saved,
                   activation=node.name if is_act else None,
                   decision=Decision(DecisionKind.REMOVED, Why(Reason.CONSTANT_OUTPUT))
                   if is_act else None,
                   path=module_path(node, gm))


def _apply_rounding_zero(gm, node, const: fx.Node, value: torch.Tensor, bound: float) -> Rewrite:
    """The constant that replaced `node` becomes exact zeros."""
    set_attr(gm, const.target, torch.zeros_like(attr(gm, const.target)))
    return Rewrite(NAME, RewriteKind.ZERO_UP_TO_ROUNDING, node.name + ":zero", [node.name], True,
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
        ok = KINDS[op.kind].nonnegative
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
    return Rewrite(NAME, RewriteKind.DROP_ADD, node.name, [node.name], True, f"{node.name}: adds a zero constant",
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
    return Rewrite(NAME, RewriteKind.MERGE_ADDS, node.name, [inner.name, node.name], True,
                   f"{inner.name} and {node.name}: two constant adds merged", path=module_path(node, gm))


def _drop_relu(gm, node, src) -> Rewrite:
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    return Rewrite(NAME, RewriteKind.DROP_RELU, node.name, [node.name], True,
                   f"{node.name}: input {src.name} is non-negative", activation=node.name,
                   decision=Decision(DecisionKind.REMOVED, Why(Reason.NONNEGATIVE_INPUT)),
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


@register(NAME, shapes=True)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    done: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in done or not node.users:
            continue
        seed, what = _seed(gm, node, ctx)
        if seed is None:
            continue
        order, why = _closure(gm, node, ctx, index, what)
        if why is not None:
            yield Refusal(NAME, node.name, [node.name], why,
                          activation=node.name if EGP_META_KEY in node.meta else None,
                          path=module_path(node, gm))
            continue
        env = {node: seed}
        for n in order[1:]:
            env[n] = evaluate(gm, n, env, ctx)
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
