"""Forward parameters the batches do not supply, fixed to their defaults.

Models take flags in forward: `forward(self, x, embed=False)`, `return_features=False`,
`output_hidden_states=None`. torch.fx traces every parameter as a Proxy, and `if embed:` on a
Proxy fails; torch.export runs the Python code with the default. A parameter that a batch does
not supply and whose default is a plain value (bool, None, int, float, str, an enum member) is
fixed to that default: torch.fx receives it in `concrete_args` (its placeholder and the check fx
adds for it are then removed, so the captured forward takes only the inputs the batches give),
torch.export uses the default as the model does. A parameter a batch supplies stays an input.
The report names what was fixed (CaptureInfo.fixed).
"""
from __future__ import annotations

import enum
import inspect
import operator

import torch
import torch.fx as fx
from torch import nn

from egp_fx.ir.batches import Batch

PLAIN = (bool, int, float, str, enum.Enum)
_CHECKS = frozenset({operator.eq, operator.not_, torch._assert,
                     torch.fx._symbolic_trace._assert_is_none})
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def fixed_defaults(model: nn.Module, example: Batch | None) -> dict[str, object]:
    """{name: default} for the forward parameters `example` does not supply whose default is a
    plain value; {} without an example (nothing is known about what the batches supply)."""
    if example is None:
        return {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in _POSITIONAL]
    supplied = {p.name for p in positional[:len(example.args)]} | set(example.kwargs)
    out = {}
    for p in params:
        if p.name in supplied or p.kind not in (*_POSITIONAL, inspect.Parameter.KEYWORD_ONLY):
            continue
        if p.default is None or (p.default is not inspect.Parameter.empty
                                 and isinstance(p.default, PLAIN)):
            out[p.name] = p.default
    return out


def _is_check(node: fx.Node) -> bool:
    try:
        return node.op == "call_function" and node.target in _CHECKS
    except TypeError:  # an unhashable target
        return False


def describe(fixed: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in fixed.items())


def drop_fixed_placeholders(graph: fx.Graph, names: list[str], fixed: dict) -> None:
    """Erase the placeholders fx made for the `fixed` parameters (`names`: forward's parameter
    names in order, one placeholder each) and the checks fx added on them; a placeholder that
    anything else reads is kept."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        if name not in fixed:
            continue
        checks, frontier = [], [node]
        while frontier and checks is not None:
            for user in frontier.pop().users:
                if not _is_check(user):
                    checks = None
                    break
                if user not in checks:
                    checks.append(user)
                    frontier.append(user)
        if checks is None:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        for check in sorted(checks, key=order.__getitem__, reverse=True):
            graph.erase_node(check)
        graph.erase_node(node)
