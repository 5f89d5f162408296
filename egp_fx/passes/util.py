"""Small helpers the passes share: costs, constants, rounding bounds of folded biases."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from egp_fx.ir.attrs import CAPTURE_META_KEY, add_attr
from egp_fx.ir.layer import Layer
from egp_fx.ir.ops import main_input
from egp_fx.ir.shapes import shape_of

ROUNDING_META_KEY = "egp_bias_rounding"
ROUNDING = 2.0 ** -24        # unit roundoff of float32


def layer_flops(layer: Layer, out_shape) -> int:
    """Multiply-add FLOPs (x2) of one sample through `layer` with output shape `out_shape`."""
    if out_shape is None:
        return 0
    out_numel = math.prod(int(d) for d in out_shape[1:])
    per_output = layer.weight.shape[1] if layer.is_linear else layer.weight[0].numel()
    return 2 * out_numel * int(per_output)


def params_of(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def layer_params(layer: Layer) -> int:
    return layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)


def aten_form(gm: fx.GraphModule) -> bool:
    """Was gm captured with torch.export (aten-level ops)?"""
    info = gm.meta.get(CAPTURE_META_KEY)
    return info is not None and info.mode == "export"


def arithmetic(gm: fx.GraphModule, name: str):
    """The mul/add function in the graph's own spelling."""
    if aten_form(gm):
        return {"mul": torch.ops.aten.mul.Tensor, "add": torch.ops.aten.add.Tensor}[name]
    return {"mul": torch.mul, "add": torch.add}[name]


def constant(gm: fx.GraphModule, value: torch.Tensor, hint: str, before: fx.Node) -> fx.Node:
    """A get_attr node for a new buffer holding `value` (name derived from `hint`)."""
    base = "_egp_const_" + "".join(c if c.isalnum() else "_" for c in hint)
    return add_attr(gm, base, value, before)


def bias_key(layer: Layer) -> str:
    """Where the rounding bound of a layer's folded bias is recorded."""
    return str(layer.node.target) if layer.module is not None else \
        str(layer.weight_node.target).rpartition(".")[0] + "#bias"


def record_bias_rounding(gm: fx.GraphModule, layer: Layer, bound: torch.Tensor) -> None:
    """Record, per bias entry, the float32 rounding error of the arithmetic a fold replaced
    (float64): constants.py uses it to tell a rounding residue from a value."""
    gm.meta.setdefault(ROUNDING_META_KEY, {})[bias_key(layer)] = bound.detach().double().cpu()


def bias_rounding(gm: fx.GraphModule, layer: Layer) -> torch.Tensor | None:
    """The recorded rounding bound of the layer's bias, else 0 (a bias is exact as stored);
    None without a bias."""
    if layer.bias is None:
        return None
    recorded = gm.meta.get(ROUNDING_META_KEY, {}).get(bias_key(layer))
    if recorded is not None and recorded.shape == layer.bias.shape:
        return recorded
    return torch.zeros(layer.bias.shape, dtype=torch.float64)


def single_tensor_input(node: fx.Node) -> bool:
    """The node reads one tensor (its other inputs, if any, are symbolic sizes)."""
    src = main_input(node)
    return src is not None and all(i is src or shape_of(i) is None and i.op != "get_attr"
                                   for i in node.all_input_nodes)
