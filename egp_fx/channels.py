"""Which axis of a pre-activation tensor holds the channels.

The channel axis is the one the producing layer writes: dim 1 for convolutions and BatchNorm,
the last dim for nn.Linear / LayerNorm (channels-last tokens in ViT, Swin and ConvNeXt MLPs).
We walk back from the activation's input through ops that keep the layout (adds, dropout,
identity, scalar arithmetic) until a layer that writes channels is found. Returns a negative
axis for "last" so it holds for any number of leading dims.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d,
                   nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)
_PASS_MODULES = (nn.Dropout, nn.Identity)
_PASS_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                   torch.sub, torch.mul, F.dropout}
_FIRST_FUNCTIONS = {F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.batch_norm: 1}
_LAST_FUNCTIONS = {F.linear: -1, F.layer_norm: -1, torch.matmul: -1}


def _axis_written_by(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    if node.op == "call_module":
        mod = modules.get(node.target)
        if isinstance(mod, _CHANNELS_FIRST):
            return 1
        if isinstance(mod, _CHANNELS_LAST):
            return -1
    if node.op == "call_function":
        if node.target in _FIRST_FUNCTIONS:
            return _FIRST_FUNCTIONS[node.target]
        if node.target in _LAST_FUNCTIONS:
            return _LAST_FUNCTIONS[node.target]
    return None


def _passes_layout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in {"add", "sub", "mul", "div", "contiguous", "add_", "mul_"}
    return False


def channel_axis(z: fx.Node, modules: dict[str, nn.Module], ndim: int | None = None,
                 max_hops: int = 32) -> tuple[int, str]:
    """(axis, how it was found) for the pre-activation node z.

    The axis is 1 (channels-first) or -1 (channels-last). Without a recognised producer, a 2-D or
    4-D+ tensor defaults to dim 1 and a 3-D one (tokens) to -1; the second item then says so.
    """
    frontier, seen = [z], set()
    for _ in range(max_hops):
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            axis = _axis_written_by(node, modules)
            if axis is not None:
                return axis, f"written by {node.name}"
            if _passes_layout(node, modules):
                nxt.extend(a for a in node.all_input_nodes)
        if not nxt:
            break
        frontier = nxt
    if ndim == 3:
        return -1, "no producer found; 3-D input taken as tokens (channels last)"
    return 1, "no producer found; taken as channels-first"
