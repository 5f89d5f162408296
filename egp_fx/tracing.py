"""Tracing: turn an nn.Module into a torch.fx GraphModule we can analyse and rewrite.

`trace(model)` deep-copies the model, puts the copy in eval mode and traces it with a Tracer that
treats a registry of modules as leaves (fx cannot look inside them) and wraps a registry of
functions (they contain Python control flow on tensor values). timm keeps registries of its own
for the same purpose; they are merged in. A model that still cannot be traced raises TraceError
naming the innermost module fx was inside and the reason fx gave.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch.fx as fx
from torch import nn

from .errors import TraceError

log = logging.getLogger(__name__)

# type -> reason. Leaves are kept whole in the graph: their activations are not analysed.
LEAF_MODULES: dict[type, str] = {}
# function -> reason. Wrapped functions appear as one call_function node.
WRAPPED_FUNCTIONS: dict[Callable, str] = {}


def register_leaf_module(cls: type, reason: str) -> type:
    """Mark `cls` as a leaf for tracing (usable as a decorator via functools.partial)."""
    LEAF_MODULES[cls] = reason
    return cls


def register_wrapped_function(fn: Callable, reason: str) -> Callable:
    WRAPPED_FUNCTIONS[fn] = reason
    return fn


def _timm_registries() -> tuple[dict[type, str], dict[Callable, str]]:
    try:
        from timm.layers import _fx as timm_fx  # noqa: PLC0415
        import timm.models  # noqa: F401,PLC0415  (registers the models' own entries)
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return {}, {}
    reason = "timm registers it as untraceable (flow control on tensor values)"
    modules = {m: reason for m in timm_fx.get_notrace_modules()}
    functions = {f: reason for f in timm_fx.get_notrace_functions() if callable(f)}
    return modules, functions


class _Tracer(fx.Tracer):
    def __init__(self, leaves: dict[type, str], functions: dict[Callable, str]):
        super().__init__(autowrap_functions=tuple(functions))
        self._leaf_types = tuple(leaves)
        self._stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def trace(model: nn.Module, *, leaf_modules: dict[type, str] | None = None) -> fx.GraphModule:
    """Trace a deep copy of `model` in eval mode. The caller's model is never touched.

    `leaf_modules` adds {type: reason} entries for this call on top of the registries.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model).eval()
        gm.meta = dict(getattr(model, "meta", {}))
        return gm
    timm_leaves, timm_functions = _timm_registries()
    leaves = {**timm_leaves, **LEAF_MODULES, **(leaf_modules or {})}
    functions = {**timm_functions, **WRAPPED_FUNCTIONS}
    root = copy.deepcopy(model).eval()
    tracer = _Tracer(leaves, functions)
    try:
        graph = tracer.trace(root)
    except Exception as err:  # fx raises many types; we re-raise one that names the module
        where = tracer.failed_in or ("<top level>", type(model).__name__)
        raise TraceError(
            f"torch.fx cannot trace module '{where[0]}' ({where[1]}): {type(err).__name__}: {err}. "
            f"Register it as a leaf with egp_fx.register_leaf_module({where[1]}, reason=...) "
            f"(its activations will then not be analysed)."
        ) from err
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.eval()
    log.debug("traced %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm
