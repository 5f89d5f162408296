"""dead_channels: delete dead channels (and absorb constant ones) between a producer and its readers.

If channel c of activation A outputs the constant k_c on all calibration data (k_c = 0 for a dead
ReLU/GELU/SiLU unit, 6 for a saturated ReLU6 unit), then
- the producer P (the conv/linear writing A's input) loses output channel c: W_P[c], b_P[c] go;
- every reader L of A's output loses input channel c; for k_c != 0 its bias absorbs it,
  b_L += sum_{kernel} W_L[:, c] * k_c, which is exact only where L sees no zero padding (Linear,
  or a conv with padding 0) and nothing in between, so constant channels are kept otherwise.
Readers may sit behind ops that keep channels (identity, pooling), flatten (channel c maps to
c*S .. (c+1)*S-1 for S positions), a reshape that keeps the last dim (channels-last tokens, as
Hugging Face's GPT-2 and OPT MLPs reshape), and a concatenation along the channel axis (an
offset). A gated MLP, down(act(gate(x)) * up(x)) (LLaMA, Mistral, Qwen), reads A through the
product: a unit c that is constant zero makes the product zero whatever up gives, so gate and up
lose row c and down column c together.
A depthwise reader is narrowed with it; its own output channel c then carries the constant
act(b_dw[c]), which the unpadded layer after it absorbs into its bias.
Widths stay a multiple of Options.channel_multiple (the target's, unless given): runtimes block
channels (onnxruntime's NCHWc kernels by 8 or 16, tensor-core GEMMs by 64 to 128), and a layer
cut from 128 to 123 channels is padded back and runs slower than at 128. Keeping a few dead
channels is exact; the report says how many were kept and why.
After a rewrite the shapes along the walk are updated in place (no new propagation).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx

from egp_fx.calibrate.stats import EGP_META_KEY, ActivationStats, select_channels
from egp_fx.ir.activations import channel_tensor, narrow_channel_tensor
from egp_fx.ir.attrs import module_path
from egp_fx.ir.channels import keeps_last_dim
from egp_fx.ir.layer import Layer, layer_of
from egp_fx.ir.ops import arg, main_input
from egp_fx.ir.shapes import set_dim, shape_of

from .base import (Candidate, Decision, DecisionKind, PassContext, PassRun, Refusal, Rewrite,
    RewriteKind)
from .channel_walk import Read, Walk
from .channel_walk import walk as walk_channels
from .reasons import Reason, Why
from .registry import option, register
from .util import layer_flops, single_tensor_input

NAME = "dead_channels"


@dataclass(frozen=True)
class Options:
    """The options of dead_channels (compress keywords, egp-fx flags)."""

    channel_multiple: int = option(
        16, "keep narrowed widths a multiple of this (default: the target's; 1 removes every "
            "dead channel)")


CANDIDATE_MULTIPLES = (8, 16, 32, 64, 128)


def candidate_widths(n: int, live: int) -> list[int]:
    """The widths to try: the live count rounded up to each multiple, and n itself."""
    out = {n}
    for k in CANDIDATE_MULTIPLES:
        w = -(-live // k) * k
        if w < n:
            out.add(w)
    return sorted(out)


def _unpadded(layer: Layer) -> bool:
    return layer.is_linear or all(p == 0 for p in layer.padding)


def _depthwise(layer: Layer) -> bool:
    return not layer.is_linear and layer.groups == layer.in_channels == layer.out_channels > 1


def _after_depthwise(gm, ctx, read: Read) -> tuple[fx.Node | None, Layer | None]:
    """(activation or None, the unpadded layer) after a depthwise reader, else (None, None)."""
    nxt = list(read.layer.node.users)
    if not read.direct or len(nxt) != 1:
        return None, None
    act, after = None, nxt[0]
    if isinstance(after.meta.get(EGP_META_KEY), ActivationStats):
        if len(after.users) != 1 or after.meta[EGP_META_KEY].spec.channels is not None:
            return None, None
        act, after = after, next(iter(after.users))
    layer = layer_of(gm, after, ctx.ops.modules)
    if layer is None or not _unpadded(layer) or layer.groups != 1 or layer.shared_with():
        return None, None
    return act, layer


def _plan(gm, ctx, act, st) -> tuple[dict[int, float], Layer | None, Walk | None, Why | None]:
    affine = st.channel_affine()
    const = {c: a.offset for c, a in enumerate(affine) if a is not None and a.is_constant}
    if not const or len(const) == st.num_channels:
        return {}, None, None, None   # nothing to do, or every channel constant: constants.py
    src, pre = main_input(act), []
    while keeps_last_dim(src, ctx.ops) and len(src.users) == 1 and single_tensor_input(src):
        pre.append(src)
        src = main_input(src)
    _, why = channel_tensor(gm, act, ctx.ops(act))
    if why is not None:
        return const, None, None, why
    prod = layer_of(gm, src, ctx.ops.modules)
    if prod is None or (pre and not prod.is_linear):
        return const, None, None, Why(Reason.DC_NO_PRODUCER)
    if len(prod.node.users) != 1 or prod.shared_with():
        return const, None, None, Why(Reason.DC_PRODUCER_SHARED, {"layer": prod.node.name})
    if prod.groups != 1:
        return const, None, None, Why(Reason.DC_PRODUCER_GROUPED, {"layer": prod.node.name})
    walk, reason = walk_channels(gm, ctx, act, st.channel_dim, st.num_channels)
    if reason:
        return const, None, None, reason
    for node in pre:
        walk.passed.append((node, -1, 1))
        walk.reshapes.append(node)
    readers = [r.layer.node for r in walk.reads]
    if len(set(readers)) != len(readers):
        return const, None, None, Why(Reason.DC_READ_TWICE)
    for layer in [r.layer for r in walk.reads] + walk.gates:
        if (why := layer.shared_with()) is not None:
            return const, None, None, Why(Reason.DC_READER_SHARED,
                                          {"layer": layer.node.name, "sharing": why})
    for r in walk.reads:
        if r.layer.groups != 1 and not (_depthwise(r.layer) and _after_depthwise(gm, ctx, r)[1]):
            return const, None, None, Why(Reason.DC_READER_GROUPED, {"layer": r.layer.node.name})
    absorbable = not walk.through_product and all(r.direct and _unpadded(r.layer) for r in walk.reads) \
        and not any(_depthwise(r.layer) for r in walk.reads)
    return {c: k for c, k in const.items() if k == 0.0 or absorbable}, prod, walk, None


def _aligned(remove: dict[int, float], n: int, multiple: int) -> dict[int, float]:
    """Keep enough removable channels that the width stays a multiple of `multiple`.

    multiple <= 1, or a width that is not a multiple to begin with, disables the rounding.
    """
    if multiple <= 1 or n % multiple:
        return remove
    return _keep_width(remove, n, -(-(n - len(remove)) // multiple) * multiple)


def _keep_width(remove: dict[int, float], n: int, width: int) -> dict[int, float]:
    """The channels to drop so that `width` remain: zero channels first, constant ones last."""
    drop = sorted(remove, key=lambda c: (remove[c] != 0.0, c))[:max(n - width, 0)]
    return {c: remove[c] for c in sorted(drop)}


def _timed_width(ctx, prod: Layer, walk: Walk, n: int, m0: int) -> tuple[int, dict] | None:
    """The fastest width on the target among the candidates (candidate_widths), with
    the timings; None when the layers around the activation are not simple enough to time."""
    reads = walk.reads
    if walk.gates or walk.reshapes or len(reads) != 1 or not reads[0].direct \
            or reads[0].layer.groups != 1 or prod.groups != 1:
        return None
    reader, table = reads[0].layer, ctx.timings
    tm = prod.input.meta.get("tensor_meta")
    if tm is None:
        return None
    shape = tuple(tm.shape)

    def build(width: int):
        module = torch.nn.Sequential(prod.shaped_like(out_channels=width),
                                     reader.shaped_like(in_channels=width))
        return module, torch.randn(shape, dtype=tm.dtype, device=prod.weight.device)

    times = {w: table.seconds(("narrowed", prod.kind, shape, prod.kernel_size, prod.stride,
                               str(prod.padding), reader.out_channels, reader.kernel_size,
                               str(reader.padding), w), lambda w=w: build(w))
             for w in candidate_widths(n, m0)}
    return min(times, key=lambda w: (times[w], w)), times


def _narrow_reader(read: Read, remove: dict[int, float]) -> int:
    """Drop input channels of a reader; absorb constants into its bias. Returns params saved."""
    layer = read.layer
    w = layer.weight.detach()
    b = layer.bias.detach().double() if layer.bias is not None else None
    drop: dict[int, float] = {i: k for c, k in remove.items()
                              for i in range(read.offset + c * read.span,
                                             read.offset + (c + 1) * read.span)}
    constants = {i: k for i, k in drop.items() if k != 0.0}
    if constants:   # b += sum over taps of W[:, i] k_i, in float64 on the columns concerned
        cols = torch.tensor(sorted(constants), device=w.device)
        k = torch.tensor([constants[i] for i in sorted(constants)], dtype=torch.float64,
                         device=w.device)
        taps = w.index_select(1, cols).double().reshape(w.shape[0], len(cols), -1).sum(2)
        b = (b if b is not None else taps.new_zeros(w.shape[0])) + taps @ k
    keep = torch.tensor([i for i in range(w.shape[1]) if i not in drop], device=w.device)
    before = w.numel()
    layer.replace(w.index_select(1, keep), b)
    return before - layer.weight.numel()


def _narrow_depthwise(gm, ctx, read: Read, remove: dict[int, float], touched: list) -> int:
    """Narrow a depthwise reader, then let the layer after it absorb the constants left (added
    to `touched`)."""
    layer = read.layer
    act, after = _after_depthwise(gm, ctx, read)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    keep = [c for c in range(w.shape[0]) if c not in remove]
    values = (b[list(remove)] + torch.tensor([remove[c] for c in remove], dtype=torch.float64)
              * w[list(remove)].flatten(1).sum(1))      # exact for k == 0 at padded borders
    before = w.numel()
    layer.replace(w[keep], b[keep] if layer.bias is not None else None, groups=len(keep))
    saved = before - layer.weight.numel()
    if act is not None:
        values = _apply_act(act, values)
        act.meta[EGP_META_KEY] = select_channels(act.meta[EGP_META_KEY], keep)
        set_dim(act, 1, len(keep))
    set_dim(layer.node, 1, len(keep))
    consts = {c: float(v) for c, v in zip(remove, values.tolist())}
    touched.append(after)
    return saved + _narrow_reader(Read(after, 0, 1, True), consts)


def _apply_act(act: fx.Node, values: torch.Tensor) -> torch.Tensor:
    """The activation `act` applied to per-channel values (a batch of one, channels first)."""
    gm = act.graph.owning_module
    x = values.double().view(1, -1, 1, 1)
    if act.op == "call_module":
        out = gm.get_submodule(act.target)(x)     # activation modules hold no tensors
    elif act.op == "call_function":
        out = act.target(x, *act.args[1:], **act.kwargs)
    else:
        out = getattr(x, act.target)(*act.args[1:], **act.kwargs)
    return out.double().flatten()


def _update_shapes(walk: Walk, prod: Layer, act: fx.Node, removed: int) -> None:
    for node, axis, span in [(prod.node, prod.out_axis, 1), (act, prod.out_axis, 1), *walk.passed]:
        shape = shape_of(node)
        if shape is not None:
            set_dim(node, axis, shape[axis] - removed * span)
    for view in walk.reshapes:     # a literal width in a view's shape follows the new width
        size = arg(view, 1, "size")
        new_last = shape_of(view)[-1]
        if isinstance(size, (list, tuple)) and isinstance(size[-1], int) and size[-1] != -1:
            view.args = (view.args[0], [*size[:-1], new_last], *view.args[2:])


def _apply(gm, ctx, act, st, remove, prod: Layer, walk: Walk) -> Rewrite:
    keep = [c for c in range(st.num_channels) if c not in remove]
    n, m = st.num_channels, len(keep)
    flops = layer_flops(prod, shape_of(prod.node)) * (n - m) // n
    flops += sum(layer_flops(r.layer, shape_of(r.layer.node)) for r in walk.reads)
    flops += sum(layer_flops(g, shape_of(g.node)) * (n - m) // n for g in walk.gates)
    saved = 0
    index = torch.tensor(keep, device=prod.weight.device)
    for layer in (prod, *walk.gates):
        w, b = layer.weight.detach(), layer.bias
        saved += w.numel() - len(keep) * w[0].numel() + (n - m) * (b is not None)
        layer.replace(w.index_select(0, index), b.detach()[index] if b is not None else None)
    touched = [prod, *walk.gates, *(r.layer for r in walk.reads)]
    for r in walk.reads:
        saved += _narrow_depthwise(gm, ctx, r, remove, touched) if _depthwise(r.layer) \
            else _narrow_reader(r, remove)
    act.meta[EGP_META_KEY] = select_channels(st, keep)
    slopes, _ = channel_tensor(gm, act, ctx.ops(act))
    if slopes is not None:          # PReLU's per-channel slopes follow its channels
        narrow_channel_tensor(gm, slopes, keep)
    _update_shapes(walk, prod, act, n - m)
    flops -= sum(layer_flops(r.layer, shape_of(r.layer.node)) for r in walk.reads)
    readers = [r.layer.node.name for r in walk.reads]
    gates = f"; gated by {', '.join(g.node.name for g in walk.gates)}" if walk.gates else ""
    return Rewrite(NAME, RewriteKind.NARROW_CHANNELS, act.name,
                   [prod.node.name, act.name, *(g.node.name for g in walk.gates), *readers], True,
                   f"{prod.node.name}: {n - m} constant output channel(s) removed; readers "
                   f"{', '.join(readers)} narrowed{gates}",
                   params_saved=saved, flops_saved=max(flops, 0), activation=act.name,
                   decision=Decision(DecisionKind.NARROWED, before=n, after=m),
                   path=module_path(act, gm),
                   tensors=[name for layer in touched for name in layer.tensor_names]
                   + ([slopes] if slopes is not None else []))


@register(NAME, shapes=True, options=Options)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    multiple = ctx.options_of(Options).channel_multiple
    for act in list(gm.graph.nodes):
        st = act.meta.get(EGP_META_KEY)
        if not isinstance(st, ActivationStats) or not act.users:
            continue
        remove, prod, walk, why = _plan(gm, ctx, act, st)
        path = module_path(act, gm)
        if why is not None:
            yield Refusal(NAME, act.name, [act.name], why, activation=act.name, path=path)
            continue
        if not remove or prod is None:
            continue
        if walk.through_product or any(_depthwise(r.layer) for r in walk.reads):
            remove = {c: k for c, k in remove.items() if k == 0.0}
        timed = _timed_width(ctx, prod, walk, st.num_channels, st.num_channels - len(remove)) \
            if ctx.timings is not None else None
        if timed is not None:
            width, times = timed
            aligned = _keep_width(remove, st.num_channels, width)
            if not aligned:
                yield Refusal(NAME, act.name, [act.name],
                              Why(Reason.DC_ALL_SLOWER, {"times": times}),
                              activation=act.name, path=path)
                continue
            kept = Why(Reason.DC_KEPT_FOR_SPEED, {"kept": len(remove) - len(aligned),
                                                  "removable": len(remove), "times": times})
        else:
            aligned = _aligned(remove, st.num_channels, multiple)
            kept = Why(Reason.DC_KEPT_FOR_MULTIPLE, {
                "kept": len(remove) - len(aligned), "removable": len(remove), "multiple": multiple})
        if not aligned:
            yield Refusal(NAME, act.name, [act.name], Why(Reason.DC_ABOVE_MULTIPLE, {
                "removable": len(remove), "multiple": multiple}), activation=act.name, path=path)
            continue
        if len(aligned) < len(remove):
            yield Refusal(NAME, act.name, [act.name], kept, activation=act.name, path=path)
        yield Candidate(act.name, functools.partial(_apply, gm, ctx, act, st, aligned, prod, walk))
