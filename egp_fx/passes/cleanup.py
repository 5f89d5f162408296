"""Cleanup: eval-mode no-ops (dropout, identity, alias, clone) go, then dead code.

A contiguous() (or a clone into a memory format) stays where a `view`, the output or an op of
unknown needs reads its strides (ops.layout_needed): dropping it would break the model at run
time.

Also, before the passes run, `unshare` gives each call of a parametrised module its own copy,
so that a rewrite of one call cannot change another.
"""
from __future__ import annotations

import copy
import functools

import torch.fx as fx

from egp_fx.ir.attrs import module_path
from egp_fx.ir.ops import Role, layout_needed, main_input

from .base import Candidate, PassContext, PassRun, Rewrite, RewriteKind
from .registry import register

NAME = "cleanup"


def _drop(gm: fx.GraphModule, node: fx.Node) -> Rewrite:
    path = module_path(node, gm)
    node.replace_all_uses_with(main_input(node))
    gm.graph.erase_node(node)
    return Rewrite(NAME, RewriteKind.DROP_NOOP, node.name, [node.name], True,
                   f"{node.name}: no-op in eval mode", path=path)


def _dead_code(gm: fx.GraphModule) -> Rewrite:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return Rewrite(NAME, RewriteKind.DEAD_CODE, "dead_code", [], True,
                   f"{before - len(gm.graph.nodes)} dead node(s) removed")


def _has_dead_code(gm: fx.GraphModule) -> bool:
    return any(not n.users and n.op not in ("output", "placeholder") and not n.is_impure()
               for n in gm.graph.nodes)


@register(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> PassRun:
    applied = False
    for node in list(gm.graph.nodes):
        op = ctx.ops(node)
        if op.role is Role.IDENTITY and main_input(node) is not None \
                and not (op.params.get("layout") and layout_needed(node, ctx.ops.modules)):
            applied = (yield Candidate(node.name, functools.partial(_drop, gm, node))) or applied
    if not applied and _has_dead_code(gm):
        yield Candidate("dead_code", functools.partial(_dead_code, gm))


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
