"""Activation kinds and their regions.

Every supported activation is split along the pre-activation axis z into at most three intervals:

    LOW   z <= lo          HIGH  z > hi (or z >= hi)          MID   between them

Each interval has an exact affine map y = slope*z + offset, or None where the activation is
nonlinear there. The table (DESIGN.md, "Activation regions"):

| kind        | LOW            | MID              | HIGH          |
| relu        | z<=0 -> 0      | (empty)          | z>0 -> z      |
| relu6       | z<=0 -> 0      | 0<z<6 -> z       | z>=6 -> 6     |
| hardtanh    | z<=a -> a      | a<z<b -> z       | z>=b -> b     |
| leaky_relu  | z<=0 -> s*z    | (empty)          | z>0 -> z      |
| hardswish   | z<=-3 -> 0     | quadratic        | z>=3 -> z     |
| gelu        | z<=-5.5 -> 0   | nonlinear        | z>=5.3 -> z   |
| silu        | z<=-20 -> 0    | nonlinear        | z>=17 -> z    |

GELU/SiLU tails equal 0 / z to float32 rounding beyond those margins (|gelu(-5.5)| ~ 1e-7,
gelu(5.3) rounds to 5.3); callers may pass looser margins, which is then an approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Affine:
    slope: float
    offset: float

    @property
    def is_zero(self) -> bool:
        return self.slope == 0.0 and self.offset == 0.0

    @property
    def is_constant(self) -> bool:
        return self.slope == 0.0


@dataclass(frozen=True)
class RegionSpec:
    """Where the regions of one activation call lie and what each computes."""

    kind: str
    lo: float                 # LOW is z <= lo
    hi: float                 # HIGH is z > hi (hi_strict) or z >= hi
    hi_strict: bool
    low: Affine | None
    mid: Affine | None        # None: nonlinear (or empty when lo == hi)
    high: Affine | None
    params: tuple[tuple[str, float], ...] = ()

    @property
    def has_mid(self) -> bool:
        return self.hi > self.lo

    @property
    def names(self) -> tuple[str, str, str]:
        return ("low", "mid", "high")

    def affine(self, region: int) -> Affine | None:
        return (self.low, self.mid, self.high)[region]


GELU_MARGINS = (-5.5, 5.3)
SILU_MARGINS = (-20.0, 17.0)


def _relu() -> RegionSpec:
    return RegionSpec("relu", 0.0, 0.0, True, Affine(0.0, 0.0), None, Affine(1.0, 0.0))


def _hardtanh(kind: str, lo: float, hi: float) -> RegionSpec:
    return RegionSpec(kind, lo, hi, False, Affine(0.0, lo), Affine(1.0, 0.0), Affine(0.0, hi),
                      (("min_val", lo), ("max_val", hi)))


def _leaky(slope: float) -> RegionSpec:
    return RegionSpec("leaky_relu", 0.0, 0.0, True, Affine(slope, 0.0), None, Affine(1.0, 0.0),
                      (("negative_slope", slope),))


def _smooth(kind: str, margins: tuple[float, float]) -> RegionSpec:
    return RegionSpec(kind, margins[0], margins[1], False, Affine(0.0, 0.0), None, Affine(1.0, 0.0))


_MODULE_KINDS = (  # order matters: ReLU6 is a Hardtanh
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Hardtanh, "hardtanh"), (nn.LeakyReLU, "leaky_relu"),
    (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
)
_FUNCTION_KINDS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh",
    F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu",
    F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
}
_METHOD_KINDS = {"relu": "relu", "relu_": "relu"}


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def activation_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation kind of an fx node, or None if it is not a supported activation call."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        for cls, kind in _MODULE_KINDS:
            if type(mod) is cls or (cls is not nn.Hardtanh and isinstance(mod, cls)):
                return kind
        return "hardtanh" if isinstance(mod, nn.Hardtanh) else None
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target)
    return None


def region_spec(node: fx.Node, modules: dict[str, nn.Module], *,
                gelu_margins: tuple[float, float] = GELU_MARGINS,
                silu_margins: tuple[float, float] = SILU_MARGINS) -> RegionSpec | None:
    """The RegionSpec of an activation call (None if the node is not one)."""
    kind = activation_kind(node, modules)
    if kind is None:
        return None
    mod = modules.get(node.target) if node.op == "call_module" else None
    if kind == "relu":
        return _relu()
    if kind == "relu6":
        return _hardtanh("relu6", 0.0, 6.0)
    if kind == "hardtanh":
        if mod is not None:
            return _hardtanh("hardtanh", float(mod.min_val), float(mod.max_val))
        return _hardtanh("hardtanh", float(_arg(node, 1, "min_val", -1.0)),
                         float(_arg(node, 2, "max_val", 1.0)))
    if kind == "leaky_relu":
        slope = mod.negative_slope if mod is not None else _arg(node, 1, "negative_slope", 0.01)
        return _leaky(float(slope))
    if kind == "hardswish":
        return RegionSpec("hardswish", -3.0, 3.0, False, Affine(0.0, 0.0), None, Affine(1.0, 0.0))
    if kind == "gelu":
        return _smooth("gelu", gelu_margins)
    return _smooth("silu", silu_margins)


def activation_input(node: fx.Node) -> fx.Node:
    """The pre-activation node z of an activation call."""
    z = node.args[0] if node.args else node.kwargs.get("input")
    assert isinstance(z, fx.Node), f"activation {node.format_node()} has no tensor input"
    return z


NONNEGATIVE_KINDS = frozenset({"relu", "relu6"})
