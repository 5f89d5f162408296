"""The activation kinds egp_fx understands: one entry each, read by the classifier (ops.py) and
by calibration (regions). KINDS is the registry; register() adds an entry.

An entry says how the activation is spelled (module classes, functions — torch, F and aten
overloads — and tensor methods), which arguments it reads (a slope, bounds), and its regions:
the intervals of the pre-activation z on which it is exactly affine (regions.RegionSpec), or
affine to float32 rounding. Adding an activation kind is adding an entry here.

| kind        | LOW                        | MID         | HIGH                | note         |
| relu        | z<=0 -> 0                  | (empty)     | z>0 -> z            |              |
| relu6       | z<=0 -> 0                  | 0<z<6 -> z  | z>=6 -> 6           |              |
| hardtanh    | z<=a -> a                  | a<z<b -> z  | z>=b -> b           |              |
| leaky_relu  | z<=0 -> s*z                | (empty)     | z>0 -> z            |              |
| prelu       | z<=0 -> a_c*z              | (empty)     | z>0 -> z            | a_c per channel, or one a |
| rrelu       | z<=0 -> (l+u)/2*z          | (empty)     | z>0 -> z            | eval mode only |
| threshold   | z<=t -> v                  | (empty)     | z>t -> z            |              |
| hardshrink  | z<-l -> z                  | 0           | z>l -> z            | dead inside [-l, l] |
| softshrink  | z<-l -> z+l                | 0           | z>l -> z-l          | dead inside [-l, l] |
| hardsigmoid | z<=-3 -> 0                 | z/6 + 1/2   | z>=3 -> 1           |              |
| hardswish   | z<=-3 -> 0                 | quadratic   | z>=3 -> z           |              |
| gelu        | z<=-5.55 -> 0              | nonlinear   | z>=5.37 -> z        | to rounding  |
| silu        | z<=-20 -> 0                | nonlinear   | z>=17 -> z          | to rounding  |
| elu(1)      | z<=-16.230068 -> -1        | nonlinear   | z>0 -> z            | LOW to rounding |
| celu(1)     | z<=-16.230068 -> -1        | nonlinear   | z>0 -> z            | LOW to rounding |
| selu        | z<=-17.328680 -> -1.7580993| nonlinear   | z>0 -> 1.0507010*z  | LOW to rounding |
| softplus(1, 20) | z<=-16.635532 -> 0     | nonlinear   | z>=14.698933 -> z   | to rounding  |
| mish        | z<=-19.611658 -> 0         | nonlinear   | z>=9.010792 -> z    | to rounding  |

"To rounding" (egp_fx.ir.margins, where the numbers come from): beyond the margin the float32
result of torch's CPU kernel is the map's value within 2^-24 max(1, |c|) on the saturated side
(ELU's -alpha, SELU's -scale*alpha, 0) and equal to z bit for bit on the identity side, for every
float32 z and both of the kernel's loops. Margins of other parameters (ELU/CELU alpha, Softplus
beta and threshold) are computed the same way, once per process. GELU's margins hold for both
approximations (exact: -5.5426 / 5.3677; tanh: -5.1579 / 5.0036), SiLU's beyond -19.6117 /
16.6355. Callers may pass looser GELU/SiLU margins, which is then an approximation.

torch.export decomposes Hardshrink and Softshrink into abs/where arithmetic: they are kinds in
torch.fx graphs. RReLU in training mode draws a random slope per element: that call is named but
not analysed (`unanalysed`), as is a PReLU whose slope is computed in the graph.

Activations with no region that is affine or constant to rounding are not kinds; OTHERS names
them with the reason, so that a call of one that runs is named in the coverage record.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .attrs import attr, set_attr, share_index
from .margins import elu_tail, float32, softplus_at_zero, softplus_margins
from .regions import Affine, RegionSpec

aten = torch.ops.aten
GELU_MARGINS = (-5.55, 5.37)
SILU_MARGINS = (-20.0, 17.0)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

# margins of the default parameters (egp_fx.ir.margins computes them; a test checks these)
ELU_TAILS = {(1.0, 1.0, 1.0): (-16.23006820678711, -1.0),
             (SELU_ALPHA, SELU_SCALE, 1.0): (-17.32868003845215, -1.7580993175506592)}
SOFTPLUS_MARGINS = {(1.0, 20.0): (-16.63553237915039, 14.698932647705078)}
MISH_MARGINS = (-19.611658096313477, 9.010791778564453)


def _arg(node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _never(params: dict) -> str | None:
    return None


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
    unanalysed: Callable = _never                             # params -> why this call is not


@dataclass(frozen=True)
class OtherActivation:
    """An activation that is not a kind: how it is spelled and why it is not analysed."""

    name: str
    modules: tuple[type, ...]
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    reason: str = ""


# ----------------------------------------------------------------------------- parameters

def _hardtanh_params(node, mod) -> dict:
    lo = float(mod.min_val) if mod is not None else float(_arg(node, 1, "min_val", -1.0))
    hi = float(mod.max_val) if mod is not None else float(_arg(node, 2, "max_val", 1.0))
    return {"lo": lo, "hi": hi}


def _clamp_regions(lo: float, hi: float) -> RegionSpec:
    return RegionSpec("hardtanh", lo, hi, False, Affine(0.0, lo), Affine(1.0, 0.0), Affine(0.0, hi))


def _smooth(name: str) -> Callable:
    return lambda p, margins: RegionSpec(name, margins[0], margins[1], False, Affine(0.0, 0.0),
                                         None, Affine(1.0, 0.0))


def _graph_tensor(node: fx.Node, value) -> tuple[torch.Tensor | None, str | None]:
    """(tensor, its attribute path) of an argument that a get_attr node reads, else (None, None)."""
    gm = node.graph.owning_module
    if isinstance(value, fx.Node) and value.op == "get_attr" and gm is not None:
        t = attr(gm, value.target)
        return (t, str(value.target)) if isinstance(t, torch.Tensor) else (None, None)
    if isinstance(value, torch.Tensor):
        return value, None
    return None, None


def _prelu_params(node, mod) -> dict:
    """slopes: one float, or a tuple with one per channel (dim 1 of the input); tensor: the
    attribute path of a per-channel weight (None when one slope serves every channel)."""
    if mod is not None:
        weight, path = mod.weight, f"{node.target}.weight"
    else:
        weight, path = _graph_tensor(node, _arg(node, 1, "weight", None))
    if weight is None:
        return {"slopes": None, "tensor": None}
    flat = weight.detach().reshape(-1)
    if flat.numel() == 1:
        return {"slopes": float(flat[0]), "tensor": None}
    return {"slopes": tuple(flat.tolist()), "tensor": path}


def _prelu_regions(p: dict, margins) -> RegionSpec:
    slopes = p["slopes"]
    steepest = max(map(abs, slopes)) if isinstance(slopes, tuple) else abs(slopes)
    return RegionSpec("prelu", 0.0, 0.0, True, Affine(slopes, 0.0), None, Affine(1.0, 0.0),
                      lipschitz=max(1.0, steepest))


_WITH_NOISE = (aten.rrelu_with_noise.default, aten.rrelu_with_noise_.default)


def _rrelu_params(node, mod) -> dict:
    if mod is not None:
        lower, upper, training = mod.lower, mod.upper, mod.training
    else:
        at = 2 if node.target in _WITH_NOISE else 1     # rrelu_with_noise(self, noise, ...)
        lower = _arg(node, at, "lower", 1.0 / 8)
        upper = _arg(node, at + 1, "upper", 1.0 / 3)
        training = _arg(node, at + 2, "training", False)
    return {"slope": (float(lower) + float(upper)) / 2, "training": bool(training)}


def _leaky(name: str, slope: float) -> RegionSpec:
    return RegionSpec(name, 0.0, 0.0, True, Affine(slope, 0.0), None, Affine(1.0, 0.0),
                      lipschitz=max(1.0, abs(slope)))


def _shrink_params(node, mod) -> dict:
    lambd = mod.lambd if mod is not None else _arg(node, 1, "lambd", 0.5)
    return {"lambd": float32(float(lambd))}


def _below(x: float) -> float:
    """The largest float32 below x: `z <= _below(x)` is `z < x` for float32 z."""
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32),
                                 torch.tensor(-float("inf"), dtype=torch.float32)))


def _shrink_regions(name: str, shift: bool) -> Callable:
    def regions(p: dict, margins) -> RegionSpec:
        lam = p["lambd"]
        low, high = (Affine(1.0, lam), Affine(1.0, -lam)) if shift else \
            (Affine(1.0, 0.0), Affine(1.0, 0.0))
        return RegionSpec(name, _below(-lam), lam, True, low, Affine(0.0, 0.0), high,
                          lipschitz=1.0, jump=0.0 if shift else lam)
    return regions


def _threshold_params(node, mod) -> dict:
    if mod is not None:
        t, v = mod.threshold, mod.value
    else:
        t, v = _arg(node, 1, "threshold", 0.0), _arg(node, 2, "value", 0.0)
    return {"threshold": float32(float(t)), "value": float32(float(v))}


def _threshold_regions(p: dict, margins) -> RegionSpec:
    t, v = p["threshold"], p["value"]
    return RegionSpec("threshold", t, t, True, Affine(0.0, v), None, Affine(1.0, 0.0),
                      lipschitz=1.0, jump=abs(t - v))


def _elu_params(kind: str) -> Callable:
    def params(node, mod) -> dict:
        if kind == "selu":
            return {"alpha": SELU_ALPHA, "scale": SELU_SCALE, "input_scale": 1.0}
        alpha = float(mod.alpha if mod is not None else _arg(node, 1, "alpha", 1.0))
        if kind == "celu":
            return {"alpha": alpha, "scale": 1.0, "input_scale": 1.0 / alpha if alpha else 1.0}
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return {"alpha": alpha, "scale": float(_arg(node, 2, "scale", 1.0)),
                    "input_scale": float(_arg(node, 3, "input_scale", 1.0))}
        return {"alpha": alpha, "scale": 1.0, "input_scale": 1.0}
    return params


def _elu_regions(kind: str) -> Callable:
    def regions(p: dict, margins) -> RegionSpec:
        key = (p["alpha"], p["scale"], p["input_scale"])
        lo, const = ELU_TAILS.get(key) or elu_tail(*key)
        steepest = max(abs(p["scale"]), abs(p["scale"] * p["alpha"] * p["input_scale"]))
        return RegionSpec(kind, lo, 0.0, True, Affine(0.0, const), None, Affine(p["scale"], 0.0),
                          lipschitz=steepest)
    return regions


def _softplus_params(node, mod) -> dict:
    if mod is not None:
        return {"beta": float(mod.beta), "threshold": float(mod.threshold)}
    return {"beta": float(_arg(node, 1, "beta", 1.0)),
            "threshold": float(_arg(node, 2, "threshold", 20.0))}


def _softplus_regions(p: dict, margins) -> RegionSpec:
    key = (p["beta"], p["threshold"])
    lo, hi = SOFTPLUS_MARGINS.get(key) or softplus_margins(*key)
    return RegionSpec("softplus", lo, hi, False, Affine(0.0, 0.0), None, Affine(1.0, 0.0),
                      lipschitz=1.0, zero_value=softplus_at_zero(*key))


def _mish_regions(p: dict, margins) -> RegionSpec:
    lo, hi = MISH_MARGINS
    return RegionSpec("mish", lo, hi, False, Affine(0.0, 0.0), None, Affine(1.0, 0.0))


# ----------------------------------------------------------------------------- the registry

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
        "prelu", (nn.PReLU,), (F.prelu, aten.prelu.default, aten._prelu_kernel.default),
        ("prelu",), params=_prelu_params, regions=_prelu_regions,
        unanalysed=lambda p: None if p["slopes"] is not None else
        "its slope is computed in the graph, not read from a parameter"),
    ActivationKind(
        "rrelu", (nn.RReLU,),
        (F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_, aten.rrelu.default, aten.rrelu_.default,
         *_WITH_NOISE),
        params=_rrelu_params, regions=lambda p, m: _leaky("rrelu", p["slope"]),
        unanalysed=lambda p: "in training mode RReLU draws a random slope for every element"
        if p["training"] else None),
    ActivationKind(
        "threshold", (nn.Threshold,),
        (F.threshold, F.threshold_, torch.threshold, torch.threshold_, aten.threshold.default,
         aten.threshold_.default),
        params=_threshold_params, regions=_threshold_regions),
    ActivationKind(
        "hardshrink", (nn.Hardshrink,), (F.hardshrink, aten.hardshrink.default), ("hardshrink",),
        params=_shrink_params, regions=_shrink_regions("hardshrink", shift=False),
        unanalysed=lambda p: "a negative lambda" if p["lambd"] < 0 else None),
    ActivationKind(
        "softshrink", (nn.Softshrink,), (F.softshrink, aten.softshrink.default),
        params=_shrink_params, regions=_shrink_regions("softshrink", shift=True),
        unanalysed=lambda p: "a negative lambda" if p["lambd"] < 0 else None),
    ActivationKind(
        "gelu", (nn.GELU,), (F.gelu, aten.gelu.default, aten.gelu_.default),
        params=lambda node, mod: {"approximate": str(mod.approximate if mod is not None
                                                     else _arg(node, 1, "approximate", "none"))},
        regions=_smooth("gelu"), margins=GELU_MARGINS),
    ActivationKind(
        "silu", (nn.SiLU,), (F.silu, aten.silu.default, aten.silu_.default),
        regions=_smooth("silu"), margins=SILU_MARGINS),
    ActivationKind(
        "elu", (nn.ELU,), (F.elu, F.elu_, aten.elu.default, aten.elu_.default),
        params=_elu_params("elu"), regions=_elu_regions("elu")),
    ActivationKind(
        "celu", (nn.CELU,),
        (F.celu, F.celu_, torch.celu, torch.celu_, aten.celu.default, aten.celu_.default),
        params=_elu_params("celu"), regions=_elu_regions("celu"),
        unanalysed=lambda p: "alpha is 0" if p["alpha"] == 0 else None),
    ActivationKind(
        "selu", (nn.SELU,),
        (F.selu, F.selu_, torch.selu, torch.selu_, aten.selu.default, aten.selu_.default),
        params=_elu_params("selu"), regions=_elu_regions("selu")),
    ActivationKind(
        "softplus", (nn.Softplus,), (F.softplus, aten.softplus.default),
        params=_softplus_params, regions=_softplus_regions, nonnegative=True,
        unanalysed=lambda p: "beta is not positive" if p["beta"] <= 0 else None),
    ActivationKind(
        "mish", (nn.Mish,), (F.mish, aten.mish.default, aten.mish_.default),
        regions=_mish_regions),
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

_SMOOTH = "smooth: affine nowhere, and constant only to rounding far in its tails"
_ROWWISE = "not element-wise: each output depends on the whole row"
OTHERS: dict[str, OtherActivation] = {o.name: o for o in (
    OtherActivation("sigmoid", (nn.Sigmoid,),
                    (torch.sigmoid, F.sigmoid, aten.sigmoid.default, aten.sigmoid_.default),
                    ("sigmoid", "sigmoid_"), _SMOOTH),
    OtherActivation("tanh", (nn.Tanh,), (torch.tanh, F.tanh, aten.tanh.default, aten.tanh_.default),
                    ("tanh", "tanh_"), _SMOOTH),
    OtherActivation("logsigmoid", (nn.LogSigmoid,),
                    (F.logsigmoid, aten.log_sigmoid.default, aten.log_sigmoid_forward.default),
                    (), _SMOOTH),
    OtherActivation("softsign", (nn.Softsign,), (F.softsign,), (), "smooth: affine nowhere"),
    OtherActivation("tanhshrink", (nn.Tanhshrink,), (F.tanhshrink,), (), _SMOOTH),
    OtherActivation("softmax", (nn.Softmax, nn.Softmax2d, nn.Softmin),
                    (F.softmax, torch.softmax, F.softmin, aten._softmax.default, aten.softmax.int),
                    ("softmax",), _ROWWISE),
    OtherActivation("log_softmax", (nn.LogSoftmax,),
                    (F.log_softmax, torch.log_softmax, aten._log_softmax.default,
                     aten.log_softmax.int), ("log_softmax",), _ROWWISE),
    OtherActivation("glu", (nn.GLU,), (F.glu, aten.glu.default), (),
                    "a gate: one half of its input times the sigmoid of the other"),
)}

# Lookup tables of the classifier (ops.classify), kept in step with KINDS by register().
MODULE_KINDS: dict[type, str] = {}       # module class -> kind
FUNCTION_KINDS: dict = {}                # function or aten overload -> kind
METHOD_KINDS: dict[str, str] = {}        # tensor method name -> kind
OTHER_MODULES = {cls: o.name for o in OTHERS.values() for cls in o.modules}
OTHER_FUNCTIONS = {fn: o.name for o in OTHERS.values() for fn in o.functions}
OTHER_METHODS = {m: o.name for o in OTHERS.values() for m in o.methods}


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


def other_activation(mod) -> str | None:
    """The OTHERS entry of a module instance (subclasses included), or None."""
    for cls in type(mod).__mro__:
        if cls in OTHER_MODULES:
            return OTHER_MODULES[cls]
    return None


def kind_params(name: str, node, mod) -> tuple[str, dict]:
    """(kind, params) of an activation call: hardtanh(0, 6) is relu6."""
    params = KINDS[name].params(node, mod)
    if name == "hardtanh" and (params["lo"], params["hi"]) == (0.0, 6.0):
        return "relu6", {}
    return name, params


def unanalysed_reason(name: str, params: dict) -> str | None:
    """Why this call of kind `name` is not analysed (RReLU in training mode, ...), or None."""
    return KINDS[name].unanalysed(params)


def channel_tensor(gm: fx.GraphModule, node: fx.Node, op) -> tuple[str | None, str | None]:
    """(path, why not): the attribute path of the per-channel tensor an activation call reads
    (PReLU's weight with one slope per channel), which a narrowing of its channels must narrow
    too; (None, None) when it reads none, (None, reason) when it cannot be narrowed for this
    call alone."""
    if not op.is_activation or not isinstance(op.params.get("slopes"), tuple):
        return None, None
    path = op.params.get("tensor")
    if path is None:
        return None, "its per-channel slopes are not read from one attribute"
    index = share_index(node.graph)
    if node.op == "call_module":
        shared = index.calls[str(node.target)] > 1 or str(node.target) in index.read_modules
    else:
        reader = _arg(node, 1, "weight", None)
        shared = index.reads[path] > 1 or len(reader.users) > 1
    return (None, f"its per-channel slopes {path} are shared") if shared else (path, None)


def narrow_channel_tensor(gm: fx.GraphModule, path: str, keep: list[int]) -> None:
    """Keep entries `keep` of the per-channel tensor at `path` (channel_tensor)."""
    old = attr(gm, path)
    set_attr(gm, path, old.detach()[torch.tensor(keep, device=old.device)])
    owner = gm.get_submodule(path.rpartition(".")[0])
    if isinstance(owner, nn.PReLU):
        owner.num_parameters = len(keep)


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
