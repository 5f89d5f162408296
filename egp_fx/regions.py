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

import torch.fx as fx

from .ops import Op, Role, classify, main_input


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


def region_spec(op: Op, *, gelu_margins: tuple[float, float] = GELU_MARGINS,
                silu_margins: tuple[float, float] = SILU_MARGINS) -> RegionSpec | None:
    """The RegionSpec of an activation Op (ops.classify), or None for any other op."""
    if op.role is not Role.ACTIVATION:
        return None
    kind, p = op.kind, op.params
    if kind == "relu":
        return _relu()
    if kind == "relu6":
        return _hardtanh("relu6", 0.0, 6.0)
    if kind == "hardtanh":
        return _hardtanh("hardtanh", p["lo"], p["hi"])
    if kind == "leaky_relu":
        return _leaky(p["slope"])
    if kind == "hardswish":
        return RegionSpec("hardswish", -3.0, 3.0, False, Affine(0.0, 0.0), None, Affine(1.0, 0.0))
    if kind == "gelu":   # the tanh approximation has tails at least as close (checked in tests)
        return _smooth("gelu", gelu_margins)
    if kind == "silu":
        return _smooth("silu", silu_margins)
    return None


def activation_kind(node: fx.Node, modules: dict) -> str | None:
    """The activation kind of a node (ops.classify), or None if it is not an activation call."""
    op = classify(node, modules)
    return op.kind if op.role is Role.ACTIVATION else None


def activation_input(node: fx.Node) -> fx.Node:
    """The pre-activation node z of an activation call."""
    z = main_input(node)
    assert z is not None, f"activation {node.format_node()} has no tensor input"
    return z


NONNEGATIVE_KINDS = frozenset({"relu", "relu6"})
