"""Capture with torch.fx.symbolic_trace: module-level graphs (`call_module` of nn.Conv2d, ...).

The model is traced with a Tracer that treats a registry of modules as leaves (fx cannot look
inside them) and wraps a registry of functions (they contain Python control flow on tensor
values). From timm's own registries only the functions are taken: timm marks its fused
norm+activation modules (BatchNormAct2d, ...) as untraceable for its feature extraction, but fx
traces them in eval mode, and their activations must be seen. A leaf hides its activations from
calibration; `leaf_activations` counts them so compress can say so.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch.fx as fx
from torch import nn

from ..errors import TraceError

log = logging.getLogger(__name__)

# type -> reason. Leaves are kept whole in the graph: their activations are not analysed.
LEAF_MODULES: dict[type, str] = {}
# function -> reason. Wrapped functions appear as one call_function node.
WRAPPED_FUNCTIONS: dict[Callable, str] = {}


def register_leaf_module(cls: type, reason: str) -> type:
    """Keep modules of type `cls` whole when tracing (their activations are then not analysed)."""
    LEAF_MODULES[cls] = reason
    return cls


def register_wrapped_function(fn: Callable, reason: str) -> Callable:
    WRAPPED_FUNCTIONS[fn] = reason
    return fn


def _timm_functions() -> dict[Callable, str]:
    try:
        from timm.layers import _fx as timm_fx  # noqa: PLC0415
        import timm.models  # noqa: F401,PLC0415  (registers the models' own entries)
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return {}
    reason = "timm registers it as untraceable (flow control on tensor values)"
    return {f: reason for f in timm_fx.get_notrace_functions() if callable(f)}


def _activation_modules() -> tuple[type, ...]:
    from ..activations import KINDS  # noqa: PLC0415

    return tuple(cls for k in KINDS.values() for cls in k.modules)


class Tracer(fx.Tracer):
    """fx.Tracer with leaf and wrapped-function registries; records where tracing failed.

    Constructible without arguments, as GraphModule pickling requires.
    """

    def __init__(self, leaves: dict[type, str] | None = None,
                 functions: dict[Callable, str] | None = None):
        super().__init__(autowrap_functions=tuple(functions or ()))
        self._leaf_types = tuple(leaves or ())
        self._stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if isinstance(m, _activation_modules()):   # one call egp_fx can classify
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


def fx_capture(root: nn.Module, leaf_modules: dict[type, str] | None = None) -> fx.GraphModule:
    """Trace `root` (already the copy to keep, in eval mode). Raises TraceError naming the module."""
    leaves = {**LEAF_MODULES, **(leaf_modules or {})}
    tracer = Tracer(leaves, {**_timm_functions(), **WRAPPED_FUNCTIONS})
    try:
        graph = tracer.trace(root)
    except Exception as err:  # fx raises many types; we re-raise one that names the module
        where = tracer.failed_in or ("<top level>", type(root).__name__)
        raise TraceError(
            f"torch.fx cannot trace module '{where[0]}' ({where[1]}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}") from err
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    gm.eval()
    log.debug("fx traced %s: %d nodes", type(root).__name__, len(gm.graph.nodes))
    return gm


def leaf_activations(gm: fx.GraphModule, kinds: tuple[type, ...]) -> dict[str, int]:
    """{leaf module path: activation modules inside it} for call_module nodes of leaf types
    that hold activations the graph cannot see."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not any(True for _ in mod.children()):
            continue
        inside = sum(1 for m in mod.modules() if isinstance(m, kinds))
        if inside:
            out[str(node.target)] = inside
    return out
