"""The view of an eval-mode BatchNorm call, whatever graph form holds it (see layer.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .attrs import attr, module_path
from .ops import Role, arg, classify


@dataclass
class Norm:
    """An eval-mode BatchNorm call: y = scale * x + shift per channel (dim 1)."""

    gm: fx.GraphModule
    node: fx.Node
    module: nn.Module | None
    tensors: dict                      # weight, bias, running_mean, running_var (or None)
    eps: float

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    @property
    def path(self) -> str:
        return module_path(self.node, self.gm)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel, in float64."""
        t = {k: v.detach().double() if v is not None else None for k, v in self.tensors.items()}
        var, mean = t["running_var"], t["running_mean"]
        gamma = t["weight"] if t["weight"] is not None else torch.ones_like(var)
        beta = t["bias"] if t["bias"] is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + self.eps)
        return scale, beta - mean * scale

    def param_count(self) -> int:
        return sum(v.numel() for k, v in self.tensors.items()
                   if v is not None and k in ("weight", "bias"))


def norm_of(gm: fx.GraphModule, node, modules: dict | None = None) -> Norm | None:
    """The Norm view of an eval-mode BatchNorm call, or None."""
    if not isinstance(node, fx.Node):
        return None
    modules = modules if modules is not None else dict(gm.named_modules())
    if classify(node, modules).role is not Role.NORM or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        bn = modules[node.target]
        return Norm(gm, node, bn, {"weight": bn.weight, "bias": bn.bias,
                                   "running_mean": bn.running_mean, "running_var": bn.running_var},
                    float(bn.eps))
    if node.target is F.batch_norm:   # (input, running_mean, running_var, weight, bias, training, momentum, eps)
        names = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}
        eps = arg(node, 7, "eps", 1e-5)
    else:                             # aten: (input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
        names = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
        eps = arg(node, 7, "eps", 1e-5)
    tensors = {}
    for key, index in names.items():
        a = arg(node, index, key)
        if a is None:
            tensors[key] = None
        elif isinstance(a, fx.Node) and a.op == "get_attr":
            tensors[key] = attr(gm, a.target)
        else:
            return None
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        return None
    return Norm(gm, node, None, tensors, float(eps))
