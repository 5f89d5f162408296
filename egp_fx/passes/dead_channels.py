"""Pass 2: delete dead channels (and absorb constant ones) between a producer and its consumers.

If channel c of activation A outputs the constant k_c on all calibration data (k_c = 0 for a
dead ReLU/GELU unit, 6 for a saturated ReLU6 unit), then
- the producer P (conv/linear writing A's input) loses output channel c: W_P[c], b_P[c] go;
- every consumer L reading A's output loses input channel c; for k_c != 0 its bias absorbs it:
  b_L += sum_{kernel} W_L[:, c] * k_c, which is exact only where L sees no zero padding
  (Linear, or conv with padding 0) and no op in between, so constant channels are kept otherwise.
Consumers may sit behind channel-preserving ops (pooling, dropout, identity), flatten (channel c
maps to c*S..(c+1)*S-1 for S spatial positions) and concatenation along the channel axis (an
offset). Widths are rounded to a multiple of 16 (ctx.options["channel_multiple"]): runtimes
block channels (onnxruntime's NCHWc kernels by 16 with AVX-512, 8 with AVX2), so a conv cut from
128 to 123 channels is padded back and runs slower than at 128. A depthwise consumer is narrowed with it; its own output channel c then carries the
constant act(b_dw[c]), which the 1x1 conv after it absorbs into its bias (exact: no padding).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..stats import EGP_META_KEY, ActivationStats, select_channels
from .base import PassContext, PassOutcome, Refusal, Rewrite, finish, invalidate_shapes, shape_of
from .util import calls_per_module, conv_flops, set_module, weight_bias, with_weights

NAME = "dead_channels"
_KEEP_CHANNELS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                  nn.Dropout, nn.Identity)
_KEEP_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout}


class _Use:
    """A consumer reading channel c at input indices offset + c*S ... + S - 1."""

    def __init__(self, node: fx.Node, offset: int, span: int, direct: bool):
        self.node, self.offset, self.span, self.direct = node, offset, span, direct

    def indices(self, c: int) -> range:
        return range(self.offset + c * self.span, self.offset + (c + 1) * self.span)


def _is_flatten(gm, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.Flatten)
    return (n.op == "call_function" and n.target is torch.flatten) or \
        (n.op == "call_method" and n.target == "flatten")


def _consumers(gm, act: fx.Node, channel_dim: int) -> tuple[list[_Use], str | None]:
    """Every conv/linear reading act's channels, with where they land in its input."""
    last = channel_dim == -1 or len(shape_of(act) or ()) == 2
    uses, stack = [], [(act, 0, 1, True, last)]
    while stack:
        node, offset, span, direct, last = stack.pop()
        for u in node.users:
            mod = gm.get_submodule(u.target) if u.op == "call_module" else None
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d)):
                if isinstance(mod, nn.Linear) != last:
                    return [], f"{u.name} reads another axis than the channels"
                if u.args[0] is not node:
                    return [], f"{u.name} takes the tensor as a non-input argument"
                uses.append(_Use(u, offset, span, direct))
            elif isinstance(mod, _KEEP_CHANNELS) or (u.op == "call_function" and u.target in _KEEP_FUNCTIONS):
                stack.append((u, offset, span, False, last))
            elif _is_flatten(gm, u):
                shape = shape_of(node)
                if shape is None or len(shape) < 2 or last:
                    return [], f"cannot follow the channels through {u.name}"
                s = 1
                for d in shape[2:]:
                    s *= int(d)
                stack.append((u, offset * s, span * s, False, True))
            elif u.op == "call_function" and u.target is torch.cat:
                dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
                ndim = len(shape_of(node) or ())
                axis = ndim - 1 if last else 1
                if ndim == 0 or dim % ndim != axis:
                    return [], f"concatenated along another axis at {u.name}"
                before = 0
                for t in u.args[0]:
                    if t is node:
                        break
                    before += shape_of(t)[dim]
                stack.append((u, offset + before, span, False, last))
            else:
                return [], f"feeds {u.name} ({u.op} {getattr(u.target, '__name__', u.target)})"
    return uses, None


def _narrow_consumer(gm, use: _Use, remove: dict[int, float]) -> int:
    """Drop input channels of a consumer; absorb constants into its bias. Returns params saved."""
    mod = gm.get_submodule(use.node.target)
    w, b = weight_bias(mod)
    drop: dict[int, float] = {}
    for c, k in remove.items():
        for i in use.indices(c):
            drop[i] = k
    for i, k in drop.items():
        if k != 0.0:
            b += k * w[:, i].reshape(w.shape[0], -1).sum(1)
    keep = [i for i in range(w.shape[1]) if i not in drop]
    new = with_weights(mod, w[:, keep], b if mod.bias is not None or any(drop.values()) else None)
    set_module(gm, use.node.target, new)
    return mod.weight.numel() - new.weight.numel()


def _plan(gm, act, st, calls) -> tuple[dict[int, float], fx.Node | None, list[_Use], str | None]:
    affine = st.channel_affine()
    const = {c: a.offset for c, a in enumerate(affine) if a is not None and a.is_constant}
    if not const:
        return {}, None, [], None
    if len(const) == st.num_channels:
        return {}, None, [], None  # every channel constant: the constants pass owns it
    prod = act.args[0]
    pmod = gm.get_submodule(prod.target) if isinstance(prod, fx.Node) and prod.op == "call_module" else None
    if not isinstance(pmod, (nn.Conv2d, nn.Linear, nn.Conv1d)):
        return const, None, [], "the pre-activation is not written by a conv/linear alone"
    if len(prod.users) != 1 or calls.get(prod.target, 0) != 1:
        return const, None, [], f"{prod.name} has other users or is shared"
    if isinstance(pmod, nn.Conv2d) and pmod.groups != 1:
        return const, None, [], f"{prod.name} is a grouped conv (its inputs would need narrowing too)"
    uses, reason = _consumers(gm, act, st.channel_dim)
    if reason:
        return const, None, [], reason
    for u in uses:
        mod = gm.get_submodule(u.node.target)
        if calls.get(u.node.target, 0) != 1:
            return const, None, [], f"consumer {u.node.name} is shared by several calls"
        if isinstance(mod, nn.Conv2d) and mod.groups != 1 and not _depthwise_ok(gm, u, calls):
            return const, None, [], f"grouped consumer {u.node.name} cannot be narrowed consistently"
    absorbable = all(u.direct and _unpadded(gm.get_submodule(u.node.target)) for u in uses)
    remove = {c: k for c, k in const.items() if k == 0.0 or absorbable}
    return remove, prod, uses, None


def _unpadded(mod) -> bool:
    return isinstance(mod, nn.Linear) or all(p == 0 for p in mod.padding)


def _depthwise_ok(gm, use: _Use, calls) -> bool:
    mod = gm.get_submodule(use.node.target)
    if not (use.direct and mod.groups == mod.in_channels == mod.out_channels):
        return False
    nxt = list(use.node.users)
    if len(nxt) != 1:
        return False
    after = nxt[0]
    if isinstance(after.meta.get(EGP_META_KEY), ActivationStats):
        if len(after.users) != 1:
            return False
        after = next(iter(after.users))
    amod = gm.get_submodule(after.target) if after.op == "call_module" else None
    return isinstance(amod, (nn.Conv2d, nn.Linear)) and _unpadded(amod) and \
        getattr(amod, "groups", 1) == 1 and calls.get(after.target, 0) == 1


def _narrow_depthwise(gm, use: _Use, remove: dict[int, float]) -> int:
    """Narrow a depthwise consumer, then let the layer after it absorb the constants left."""
    mod = gm.get_submodule(use.node.target)
    w, b = weight_bias(mod)
    keep = [c for c in range(w.shape[0]) if c not in remove]
    dw_out = b.clone()  # input channel c is the constant remove[c]: output is k * sum(kernel) + b
    for c, k in remove.items():
        dw_out[c] = b[c] + k * w[c].sum()  # exact only for k == 0 at padded borders; k != 0 excluded
    new = with_weights(mod, w[keep], b[keep], groups=len(keep))
    set_module(gm, use.node.target, new)
    saved = mod.weight.numel() - new.weight.numel()
    after = next(iter(use.node.users))
    values = dw_out[list(remove)].float().view(1, -1, 1, 1)
    if isinstance(after.meta.get(EGP_META_KEY), ActivationStats):
        st = after.meta[EGP_META_KEY]
        if after.op == "call_module":
            values = gm.get_submodule(after.target)(values)
        else:
            values = after.target(values, *after.args[1:], **after.kwargs)
        after.meta[EGP_META_KEY] = select_channels(st, keep)
        after = next(iter(after.users))
    consts = {c: float(v) for c, v in zip(remove, values.flatten().tolist())}
    saved += _narrow_consumer(gm, _Use(after, 0, 1, True), consts)
    return saved


def _aligned(remove: dict[int, float], n: int, multiple: int) -> dict[int, float]:
    """Keep enough removable channels that the width stays a multiple of `multiple`.

    Zero channels are dropped first,
    constant ones (whose removal changes a bias) last. multiple <= 1 disables the rounding.
    """
    if multiple <= 1 or n % multiple:
        return remove
    m = n - len(remove)
    target = -(-m // multiple) * multiple          # round the kept width up
    drop = sorted(remove, key=lambda c: (remove[c] != 0.0, c))[:n - target]
    return {c: remove[c] for c in sorted(drop)}


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    rewrites, refusals = [], []
    calls = calls_per_module(gm)
    ctx.shapes(gm)
    for act in list(gm.graph.nodes):
        st = act.meta.get(EGP_META_KEY)
        if not isinstance(st, ActivationStats) or not ctx.allows(act.name):
            continue
        remove, prod, uses, reason = _plan(gm, act, st, calls)
        if reason:
            refusals.append(Refusal(NAME, act.name, [act.name], f"dead channels kept: {reason}",
                                    activation=act.name))
            continue
        if not remove or prod is None:
            continue
        if any(gm.get_submodule(u.node.target).groups != 1 for u in uses
               if isinstance(gm.get_submodule(u.node.target), nn.Conv2d)):
            remove = {c: k for c, k in remove.items() if k == 0.0}
        remove = _aligned(remove, st.num_channels, ctx.options.get("channel_multiple", 16))
        if not remove:
            refusals.append(Refusal(NAME, act.name, [act.name],
                                    "dead channels kept: removing them would not shrink the width "
                                    "below the next multiple of "
                                    f"{ctx.options.get('channel_multiple', 16)}", activation=act.name))
            continue
        keep = [c for c in range(st.num_channels) if c not in remove]
        pmod = gm.get_submodule(prod.target)
        n, m = st.num_channels, len(keep)
        flops_saved = conv_flops(pmod, shape_of(prod)) * (n - m) // n
        for u in uses:
            flops_saved += conv_flops(gm.get_submodule(u.node.target), shape_of(u.node))
        w, b = weight_bias(pmod)
        new_p = with_weights(pmod, w[keep], b[keep] if pmod.bias is not None else None)
        set_module(gm, prod.target, new_p)
        saved = pmod.weight.numel() - new_p.weight.numel() + len(remove) * (pmod.bias is not None)
        for u in uses:
            umod = gm.get_submodule(u.node.target)
            if isinstance(umod, nn.Conv2d) and umod.groups != 1:
                saved += _narrow_depthwise(gm, u, remove)
            else:
                saved += _narrow_consumer(gm, u, remove)
        act.meta[EGP_META_KEY] = select_channels(st, keep)
        for u in uses:  # consumers' output shapes are unchanged but for a narrowed depthwise conv
            flops_saved -= conv_flops(gm.get_submodule(u.node.target), shape_of(u.node))
        if any(n.op == "call_function" and n.target is torch.cat for n in gm.graph.nodes):
            invalidate_shapes(gm)  # concat offsets read other inputs' channel counts
            ctx.shapes(gm)
        rewrites.append(Rewrite(NAME, "narrow_channels", act.name,
                                [prod.name, act.name, *(u.node.name for u in uses)], True,
                                f"{prod.name}: {n - m} constant output channel(s) removed; "
                                f"consumers {', '.join(u.node.name for u in uses)} narrowed",
                                params_saved=saved, flops_saved=max(flops_saved, 0),
                                activation=act.name, decision=f"narrowed {n} -> {m}"))
    return finish(gm, NAME, rewrites, refusals)
