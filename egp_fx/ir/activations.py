"""The activation kinds egp_fx understands: one entry each, read by the classifier (ops.py) and
by calibration (regions). KINDS is the registry; register() adds an entry.

An entry says how the activation is spelled (module classes, functions — torch, F and aten
overloads — and tensor methods), which arguments it reads (a slope, bounds), and its regions:
the intervals of the pre-activation z on which it is exactly affine (regions.RegionSpec).
Adding an activation kind is adding an entry here.

| kind        | LOW            | MID              | HIGH          |
| relu        | z<=0 -> 0      | (empty)          | z>0 -> z      |
| relu6       | z<=0 -> 0      | 0<z<6 -> z       | z>=6 -> 6     |
| hardtanh    | z<=a -> a      | a<z<b -> z       | z>=b -> b     |
| leaky_relu  | z<=0 -> s*z    | (empty)          | z>0 -> z      |
| hardsigmoid | z<=-3 -> 0     | z/6 + 1/2        | z>=3 -> 1     |
| hardswish   | z<=-3 -> 0     | quadratic        | z>=3 -> z     |
| gelu        | z<=-5.5 -> 0   | nonlinear        | z>=5.3 -> z   |
| silu        | z<=-20 -> 0    | nonlinear        | z>=17 -> z    |

GELU/SiLU tails equal 0 / z to float32 rounding beyond those margins (|gelu(-5.5)| ~ 1e-7,
gelu(5.3) rounds to 5.3, and the tanh approximation's tails are closer still); callers may pass
looser margins, which is then an approximation.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .regions import Affine, RegionSpec

aten = torch.ops.aten
GELU_MARGINS = (-5.5, 5.3)
SILU_MARGINS = (-20.0, 17.0)


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@dataclass(frozen=True)
class ActivationKind:
    name: str
    modules: tuple[type, ...]
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    params: Callable = lambda node, mod: {}                  # (fx node, module or None) -> dict
    regions: Callable = None                                  # (params, margins) -> RegionSpec
    nonnegative: bool = False                                 # output >= 0 for every input
    margins: tuple[float, float] | None = None                # default margins (smooth kinds)


def _hardtanh_params(node, mod) -> dict:
    lo = float(mod.min_val) if mod is not None else float(_arg(node, 1, "min_val", -1.0))
    hi = float(mod.max_val) if mod is not None else float(_arg(node, 2, "max_val", 1.0))
    return {"lo": lo, "hi": hi}


def _clamp_regions(lo: float, hi: float) -> RegionSpec:
    return RegionSpec("hardtanh", lo, hi, False, Affine(0.0, lo), Affine(1.0, 0.0), Affine(0.0, hi))


def _smooth(name: str) -> Callable:
    return lambda p, margins: RegionSpec(name, margins[0], margins[1], False, Affine(0.0, 0.0),
                                         None, Affine(1.0, 0.0))


KINDS: dict[str, ActivationKind] = {k.name: k for k in (
    ActivationKind(
        "relu", (nn.ReLU,),
        (F.relu, torch.relu, torch.relu_, F.relu_, aten.relu.default, aten.relu_.default),
        ("relu", "relu_"),
        regions=lambda p, m: RegionSpec("relu", 0.0, 0.0, True, Affine(0.0, 0.0), None,
                                        Affine(1.0, 0.0)),
        nonnegative=True),
    ActivationKind(
        "relu6", (nn.ReLU6,), (F.relu6,),
        regions=lambda p, m: RegionSpec("relu6", 0.0, 6.0, False, Affine(0.0, 0.0),
                                        Affine(1.0, 0.0), Affine(0.0, 6.0)),
        nonnegative=True),
    ActivationKind(
        "hardtanh", (nn.Hardtanh,),
        (F.hardtanh, F.hardtanh_, aten.hardtanh.default, aten.hardtanh_.default),
        params=_hardtanh_params, regions=lambda p, m: _clamp_regions(p["lo"], p["hi"])),
    ActivationKind(
        "leaky_relu", (nn.LeakyReLU,),
        (F.leaky_relu, F.leaky_relu_, aten.leaky_relu.default, aten.leaky_relu_.default),
        params=lambda node, mod: {"slope": float(mod.negative_slope if mod is not None
                                                 else _arg(node, 1, "negative_slope", 0.01))},
        regions=lambda p, m: RegionSpec("leaky_relu", 0.0, 0.0, True, Affine(p["slope"], 0.0),
                                        None, Affine(1.0, 0.0))),
    ActivationKind(
        "gelu", (nn.GELU,), (F.gelu, aten.gelu.default, aten.gelu_.default),
        params=lambda node, mod: {"approximate": str(mod.approximate if mod is not None
                                                     else _arg(node, 1, "approximate", "none"))},
        regions=_smooth("gelu"), margins=GELU_MARGINS),
    ActivationKind(
        "silu", (nn.SiLU,), (F.silu, aten.silu.default, aten.silu_.default),
        regions=_smooth("silu"), margins=SILU_MARGINS),
    ActivationKind(
        "hardsigmoid", (nn.Hardsigmoid,),
        (F.hardsigmoid, aten.hardsigmoid.default, aten.hardsigmoid_.default),
        regions=lambda p, m: RegionSpec("hardsigmoid", -3.0, 3.0, False, Affine(0.0, 0.0),
                                        Affine(1 / 6, 0.5), Affine(0.0, 1.0)),
        nonnegative=True),
    ActivationKind(
        "hardswish", (nn.Hardswish,),
        (F.hardswish, aten.hardswish.default, aten.hardswish_.default),
        regions=lambda p, m: RegionSpec("hardswish", -3.0, 3.0, False, Affine(0.0, 0.0), None,
                                        Affine(1.0, 0.0))),
)}

# Lookup tables of the classifier (ops.classify), kept in step with KINDS by register().
MODULE_KINDS: dict[type, str] = {}       # module class -> kind
FUNCTION_KINDS: dict = {}                # function or aten overload -> kind
METHOD_KINDS: dict[str, str] = {}        # tensor method name -> kind


def _drop_spellings(name: str) -> None:
    for table in (MODULE_KINDS, FUNCTION_KINDS, METHOD_KINDS):
        for key in [k for k, n in table.items() if n == name]:
            del table[key]


def _index(kind: ActivationKind) -> None:
    _drop_spellings(kind.name)
    MODULE_KINDS.update(dict.fromkeys(kind.modules, kind.name))
    FUNCTION_KINDS.update(dict.fromkeys(kind.functions, kind.name))
    METHOD_KINDS.update(dict.fromkeys(kind.methods, kind.name))


for _kind in KINDS.values():
    _index(_kind)


def register(kind: ActivationKind) -> ActivationKind:
    """Add (or replace) an activation kind; the classifier sees it from the next call on."""
    KINDS[kind.name] = kind
    _index(kind)
    return kind


def unregister(name: str) -> None:
    """Remove an activation kind and its spellings."""
    del KINDS[name]
    _drop_spellings(name)


def module_kind(mod) -> str | None:
    """The activation kind of a module instance (subclasses included), or None."""
    for cls in type(mod).__mro__:
        if cls in MODULE_KINDS:
            return MODULE_KINDS[cls]
    return None


def kind_params(name: str, node, mod) -> tuple[str, dict]:
    """(kind, params) of an activation call: hardtanh(0, 6) is relu6."""
    params = KINDS[name].params(node, mod)
    if name == "hardtanh" and (params["lo"], params["hi"]) == (0.0, 6.0):
        return "relu6", {}
    return name, params


def region_spec_of(kind: str, params: dict, margins: dict | None = None) -> RegionSpec:
    """The RegionSpec of an activation kind; `margins` may set {"gelu": (lo, hi), ...}."""
    entry = KINDS[kind]
    chosen = (margins or {}).get(kind, entry.margins)
    return entry.regions(params, chosen)


def region_spec(op, *, gelu_margins: tuple[float, float] = GELU_MARGINS,
                silu_margins: tuple[float, float] = SILU_MARGINS) -> RegionSpec | None:
    """The RegionSpec of an activation Op (ops.classify), or None for any other op."""
    if not op.is_activation or op.kind not in KINDS:
        return None
    return region_spec_of(op.kind, op.params, {"gelu": gelu_margins, "silu": silu_margins})
