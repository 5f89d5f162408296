"""One view of a weighted layer, whatever graph form holds it.

A conv or linear reaches the passes as a `call_module` of nn.Conv1d / nn.Conv2d / nn.Linear
(torch.fx.symbolic_trace), or as a call of F.conv2d / F.linear / aten.conv2d / aten.linear whose
weight and bias are graph attributes (torch.export; capture turns aten.addmm / aten.mm /
aten.matmul with an attribute weight into aten.linear). `layer_of(gm, node)` returns a Layer with
- weight [out, in / groups, *kernel] and bias [out] (or None), as stored;
- kind "conv" or "linear", channel axes (conv: dim 1; linear: the last dim), conv geometry;
- the module path for reports (`model.decoder.layers.3.fc1`);
- replace(weight, bias, ...) that writes new tensors the way the form holds them: a new module
  for call_module nodes, new attributes for function calls. Tensors are never changed in place,
  so a copy of the graph that shares them (egp_fx.ir.copying) still holds the old values.

norm.py gives the same view of eval-mode BatchNorm; attrs.py the attribute helpers both use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .attrs import (
    CAPTURE_META_KEY,
    ShareIndex,
    add_attr,
    attr,
    module_path,
    set_attr,
    share_index,
)
from .ops import Role, arg, classify

aten = torch.ops.aten

__all__ = ["CAPTURE_META_KEY", "Layer", "ShareIndex", "add_attr", "attr", "layer_of",
           "module_path", "set_attr", "share_index"]


def _plain(mod: nn.Module) -> bool:
    """A Conv1d/Conv2d/Linear running torch's own forward (timm's Conv2dSame, StdConv2d do not)."""
    if isinstance(mod, nn.Linear):
        return type(mod).forward is nn.Linear.forward
    for cls in (nn.Conv1d, nn.Conv2d):
        if isinstance(mod, cls):
            return type(mod).forward is cls.forward and type(mod)._conv_forward is cls._conv_forward
    return False


def _meta_conv(dims: int, weight: torch.Tensor, bias: bool, **geometry) -> nn.Module:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    groups = geometry["groups"]
    return cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), bias=bias,
               device="meta", **geometry)


@dataclass
class Layer:
    """A conv/linear call in a GraphModule (see the module docstring)."""

    gm: fx.GraphModule
    node: fx.Node
    kind: str                              # "conv" or "linear"
    weight_node: fx.Node | None = None     # function form: get_attr nodes
    bias_node: fx.Node | None = None

    @property
    def module(self) -> nn.Module | None:
        """The called module (call_module form; read afresh, replace() rebinds it)."""
        return self.gm.get_submodule(self.node.target) if self.node.op == "call_module" else None

    # ---------------------------------------------------------------- reading
    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight if self.module is not None else attr(self.gm, self.weight_node.target)

    @property
    def bias(self) -> torch.Tensor | None:
        if self.module is not None:
            return self.module.bias
        return attr(self.gm, self.bias_node.target) if self.bias_node is not None else None

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    @property
    def out_axis(self) -> int:
        """The axis of the output tensor that holds the output channels."""
        return -1 if self.is_linear else 1

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    def _geometry(self, name: str, index: int, default):
        if self.module is not None:
            return getattr(self.module, name)
        return arg(self.node, index, name, default)

    @property
    def groups(self) -> int:
        return 1 if self.is_linear else int(self._geometry("groups", 6, 1))

    @property
    def stride(self) -> tuple[int, ...]:
        return () if self.is_linear else _tuple(self._geometry("stride", 3, 1), self.dims)

    @property
    def dilation(self) -> tuple[int, ...]:
        return () if self.is_linear else _tuple(self._geometry("dilation", 5, 1), self.dims)

    @property
    def padding(self) -> tuple[int, ...] | str:
        if self.is_linear:
            return ()
        p = self._geometry("padding", 4, 0)
        return p if isinstance(p, str) else _tuple(p, self.dims)

    @property
    def padding_mode(self) -> str:
        return self.module.padding_mode if self.module is not None else "zeros"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def path(self) -> str:
        return module_path(self.node, self.gm) if self.module is None else self.gm_path

    @property
    def gm_path(self) -> str:
        return str(self.node.target) if self.module is not None else \
            str(self.weight_node.target).rpartition(".")[0]

    @property
    def tensor_names(self) -> list[str]:
        """Where the graph module holds this layer's weight and bias (attribute paths)."""
        if self.module is not None:
            names = ["weight"] + (["bias"] if self.module.bias is not None else [])
            return [f"{self.node.target}.{name}" for name in names]
        return [str(n.target) for n in (self.weight_node, self.bias_node) if n is not None]

    def shared_with(self, index: ShareIndex | None = None) -> str | None:
        """Why this layer's weights may not be rewritten for this call alone, or None.

        `index` (share_index(graph)) saves a scan of the graph per question."""
        index = index or share_index(self.node.graph)
        if self.module is not None:
            calls = index.calls[self.node.target]
            if calls > 1:
                return f"module {self.node.target} shared by {calls} calls"
            if self.node.target in index.read_modules:
                return f"weights of {self.node.target} are read elsewhere"
            return None
        for t in (self.weight_node, self.bias_node):
            if t is None:
                continue
            if len(t.users) > 1:
                return f"{t.target} is read by {len(t.users)} nodes"
            if index.reads[t.target] > 1:
                return f"{t.target} is read elsewhere"
        return None

    def shaped_like(self, out_channels: int | None = None, in_channels: int | None = None
                    ) -> nn.Module:
        """A standalone layer of this geometry with other widths and zero weights (for timing)."""
        out_c = out_channels or self.out_channels
        in_c = in_channels or self.in_channels
        w = torch.zeros((out_c, in_c // self.groups, *self.kernel_size), dtype=self.weight.dtype,
                        device=self.weight.device)
        if self.is_linear:
            new = nn.Linear(in_c, out_c, device="meta")
        else:
            new = _meta_conv(self.dims, w, True, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, groups=self.groups)
        new.weight = nn.Parameter(w, requires_grad=False)
        new.bias = nn.Parameter(w.new_zeros(out_c), requires_grad=False)
        return new.eval()

    def as_module(self) -> nn.Module:
        """A standalone nn.Module computing this layer (sharing its tensors), for timing."""
        if self.module is not None:
            return self.module
        w, b = self.weight, self.bias
        if self.is_linear:
            new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        else:
            new = _meta_conv(self.dims, w, b is not None, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, groups=self.groups)
        new.weight = nn.Parameter(w.detach(), requires_grad=False)
        if b is not None:
            new.bias = nn.Parameter(b.detach(), requires_grad=False)
        return new.eval()

    # ---------------------------------------------------------------- writing
    def replace(self, weight: torch.Tensor, bias: torch.Tensor | None, **geometry) -> None:
        """Hold `weight` / `bias` (new shapes allowed; cast to the old weight's dtype and device).

        `geometry` may set groups, stride, padding, dilation (convs). A bias appears when given
        and the layer had none; bias=None removes it.
        """
        like = self.weight
        weight = weight.detach().to(dtype=like.dtype, device=like.device)
        bias = bias.detach().to(dtype=like.dtype, device=like.device) if bias is not None else None
        if self.module is not None:
            self._replace_module(weight, bias, geometry)
        else:
            self._replace_attrs(weight, bias, geometry)

    def _replace_module(self, weight, bias, geometry) -> None:
        mod = self.module
        if self.is_linear:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        else:
            geo = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation,
                   "groups": mod.groups, "padding_mode": mod.padding_mode, **geometry}
            new = _meta_conv(self.dims, weight, bias is not None, **geo)
        new.weight = nn.Parameter(weight, requires_grad=mod.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=mod.weight.requires_grad)
        new.train(mod.training)
        owner_path, _, name = str(self.node.target).rpartition(".")
        setattr(self.gm.get_submodule(owner_path) if owner_path else self.gm, name, new)

    def _replace_attrs(self, weight, bias, geometry) -> None:
        set_attr(self.gm, self.weight_node.target, weight)
        if bias is not None and self.bias_node is not None:
            set_attr(self.gm, self.bias_node.target, bias)
        elif bias is not None:
            base = str(self.weight_node.target).rpartition(".")[0] + ".bias" \
                if "." in str(self.weight_node.target) else "bias"
            self.bias_node = add_attr(self.gm, base, bias, self.node)
        elif self.bias_node is not None:
            self.bias_node = None
        self._set_args(geometry)

    def _set_args(self, geometry: dict) -> None:
        args = list(self.node.args) + [None] * (7 - len(self.node.args)) if not self.is_linear \
            else list(self.node.args) + [None] * (3 - len(self.node.args))
        args[2] = self.bias_node
        kwargs = dict(self.node.kwargs)
        kwargs.pop("bias", None)
        if not self.is_linear:
            dims = self.dims
            for name, index, default in (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1)):
                value = geometry.get(name, arg(self.node, index, name, default))
                kwargs.pop(name, None)
                args[index] = value if isinstance(value, str) else list(_tuple(value, dims))
            kwargs.pop("groups", None)
            args[6] = int(geometry.get("groups", arg(self.node, 6, "groups", 1)))
        else:
            args = args[:3]
        self.node.args, self.node.kwargs = tuple(args), kwargs

    def set_input(self, node: fx.Node) -> None:
        self.node.args = (node, *self.node.args[1:])


def _tuple(v, dims: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == dims else tuple(int(v[0]) for _ in range(dims))
    return tuple(int(v) for _ in range(dims))


def layer_of(gm: fx.GraphModule, node, modules: dict | None = None) -> Layer | None:
    """The Layer view of `node`, or None when it is not a conv/linear we can rewrite."""
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function"):
        return None
    modules = modules if modules is not None else dict(gm.named_modules())
    op = classify(node, modules)
    if op.role is not Role.LAYER or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        mod = modules.get(node.target)
        if not _plain(mod) or node.kwargs or len(node.args) != 1:
            return None
        return Layer(gm, node, op.kind)
    if node.target not in (F.conv1d, F.conv2d, aten.conv1d.default, aten.conv2d.default,
                           F.linear, aten.linear.default):
        return None
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or \
            not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    if isinstance(arg(node, 4, "padding", 0), str):
        return None
    return Layer(gm, node, op.kind, weight_node=w, bias_node=b)
