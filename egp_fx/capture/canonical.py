"""Canonical form of a torch.export graph: one spelling per operation, for ops.py and layer.py.

Each rewrite computes exactly what it replaces:
- `getitem(_native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps), 0)` becomes
  `batch_norm(x, w, b, mean, var, False, momentum, eps, False)` (one node, as the pre-dispatch
  graph spells it);
- a product with an attribute weight W [in, out] (`addmm(b, x, W)`, `mm(x, W)`,
  `matmul(x, W)`: Hugging Face's Conv1D in GPT-2) becomes `linear(x, W', b)` with W' the
  transposed *view* of W (no copy): linear computes x @ W'.T + b = x @ W + b, the same
  product with the same operands;
- `_unsafe_view`, which functionalisation writes where a reshape had to copy, and `view`, which
  it writes where the capture's strides allowed one, become `reshape` (in a functional graph they
  compute the same; fake-tensor shape propagation refuses _unsafe_view of an expanded tensor, as
  Hugging Face's grouped-query attention makes; and a `view` of an attention output is only
  valid for the strides one device's attention kernel returned, not another's);
- runtime checks of dtype and device (`_assert_tensor_metadata`) and the input-guard module
  go: they compute nothing;
- tensors the model makes while it runs (attention masks, positions: `ones`, `arange`, `full`,
  a `_to_copy` to a device) are made on the device of its first tensor input, as the model's
  code asked for it (`input_ids.device`): torch.export writes the capture's device into such
  calls as a constant, which would leave them on the CPU after `module.to("cuda")`.
Node metadata is reduced to the module path and the source line (`nn_module_stack`,
`stack_trace`); the symbolic shapes of the capture are re-derived on demand (shapes.py).

Before either capture, activation modules that spell a known activation out in elementary
operations are replaced by the torch module computing the same formula, so that the graph holds
one activation call the classifier knows (`canonical_modules`): Hugging Face's
NewGELUActivation, FastGELUActivation and GELUTanh compute 0.5 x (1 + tanh(sqrt(2/pi)
(x + 0.044715 x^3))), which is nn.GELU(approximate="tanh"). Fused normalisation + activation
modules (timm's BatchNormAct2d, GroupNormAct, ...) are split into a torch normalisation module
and their activation module (norm_act.py). The capture is checked against the unchanged model
(capture/__init__.py), so a swap that changed the function would be caught.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from egp_fx.ir.attrs import attr, set_attr

from .norm_act import split_of

aten = torch.ops.aten
_KEEP_META = ("nn_module_stack", "stack_trace")
TRANSPOSED_META_KEY = "egp_transposed"   # attributes held transposed ([in, out] -> [out, in])


def _batch_norm(graph: fx.Graph) -> int:
    done = 0
    for node in list(graph.nodes):
        if node.target is not aten._native_batch_norm_legit_no_training.default:
            continue
        outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if len(outs) != len(node.users) or any(outs[i].users for i in outs if i != 0) or 0 not in outs:
            continue
        x, w, b, mean, var, momentum, eps = node.args
        with graph.inserting_before(node):
            new = graph.call_function(aten.batch_norm.default,
                                      (x, w, b, mean, var, False, momentum, eps, False))
        new.meta.update({k: node.meta[k] for k in _KEEP_META if k in node.meta})
        outs[0].replace_all_uses_with(new)
        for user in outs.values():
            graph.erase_node(user)
        graph.erase_node(node)
        done += 1
    return done


def _transposed_weight(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1 \
        and isinstance(t := attr(gm, node.target), torch.Tensor) and t.dim() == 2 \
        and t.is_floating_point()


def _products(gm: fx.GraphModule) -> int:
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.addmm.default and not node.kwargs and len(node.args) == 3:
            b, x, w = node.args
            if not (isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1):
                continue
        elif node.target in (aten.mm.default, aten.matmul.default) and len(node.args) == 2:
            (x, w), b = node.args, None
        else:
            continue
        if not _transposed_weight(gm, w):
            continue
        if b is not None and attr(gm, b.target).dim() != 1:
            continue
        set_attr(gm, w.target, attr(gm, w.target).t())
        gm.meta.setdefault(TRANSPOSED_META_KEY, []).append(str(w.target))
        node.target = aten.linear.default
        node.args = (x, w, b) if b is not None else (x, w)
        done += 1
    return done


def _reshapes(graph: fx.Graph) -> int:
    done = 0
    for node in graph.nodes:
        if node.target in (aten._unsafe_view.default, aten.view.default):
            node.target = aten.reshape.default
            done += 1
    return done


def _drop_checks(gm: fx.GraphModule) -> int:
    done = 0
    for node in list(gm.graph.nodes):
        if node.target is aten._assert_tensor_metadata.default or \
                (node.op == "call_module" and node.target == "_guards_fn"):
            gm.graph.erase_node(node)
            done += 1
    if hasattr(gm, "_guards_fn") and not any(n.target == "_guards_fn" for n in gm.graph.nodes):
        delattr(gm, "_guards_fn")
    return done


def _devices_follow_inputs(gm: fx.GraphModule) -> int:
    fixed = [n for n in gm.graph.nodes
             if n.op == "call_function" and isinstance(n.kwargs.get("device"), torch.device)]
    source = next((n for n in gm.graph.nodes if n.op == "placeholder"
                   and isinstance(n.meta.get("val"), torch.Tensor)), None)
    if not fixed or source is None:
        return 0
    with gm.graph.inserting_after(source):
        device = gm.graph.call_function(getattr, (source, "device"))
    for node in fixed:
        node.update_kwarg("device", device)
    return len(fixed)


def canonicalise(gm: fx.GraphModule) -> list[str]:
    """Rewrite `gm` in place into the canonical form; returns notes on what changed."""
    notes = []
    if n := _batch_norm(gm.graph):
        notes.append(f"{n} BatchNorm call(s) as batch_norm")
    if n := _products(gm):
        notes.append(f"{n} product(s) with an attribute weight as linear")
    _reshapes(gm.graph)
    _drop_checks(gm)
    _devices_follow_inputs(gm)
    for node in gm.graph.nodes:
        kept = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
        node.meta.clear()
        node.meta.update(kept)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return notes


EQUIVALENT_MODULES = {           # class name -> the torch module computing the same function
    "NewGELUActivation": lambda m: nn.GELU(approximate="tanh"),
    "FastGELUActivation": lambda m: nn.GELU(approximate="tanh"),
    "GELUTanh": lambda m: nn.GELU(approximate="tanh"),
    "PytorchGELUTanh": lambda m: nn.GELU(approximate="tanh"),
}


def canonical_modules(root: nn.Module) -> list[str]:
    """Replace, in place, modules of EQUIVALENT_MODULES by their torch equivalent, and fused
    norm+activation modules by their parts (norm_act.py); notes on what was replaced."""
    swapped: dict[str, int] = {}
    for path, mod in list(root.named_modules()):
        if not path:
            continue
        make = EQUIVALENT_MODULES.get(type(mod).__name__)
        new = make(mod) if make is not None else split_of(mod)
        if new is None:
            continue
        owner_path, _, name = path.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        setattr(owner, name, new)
        swapped[type(mod).__name__] = swapped.get(type(mod).__name__, 0) + 1
    return [f"{n} {cls} as {_name_of(cls)}" for cls, n in swapped.items()]


def _name_of(cls: str) -> str:
    if cls in EQUIVALENT_MODULES:
        return repr(EQUIVALENT_MODULES[cls](None))
    return "norm + activation modules"
