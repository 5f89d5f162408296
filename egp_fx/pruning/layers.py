"""Which layers EGP prunes: found on the captured graph by the one op classifier (egp_fx.ir.ops,
egp_fx.ir.layer), in either capture form, and mapped back to the model's own parameters.

Prunable layer (as in the EGP reference code): a conv/linear that writes the pre-activation of an
activation call of a kind in PRUNED_KINDS: the ReLU-like ones (relu, relu6, leaky_relu), whose
ON/OFF states are exact, and GELU and SiLU (the paper's Swin-T MLPs), which are piecewise exact
only beyond their margins (egp_fx.ir.activations), ON/OFF by the sign of z as in the reference.
From the activation's input the walk goes back through the ops that do not mix channels or
create them (Role NORM, LAYER_NORM, IDENTITY and the element-wise arithmetic: the residual add)
to the weighted layers (Role LAYER) that write the tensor. A BasicBlock's second ReLU sits after
`bn2(conv2(h)) + shortcut(x)`: the walk finds conv2 and, in a downsampling block, the shortcut's
1x1 conv. The shortcut is told apart by the graph alone: a producer is a shortcut when its input
is a strict ancestor of another producer's input (x feeds the shortcut conv directly, conv2 only
through conv1). Shortcut convs and the classifier (it feeds no activation) are not prunable.

Mapping back (`weight_name`): a module call (torch.fx) names its module path, so the weight is
`<path>.weight`; a function call (torch.export, aten.linear / aten.conv2d) reads its weight from
a graph attribute whose dotted path, less the capture's prefix, is the model's own parameter
name (held transposed for GPT-2's Conv1D: the mask then works on the model's layout, which
magnitudes do not care about). A weight the model ties to another name (an LM head sharing the
embedding) is left out. Every layer is one parameter: a module called twice is one layer
feeding two activation calls.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from egp_fx.capture import capture_info
from egp_fx.ir.layer import layer_of
from egp_fx.ir.ops import ARITHMETIC, Ops, Role, arg, main_input

PRUNED_KINDS = frozenset({"relu", "relu6", "leaky_relu", "gelu", "silu"})
_THROUGH = frozenset({Role.NORM, Role.LAYER_NORM, Role.IDENTITY, *ARITHMETIC})


@dataclass(frozen=True)
class PrunableLayer:
    module: str                    # module path in the model ('layer1.0.conv2')
    activations: tuple[str, ...]   # the activation calls (fx node names) it feeds
    weight: str = ""               # the parameter ('layer1.0.conv2.weight')


def weight_name(ops: Ops, node: fx.Node, params: Collection[str]) -> str | None:
    """The parameter (one of `params`) a conv/linear node reads as its weight, or None (see
    the module docstring)."""
    if node.op == "call_module":
        name = f"{node.target}.weight"
    else:
        gm = ops.gm
        view = layer_of(gm, node, ops.modules)
        w = view.weight_node if view is not None else arg(node, 1, "weight")
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            return None
        info = capture_info(gm)
        prefix = info.prefix if info is not None else ""
        name = str(w.target)
        name = name[len(prefix):] if prefix and name.startswith(prefix) else name
    return name if name in params else None


def layer_key(weight: str) -> str:
    """How records name a layer: its module path ('conv1' for 'conv1.weight'), or the parameter
    name when the weight is not called `weight`."""
    return weight.removesuffix(".weight")


def _producers(z: fx.Node, ops: Ops) -> list[fx.Node]:
    found, stack, seen = [], [z], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        role = ops(node).role
        if role is Role.LAYER:
            found.append(node)
        elif role in _THROUGH:
            stack.extend(node.all_input_nodes)
    return found


def _ancestors(node: fx.Node) -> set[fx.Node]:
    out, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def _drop_shortcuts(producers: list[fx.Node]) -> list[fx.Node]:
    if len(producers) < 2:
        return producers
    inputs = {p: main_input(p) for p in producers}
    ancestry = {p: _ancestors(inputs[p]) if inputs[p] is not None else set() for p in producers}
    return [p for p in producers
            if not any(q is not p and inputs[p] in ancestry[q] for q in producers)]


def tied_parameters(model: nn.Module) -> set[str]:
    """Names of parameters the model holds under more than one name (tied weights)."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def parameter_names(model: nn.Module) -> set[str]:
    """The names of the model's parameters that a mask may hold (tied ones left out)."""
    tied = tied_parameters(model)
    return {n for n, _ in model.named_parameters() if n not in tied}


def _names(model: nn.Module | Collection[str]) -> Collection[str]:
    return parameter_names(model) if isinstance(model, nn.Module) else model


def find_prunable(gm: fx.GraphModule, model: nn.Module | Collection[str],
                  kinds: frozenset[str] = PRUNED_KINDS) -> list[PrunableLayer]:
    """The prunable layers of `model` (or of the parameter names given), captured as `gm`, in
    graph order (one per parameter)."""
    ops, params = Ops(gm), _names(model)
    feeds: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        op = ops(node)
        if not op.is_activation or op.kind not in kinds:
            continue
        for prod in _drop_shortcuts(_producers(main_input(node), ops)):
            name = weight_name(ops, prod, params)
            if name is not None:
                feeds.setdefault(name, []).append(node.name)
    return [PrunableLayer(layer_key(name), tuple(acts), name) for name, acts in feeds.items()]


def find_weighted(gm: fx.GraphModule, model: nn.Module | Collection[str]) -> list[str]:
    """The weights (parameter names) of every conv/linear call of `gm`, in graph order: IMP's
    scope "all" and the overall sparsity."""
    ops, params = Ops(gm), _names(model)
    out: list[str] = []
    for node in gm.graph.nodes:
        if ops(node).role is Role.LAYER:
            name = weight_name(ops, node, params)
            if name is not None and name not in out:
                out.append(name)
    return out
