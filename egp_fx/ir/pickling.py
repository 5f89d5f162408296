"""Compressed GraphModules that survive torch.save / torch.load(weights_only=False).

torch.load rebuilds a GraphModule from its generated Python code: GraphModule.__reduce__ keeps
the code and the module's attributes, and loading traces the code again with the tracer class
recorded in the graph (functions the capture kept whole stay whole: the generated code declares
them with torch.fx.wrap). Two things break that for what compress returns:
- graphs captured with torch.export record torch's _ModuleStackTracer, which cannot be built
  without arguments (TypeError: __init__() missing 1 required positional argument:
  'scope_root');
- a plain re-trace loses their calling convention: such a module takes keyword inputs and
  returns the model's own output class (a Hugging Face ModelOutput) through a pytree code
  generator, and would come back returning a plain dict.
`make_picklable(gm)` records RetraceTracer instead, which restores the pytree calling
convention after the re-trace. GraphModule.meta is not pickled by torch;
the entries under egp_fx's keys are kept as the attribute PICKLED_META (report.report_of reads
it), except what report.Transient holds (the original model), which pickles to nothing.
"""
from __future__ import annotations

import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

PICKLED_META = "_egp_meta"


class RetraceTracer(fx.Tracer):
    """Rebuilds a compressed GraphModule from its code at torch.load (see the module doc).

    Constructible without arguments, as GraphModule unpickling requires."""

    def trace(self, root, concrete_args=None):
        graph = super().trace(root, concrete_args)
        _restore_pytree(graph, vars(root))
        return graph


def _restore_pytree(graph: fx.Graph, body: dict) -> None:
    """Give a re-traced graph the pytree code generator its code was written by."""
    in_spec, out_spec = body.get("_in_spec"), body.get("_out_spec")
    if in_spec is None or out_spec is None or "self._out_spec" not in body.get("_code", ""):
        return
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    if len(leaves) != out_spec.num_leaves:
        return   # not the structure the spec describes: keep the plain calling convention
    output.args = (tuple(leaves),)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, out_spec))


def make_picklable(gm: fx.GraphModule, meta_keys: tuple[str, ...]) -> fx.GraphModule:
    """Let torch.save / torch.load round-trip `gm`, keeping meta[meta_keys]; returns gm."""
    gm.graph._tracer_cls = RetraceTracer
    gm._tracer_cls = RetraceTracer
    gm._tracer_extras = {}
    setattr(gm, PICKLED_META, {k: gm.meta[k] for k in meta_keys if k in gm.meta})
    return gm


def pickled_meta(module) -> dict:
    """The meta entries make_picklable kept (after a torch.load), or {}."""
    return getattr(module, "__dict__", {}).get(PICKLED_META, {})
