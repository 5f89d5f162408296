"""Planting ground truth with parameters, so that it holds for every input.

BatchNorm in eval mode computes gamma * xhat + beta; with gamma_c = 0 channel c outputs beta_c
whatever the input. beta_c < 0 makes a following ReLU dead, beta_c > 0 keeps it ON (linear).
"""
from __future__ import annotations

import torch
from torch import nn


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


@torch.no_grad()
def fit_bn_statistics(model: nn.Module, batches) -> nn.Module:
    """Set every BatchNorm's running statistics to the data's (as training would), in place.

    Afterwards each pre-activation is normalised, so no channel is dead or linear by accident;
    planted channels (gamma = 0) keep their constant output whatever the statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    model.eval()
    for m in bns:
        m.momentum = 0.1
    return model


def _producer(gm, node, ops):
    """The node writing the pre-activation of `node`, through eval-mode no-ops."""
    from egp_fx.ops import Role, main_input

    z = main_input(node)
    while z is not None and ops(z).role is Role.IDENTITY:
        z = main_input(z)
    return z


DEAD_INPUT = {"leaky_relu": 0.0, "hardtanh": 0.0}   # kinds whose low region is not zero


@torch.no_grad()
def plant_dead_units(model: nn.Module, example, fraction: int = 4,
                     capture: str = "auto") -> list[str]:
    """Every `fraction`-th channel of each BatchNorm or conv/linear that writes the input of an
    activation call outputs a constant for every input (scale or weight row 0, shift or bias
    the constant), in place, so that the unit's output is zero; returns the paths planted.

    Found on the captured graph (egp_fx.trace), which shares the model's tensors, so it works
    for any architecture and either capture. The constant is -30, in the zero low region of
    relu, relu6, GELU (below -5.5), SiLU (below -20) and hardswish (below -3); 0 for
    leaky_relu and hardtanh, whose low region is not zero. A layer without a bias is left alone.
    """
    import egp_fx
    from egp_fx.layer import layer_of, norm_of
    from egp_fx.ops import Ops
    from egp_fx.regions import region_spec

    gm = egp_fx.trace(model, example, capture=capture)
    ops = Ops(gm)
    planted, done = [], set()
    for node in gm.graph.nodes:
        spec = region_spec(ops(node))
        if spec is None:
            continue
        z = _producer(gm, node, ops)
        norm = norm_of(gm, z, ops.modules) if z is not None else None
        layer = layer_of(gm, z, ops.modules) if z is not None and norm is None else None
        if norm is not None:
            scale, shift, path = norm.tensors["weight"], norm.tensors["bias"], norm.path
        elif layer is not None:
            scale, shift, path = layer.weight, layer.bias, layer.path
        else:
            continue
        if scale is None or shift is None or shift.data_ptr() in done:
            continue
        idx = torch.arange(0, shift.shape[0], fraction)
        scale[idx] = 0.0
        shift[idx] = DEAD_INPUT.get(spec.kind, -30.0)
        done.add(shift.data_ptr())
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
