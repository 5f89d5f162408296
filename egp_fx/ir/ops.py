"""What an fx node is: the one place that decides it.

Graphs reach egp_fx in two forms (see the README, "Two graph forms"): module level, from
torch.fx.symbolic_trace (`call_module` of nn.Conv2d, `F.relu`, `x.relu()`), and aten level, from
torch.export (`aten.conv2d.default` with attribute weights, `aten.relu.default`). `classify`
maps either to an Op: its Role, the activation kind or layer kind, and its parameters. Passes,
calibration and measures ask this module instead of keeping op sets of their own; adding a
pass-through or shape op means adding it to the tables here, and adding an activation kind
means adding its entry to activations.py, which these tables read.

Roles:
    LAYER         conv / linear (the Layer view in layer.py gives weight, bias and axes)
    MATMUL        a product of two activations (attention), counted as a weighted layer
    NORM          BatchNorm in eval mode: a per-channel affine map
    LAYER_NORM    LayerNorm / RMS-style normalisation over the last dim
    ACTIVATION    kind one of activations.KINDS
    NONLINEAR     another nonlinearity: kind one of activations.OTHERS (sigmoid, tanh,
                  softmax, ...), or a call of a kind that cannot be analysed (RReLU in training
                  mode); params["reason"] says why
    IDENTITY      output equals input in eval mode (dropout, identity, alias, clone;
                  contiguous() with params["layout"]: its strides may matter, layout_needed)
    POOL          pools over positions, keeps channels (max/avg/adaptive pooling)
    FLATTEN       merges every dim after the batch dim
    RESHAPE       any other view/reshape/transpose: what it keeps is read from the shapes
    CAT           concatenation (dim in params)
    ADD, SUB, MUL, DIV   element-wise arithmetic (broadcasting)
    OTHER         anything else
"""
from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activations import (
    FUNCTION_KINDS,
    METHOD_KINDS,
    OTHER_FUNCTIONS,
    OTHER_METHODS,
    OTHERS,
    kind_params,
    module_kind,
    other_activation,
    unanalysed_reason,
)

aten = torch.ops.aten


class Role(enum.Enum):
    LAYER = "layer"
    MATMUL = "matmul"
    NORM = "norm"
    LAYER_NORM = "layer_norm"
    ACTIVATION = "activation"
    NONLINEAR = "nonlinear"
    IDENTITY = "identity"
    POOL = "pool"
    FLATTEN = "flatten"
    RESHAPE = "reshape"
    CAT = "cat"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    OTHER = "other"
    IO = "io"               # placeholder, output, get_attr


ARITHMETIC = frozenset({Role.ADD, Role.SUB, Role.MUL, Role.DIV})


@dataclass(frozen=True)
class Op:
    role: Role
    kind: str = ""                       # activation kind, or "conv"/"linear" for layers
    params: dict = field(default_factory=dict)

    @property
    def is_activation(self) -> bool:
        return self.role is Role.ACTIVATION


OTHER = Op(Role.OTHER)
IO = Op(Role.IO)

# ----------------------------------------------------------------------------- tables

_LAYER_MODULES = ((nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Linear, "linear"))
_LAYER_FUNCTIONS = {F.conv1d: "conv", F.conv2d: "conv", aten.conv1d.default: "conv",
                    aten.conv2d.default: "conv", F.linear: "linear", aten.linear.default: "linear",
                    aten.addmm.default: "linear", aten.mm.default: "linear",
                    aten.matmul.default: "linear", torch.matmul: "linear", torch.addmm: "linear",
                    torch.mm: "linear"}
_MATMUL_FUNCTIONS = {torch.bmm, torch.baddbmm, aten.bmm.default, aten.baddbmm.default}
_MATMUL_METHODS = {"matmul", "bmm", "mm"}

_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_FUNCTIONS = {F.batch_norm, aten.batch_norm.default}
_LAYER_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm)
_LAYER_NORM_FUNCTIONS = {F.layer_norm, aten.layer_norm.default}

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_IDENTITY_MODULE_NAMES = {"DropPath", "Identity"}     # timm's and others' eval-mode no-ops
_IDENTITY_FUNCTIONS = {F.dropout, aten.dropout.default, aten.alias.default, aten.clone.default,
                       aten.contiguous.default, aten.detach.default}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}

_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                   aten.max_pool2d.default, aten.avg_pool2d.default,
                   aten.adaptive_avg_pool2d.default}

_FLATTEN_FUNCTIONS = {torch.flatten, aten.flatten.using_ints}
_RESHAPE_FUNCTIONS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                      torch.reshape}
_RESHAPE_METHODS = {"view", "reshape"}
_CAT_FUNCTIONS = {torch.cat, aten.cat.default, torch.concat}
_FUNCTION_ROLES = ((_MATMUL_FUNCTIONS, Role.MATMUL), (_NORM_FUNCTIONS, Role.NORM),
                   (_LAYER_NORM_FUNCTIONS, Role.LAYER_NORM), (_IDENTITY_FUNCTIONS, Role.IDENTITY),
                   (_POOL_FUNCTIONS, Role.POOL), (_FLATTEN_FUNCTIONS, Role.FLATTEN),
                   (_RESHAPE_FUNCTIONS, Role.RESHAPE), (_CAT_FUNCTIONS, Role.CAT))

_ARITHMETIC = {
    operator.add: Role.ADD, operator.iadd: Role.ADD, torch.add: Role.ADD,
    aten.add.Tensor: Role.ADD, aten.add_.Tensor: Role.ADD,
    operator.sub: Role.SUB, operator.isub: Role.SUB, torch.sub: Role.SUB,
    aten.sub.Tensor: Role.SUB, aten.sub_.Tensor: Role.SUB, aten.rsub.Scalar: Role.OTHER,
    operator.mul: Role.MUL, operator.imul: Role.MUL, torch.mul: Role.MUL,
    aten.mul.Tensor: Role.MUL, aten.mul_.Tensor: Role.MUL,
    operator.truediv: Role.DIV, torch.div: Role.DIV, aten.div.Tensor: Role.DIV,
}
_ARITHMETIC_METHODS = {"add": Role.ADD, "add_": Role.ADD, "sub": Role.SUB, "mul": Role.MUL,
                       "mul_": Role.MUL, "div": Role.DIV}

# ----------------------------------------------------------------------------- arguments

def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (or keyword `name`) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _other(name: str) -> Op:
    return Op(Role.NONLINEAR, name, {"reason": OTHERS[name].reason})


def _module_op(mod: nn.Module) -> Op:
    kind = module_kind(mod)
    if kind is not None:
        return Op(Role.ACTIVATION, kind)
    for cls, kind in _LAYER_MODULES:
        if isinstance(mod, cls):
            return Op(Role.LAYER, kind)
    if isinstance(mod, _NORM_MODULES):
        return Op(Role.NORM)
    if isinstance(mod, _LAYER_NORM_MODULES):
        return Op(Role.LAYER_NORM)
    if isinstance(mod, _IDENTITY_MODULES) or type(mod).__name__ in _IDENTITY_MODULE_NAMES:
        return Op(Role.IDENTITY)
    if isinstance(mod, _POOL_MODULES):
        return Op(Role.POOL)
    if isinstance(mod, nn.Flatten):
        return Op(Role.FLATTEN) if mod.start_dim == 1 and mod.end_dim == -1 else Op(Role.RESHAPE)
    other = other_activation(mod)
    if other is not None:
        return _other(other)
    return OTHER


def _function_op(target) -> Op:
    if target in FUNCTION_KINDS:
        return Op(Role.ACTIVATION, FUNCTION_KINDS[target])
    if target in _LAYER_FUNCTIONS:
        return Op(Role.LAYER, _LAYER_FUNCTIONS[target])
    for table, role in _FUNCTION_ROLES:
        if target in table:
            return Op(role)
    if target in _ARITHMETIC:
        return Op(_ARITHMETIC[target])
    if target in OTHER_FUNCTIONS:
        return _other(OTHER_FUNCTIONS[target])
    return OTHER


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> Op:
    """The Op of `node`; `modules` is dict(gm.named_modules())."""
    if node.op in ("placeholder", "output", "get_attr"):
        return IO
    mod = modules.get(node.target) if node.op == "call_module" else None
    if node.op == "call_module":
        op = _module_op(mod) if mod is not None else OTHER
    elif node.op == "call_function":
        try:
            op = _function_op(node.target)
        except TypeError:  # an unhashable target
            op = OTHER
    elif node.op == "call_method":
        name = node.target
        if name in METHOD_KINDS:
            op = Op(Role.ACTIVATION, METHOD_KINDS[name])
        elif name in _ARITHMETIC_METHODS:
            op = Op(_ARITHMETIC_METHODS[name])
        elif name in _IDENTITY_METHODS:
            op = Op(Role.IDENTITY)
        elif name in _MATMUL_METHODS:
            op = Op(Role.MATMUL)
        elif name == "flatten":
            op = Op(Role.FLATTEN) if arg(node, 1, "start_dim", 0) == 1 else Op(Role.RESHAPE)
        elif name in _RESHAPE_METHODS:
            op = Op(Role.RESHAPE)
        elif name in OTHER_METHODS:
            op = _other(OTHER_METHODS[name])
        else:
            op = OTHER
    else:
        op = OTHER
    return _refine(op, node, mod)


def _refine(op: Op, node: fx.Node, mod: nn.Module | None) -> Op:
    """Settle what the target alone does not say (arguments, training flags)."""
    if op.role is Role.ACTIVATION:
        kind, params = kind_params(op.kind, node, mod)
        reason = unanalysed_reason(kind, params)
        if reason is not None:
            return Op(Role.NONLINEAR, kind, {**params, "reason": reason})
        return Op(Role.ACTIVATION, kind, params)
    if op.role is Role.IDENTITY and node.op == "call_function" and node.target in (
            F.dropout, aten.dropout.default):
        training = arg(node, 2, "training" if node.target is F.dropout else "train",
                       node.target is F.dropout)
        return op if training is False else OTHER
    if op.role is Role.IDENTITY and mod is not None and mod.training \
            and not isinstance(mod, nn.Identity):
        return OTHER
    if op.role is Role.NORM:
        if mod is not None:
            usable = not mod.training and mod.track_running_stats and mod.running_mean is not None
        else:
            usable = arg(node, 5, "training", False) is False
        return op if usable else OTHER
    if op.role is Role.FLATTEN and node.op == "call_function":
        start = arg(node, 1, "start_dim", 0)
        end = arg(node, 2, "end_dim", -1)
        return op if (start, end) == (1, -1) else Op(Role.RESHAPE)
    if op.role is Role.CAT:
        return Op(Role.CAT, params={"dim": arg(node, 1, "dim", 0)})
    if op.role is Role.IDENTITY and _sets_layout(node):
        return Op(Role.IDENTITY, params={"layout": True})
    return op


# ----------------------------------------------------------------------------- memory layout

_VIEWS = {aten.view.default, aten._unsafe_view.default, torch.Tensor.view}
_STRIDE_AGNOSTIC = ARITHMETIC | {Role.LAYER, Role.MATMUL, Role.NORM, Role.LAYER_NORM,
                                 Role.ACTIVATION, Role.NONLINEAR, Role.POOL, Role.FLATTEN,
                                 Role.CAT, Role.RESHAPE}


def _sets_layout(node: fx.Node) -> bool:
    """contiguous(), or a clone into a memory format: an op whose output strides differ from
    its input's (a `view` after `permute` needs them)."""
    if node.op == "call_method" and node.target == "contiguous":
        return True
    if node.target is aten.contiguous.default:
        return True
    fmt = node.kwargs.get("memory_format")
    return fmt is not None and fmt is not torch.preserve_format


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "view"
    try:
        return node.op == "call_function" and node.target in _VIEWS
    except TypeError:  # an unhashable target
        return False


def _reads_metadata(node: fx.Node) -> bool:
    """x.shape, x.size(), x.dim(): they read no strides."""
    return (node.op == "call_function" and node.target is getattr) or \
        (node.op == "call_method" and node.target in ("size", "dim"))


def layout_needed(node: fx.Node, modules: dict) -> bool:
    """Whether the memory layout `node` produces may matter to what reads it: a `view`, the
    graph's output, or an op egp_fx does not know reads it (through identity ops). A
    contiguous() that only such stride-agnostic ops read (layers, activations, arithmetic,
    reshape) can go; one before a `view` stays."""
    for user in node.users:
        if _is_view(user) or user.op == "output":
            return True
        if _reads_metadata(user):
            continue
        role = classify(user, modules).role
        if role is Role.IDENTITY:
            if layout_needed(user, modules):
                return True
        elif role not in _STRIDE_AGNOSTIC:
            return True
    return False


def main_input(node: fx.Node) -> fx.Node | None:
    """The tensor an op transforms: its first node argument (the `input` keyword otherwise)."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    return first if isinstance(first, fx.Node) else None


def activation_kind(node: fx.Node, modules: dict) -> str | None:
    """The activation kind of a node, or None if it is not an activation call."""
    op = classify(node, modules)
    return op.kind if op.is_activation else None


class Ops:
    """classify() for the nodes of one GraphModule, with its module table built once."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def __call__(self, node: fx.Node) -> Op:
        return classify(node, self.modules)
