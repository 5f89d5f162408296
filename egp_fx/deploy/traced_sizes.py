"""Make a torch.export capture's symbolic sizes visible to the TorchScript exporter.

A graph captured with torch.export reads its dynamic sizes with `aten.sym_size.int(x, d)` and
passes them to aten overloads: `aten.reshape.default(x, [s0, 256])`. The TorchScript exporter
traces by running the graph, and along that path both calls hand it plain Python ints: the
ONNX file gets the example's batch size as a constant (Reshape to {2, 256}), and fails at any
other batch. The exporter does see sizes read by `Tensor.size(d)` and passed to the Python-level
torch functions (it records them as Shape/Gather nodes). On a copy of the graph:

1. a reshape/view whose target has exactly one symbolic entry and no -1 gets -1 there (the
   entry is then implied by the element count: numel / product of the known entries, exact for
   any valid reshape), and calls torch.reshape: a constant-shape Reshape, as the model's own
   `x.reshape(-1, 256)` exports;
2. `aten.sym_size.int(x, d)` becomes `x.size(d)`;
3. any other aten overload that takes a symbolic size calls its Python-level counterpart
   (reshape/view: torch.reshape; slice: indexing; expand and other methods: the Tensor method;
   else the torch function of the same name, which takes the same arguments);
4. runtime asserts on symbolic sizes (`_assert_scalar`, `sym_constrain_range*`) are dropped:
   the ONNX file has no place for them, and the parity check runs the file at other sizes.

Arithmetic on sizes (operator.mul, floordiv) is left alone: on traced sizes it is traced too.
The result is checked like any export (parity at the example and at twice its batch).
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

aten = torch.ops.aten
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_SIZE_READS = {aten.sym_size.int}
_ASSERTS = {getattr(aten, n).default for n in ("_assert_scalar", "sym_constrain_range",
                                                 "sym_constrain_range_for_size")
            if hasattr(aten, n)}
_METHODS = {"expand", "new_zeros", "new_ones", "new_empty", "new_full", "repeat", "narrow"}


def _symbolic(node: fx.Node, derived: set[fx.Node]) -> bool:
    return node in derived or isinstance(node.meta.get("val"), torch.SymInt)


def _size_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is a size: sym_size reads and arithmetic on them."""
    derived: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SIZE_READS or isinstance(node.meta.get("val"), torch.SymInt) or (
                getattr(node.target, "__module__", None) in ("_operator", "operator", "math")
                and any(isinstance(a, fx.Node) and a in derived for a in node.args)):
            derived.add(node)
    return derived


def _takes(node: fx.Node, derived: set[fx.Node]) -> bool:
    found = []
    fx.node.map_arg((node.args, node.kwargs),
                    lambda a: found.append(a) if _symbolic(a, derived) else None)
    return bool(found)


def _reshape(node: fx.Node, derived: set[fx.Node]) -> None:
    x, shape = node.args[0], list(node.args[1])
    symbolic = [i for i, s in enumerate(shape) if isinstance(s, fx.Node) and _symbolic(s, derived)]
    if len(symbolic) == 1 and -1 not in shape and \
            all(isinstance(s, int) or i in symbolic for i, s in enumerate(shape)):
        shape[symbolic[0]] = -1
    node.target, node.args, node.kwargs = torch.reshape, (x, shape), {}


def _python_level(node: fx.Node) -> bool:
    """Point `node` at the Python-level counterpart of its aten overload; False if none."""
    name = node.target.overloadpacket.__name__
    if node.target is aten.slice.Tensor:
        x, dim, start, end, step = (list(node.args) + [0, 0, None, None, 1][len(node.args):])
        if not isinstance(dim, int) or dim < 0:
            return False
        index = (slice(None),) * dim + (slice(start, end, step),)
        node.target, node.args, node.kwargs = operator.getitem, (x, index), {}
        return True
    if name in _METHODS or (not hasattr(torch, name) and hasattr(torch.Tensor, name)):
        node.op, node.target = "call_method", name
        return True
    if hasattr(torch, name):
        node.target = getattr(torch, name)
        return True
    return False


def traced_sizes(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place (see the module docstring); the number of nodes changed."""
    graph = gm.graph
    derived = _size_nodes(graph)
    if not derived:
        return 0
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS:
            graph.erase_node(node)
            changed += 1
        elif node.target in _RESHAPES and _takes(node, derived):
            _reshape(node, derived)
            changed += 1
        elif isinstance(node.target, torch._ops.OpOverload) and node.target not in _SIZE_READS \
                and _takes(node, derived):
            if _python_level(node):
                changed += 1
            else:
                log.debug("no Python-level counterpart for %s", node.format_node())
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SIZE_READS:
            node.op, node.target = "call_method", "size"
            changed += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    log.debug("made %d symbolic-size nodes traceable for the TorchScript exporter", changed)
    return changed
