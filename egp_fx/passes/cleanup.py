"""Pass 7: cleanup. Dropout in eval mode and identity modules are removed; dead code goes.

Also run first, as preparation: a parametrised module called from several places is given one
copy per call (`unshare`), so that a rewrite of one call cannot change another.
"""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import PassContext, PassOutcome, Rewrite, finish

NAME = "cleanup"
_NOOP_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AlphaDropout)


def _is_noop(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, _NOOP_MODULES) or type(mod).__name__ in ("DropPath", "Identity")
    if node.op == "call_function" and node.target is F.dropout:
        return True
    return False


def run(gm: fx.GraphModule, ctx: PassContext) -> PassOutcome:
    rewrites = []
    for node in list(gm.graph.nodes):
        if _is_noop(gm, node) and node.args and isinstance(node.args[0], fx.Node) \
                and ctx.allows(node.name):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            rewrites.append(Rewrite(NAME, "drop_noop", node.name, [node.name], True,
                                    f"{node.name}: no-op in eval mode"))
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    if len(gm.graph.nodes) != before and not rewrites:
        rewrites.append(Rewrite(NAME, "dead_code", "dead_code", [], True,
                                f"{before - len(gm.graph.nodes)} dead node(s) removed"))
    return finish(gm, NAME, rewrites, [])


def unshare(gm: fx.GraphModule) -> int:
    """Give each call of a module with parameters its own copy. Returns how many were copied."""
    seen: set[str] = set()
    copied = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if node.target in seen and any(True for _ in mod.parameters()):
            name = node.target.replace(".", "_") + f"_call{copied}"
            gm.add_submodule(name, copy.deepcopy(mod))
            node.target = name
            copied += 1
        seen.add(node.target)
    if copied:
        gm.recompile()
    return copied
