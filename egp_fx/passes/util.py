"""Small graph/module helpers shared by the passes."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn


def modules_of(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def set_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `target`."""
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, new)


def add_constant(gm: fx.GraphModule, value: torch.Tensor, hint: str) -> str:
    """Register `value` as a buffer on gm under a fresh name; return the name for get_attr."""
    base = "_egp_const_" + "".join(c if c.isalnum() else "_" for c in hint)
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().clone())
    return name


def calls_per_module(gm: fx.GraphModule) -> dict[str, int]:
    """How many call_module nodes call each module target (a rewrite must not touch a shared one)."""
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = out.get(n.target, 0) + 1
    return out


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def conv_or_linear(mod: nn.Module | None) -> bool:
    return isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d))


def weight_bias(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) as float64 copies; a missing bias is zeros."""
    w = mod.weight.detach().double().clone()
    out = w.shape[0] if not isinstance(mod, nn.ConvTranspose2d) else w.shape[1]
    b = mod.bias.detach().double().clone() if mod.bias is not None else w.new_zeros(out)
    return w, b


def with_weights(mod: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 groups: int | None = None) -> nn.Module:
    """A new module like `mod` (conv or linear) carrying `weight`/`bias` (shapes may differ).

    `groups` overrides the conv's group count (a narrowed depthwise conv has fewer groups).
    """
    dtype, device = mod.weight.dtype, mod.weight.device
    if isinstance(mod, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        groups = mod.groups if groups is None else groups
        in_ch = weight.shape[1] * groups
        cls = type(mod) if type(mod) in (nn.Conv1d, nn.Conv2d) else nn.Conv2d
        new = cls(in_ch, weight.shape[0], weight.shape[2:], stride=mod.stride, padding=mod.padding,
                  dilation=mod.dilation, groups=groups, bias=bias is not None,
                  padding_mode=mod.padding_mode)
    else:
        raise TypeError(f"with_weights: unsupported module {type(mod).__name__}")
    new.weight = nn.Parameter(weight.to(dtype=dtype, device=device), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(dtype=dtype, device=device), requires_grad=False)
    return new.eval()


def conv_flops(mod: nn.Module, out_shape) -> int:
    """Multiply-add FLOPs (x2) of one sample through a conv/linear with output shape out_shape."""
    if out_shape is None:
        return 0
    w = mod.weight
    out_numel = 1
    for d in out_shape[1:]:
        out_numel *= int(d)
    if isinstance(mod, nn.Linear):
        return 2 * out_numel * w.shape[1]
    return 2 * out_numel * int(w[0].numel())


def params_of(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())
