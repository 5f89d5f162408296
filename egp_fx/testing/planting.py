"""Planting ground truth with parameters, so that it holds for every input.

BatchNorm in eval mode computes gamma * (x - mean) / sqrt(var + eps) + beta; with gamma_c = 0
channel c outputs beta_c whatever the input. beta_c < 0 makes a following ReLU dead, beta_c > 0
keeps it ON (linear). A Linear row with weight 0 outputs its bias for every input: a bias below
an activation's margin (GELU -5.5, SiLU -20) makes that unit dead too.

A "cancelling" BatchNorm has beta = gamma * mean / sqrt(var + eps) + shift, so that bn(0) is
`shift` in real arithmetic; beta is computed in float32, so with shift 0 bn(0) is a rounding
residue of about 1e-7, as in a trained network whose branch collapsed.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from egp_fx.capture import trace
from egp_fx.ir.activations import region_spec
from egp_fx.ir.layer import layer_of
from egp_fx.ir.norm import norm_of
from egp_fx.ir.ops import Ops, Role, main_input


def realistic_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def plant_constant(bn: nn.BatchNorm2d | nn.BatchNorm1d, channels, value: float) -> None:
    """Channels of `bn` output `value` for every input."""
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    bn.weight.data[idx] = 0.0
    bn.bias.data[idx] = value


def plant_linear(bn: nn.BatchNorm2d | nn.BatchNorm1d, channels, value: float) -> None:
    """Channels of `bn` output `value` plus a term below 1e-2 (on normalised data): one region of
    a following activation, but not a constant (a constant input makes a constant unit)."""
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    bn.weight.data[idx] = 1e-3
    bn.bias.data[idx] = value


def plant_dead(bn, channels) -> None:
    plant_constant(bn, channels, -1.0)


def plant_zero_branch(block) -> None:
    """A torchvision BasicBlock whose first ReLU is dead and whose branch adds exactly zero."""
    plant_dead(block.bn1, range(block.bn1.num_features))
    plant_constant(block.bn2, range(block.bn2.num_features), 0.0)


def cancelling(bn: nn.BatchNorm2d, seed: int, shift: float = 0.0) -> None:
    """Random statistics and weight, and beta such that bn(0) is `shift` in real arithmetic (a
    float32 rounding residue when `shift` is 0; see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps) + shift)


@torch.no_grad()
def plant_rows(linear: nn.Linear, fraction: float, bias: float,
               g: torch.Generator) -> list[int]:
    """Zero `fraction` of the rows (units) of `linear`, chosen at random, their bias `bias`;
    the indices planted, sorted."""
    n = linear.out_features
    dead = sorted(torch.randperm(n, generator=g)[: int(round(fraction * n))].tolist())
    linear.weight[dead] = 0.0
    if linear.bias is not None:
        linear.bias[dead] = bias
    return dead


@torch.no_grad()
def plant_first_rows(linear: nn.Linear, fraction: float, bias: float) -> None:
    """The first int(fraction * out_features) rows of `linear`: weight 0, bias `bias`."""
    k = int(linear.out_features * fraction)
    linear.weight[:k] = 0.0
    linear.bias[:k] = bias


@torch.no_grad()
def fit_bn_statistics(model: nn.Module, batches, only_norms: bool = False) -> nn.Module:
    """Set every BatchNorm's running statistics to the data's (as training would), in place.

    Afterwards each pre-activation is normalised, so no channel is dead or linear by accident;
    planted channels (gamma = 0) keep their constant output whatever the statistics.
    only_norms: only the BatchNorms run in training mode (the rest of the model in eval mode:
    no training-only paths such as inception's auxiliary head, no dropout or drop-path).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    if only_norms:
        model.eval()
        for m in bns:
            m.train()
    for x in batches:
        model(x)
    model.eval()
    for m in bns:
        m.momentum = 0.1
    return model


DEAD_INPUT = {"leaky_relu": 0.0, "hardtanh": 0.0}   # kinds whose low region is not zero


_MOVES = {"transpose", "permute", "flatten", "view", "reshape", "contiguous"}   # move data only


def _targets(gm, node, ops, depth=0):
    """(scale, shift, path) of every BatchNorm / conv / linear whose channels, made constant,
    make `node`'s output constant per channel; None when some operand cannot be planted.
    Looks through eval-mode no-ops, reshapes and sums."""
    if not isinstance(node, fx.Node) or depth > 8:
        return None
    role = ops(node).role
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if role in (Role.IDENTITY, Role.RESHAPE, Role.FLATTEN) or name in _MOVES:
        return _targets(gm, main_input(node), ops, depth + 1)
    if role is Role.ADD and node.op == "call_function" and len(node.args) == 2 and not node.kwargs:
        parts = [_targets(gm, a, ops, depth + 1) for a in node.args]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]
    if (norm := norm_of(gm, node, ops.modules)) is not None:
        return [(norm.tensors["weight"], norm.tensors["bias"], norm.path)] \
            if norm.tensors["weight"] is not None else None
    if (layer := layer_of(gm, node, ops.modules)) is not None:
        return [(layer.weight, layer.bias, layer.path)]
    return None


@torch.no_grad()
def plant_dead_units(model: nn.Module, example, fraction: int = 4,
                     capture: str = "auto") -> list[str]:
    """Every `fraction`-th channel of each BatchNorm or conv/linear that writes the input of an
    activation call outputs a constant for every input (scale or weight row 0, shift or bias
    the constant), in place, so that the unit's output is zero; returns the paths planted.

    Found on the captured graph (egp_fx.trace), which shares the model's tensors, so it works
    for any architecture and either capture; it looks through no-ops, reshapes and sums (every
    operand planted). The constant is -30, in the zero low region of relu, relu6, GELU (below
    -5.5), SiLU (below -20) and hardswish (below -3); 0 for leaky_relu and hardtanh, whose low
    region is not zero, and for a layer without a bias (every kind maps 0 to 0).
    """
    gm = trace(model, example, capture=capture)
    ops = Ops(gm)
    planted, done = [], set()
    for node in gm.graph.nodes:
        spec = region_spec(ops(node))
        targets = _targets(gm, main_input(node), ops) if spec is not None else None
        for scale, shift, path in targets or ():
            if scale.data_ptr() in done:
                continue
            idx = torch.arange(0, scale.shape[0], fraction)
            scale[idx] = 0.0
            if shift is not None:
                shift[idx] = DEAD_INPUT.get(spec.kind, -30.0)
            done.add(scale.data_ptr())
            planted.append(path)
    return planted


@torch.no_grad()
def plant_norm_act(model: nn.Module, fraction: int = 4) -> list[str]:
    """plant_dead_units without a capture, for timm models: every `fraction`-th channel of each
    BatchNorm with an activation (timm's BatchNormAct2d) and of each MLP's fc1 (timm's Mlp)
    outputs -30 before the activation. For models whose capture is slow (torch.export)."""
    planted = []
    for path, m in model.named_modules():
        act = getattr(m, "act", None)
        if act is None or isinstance(act, nn.Identity):
            continue
        if isinstance(m, nn.BatchNorm2d):
            scale, shift = m.weight, m.bias
        elif isinstance(getattr(m, "fc1", None), nn.Linear):
            scale, shift, path = m.fc1.weight, m.fc1.bias, f"{path}.fc1"
        else:
            continue
        idx = torch.arange(0, shift.shape[0], fraction)
        scale[idx] = 0.0
        shift[idx] = -30.0
        planted.append(path)
    return planted
