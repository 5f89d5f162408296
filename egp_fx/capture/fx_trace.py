"""Capture with torch.fx.symbolic_trace: module-level graphs (`call_module` of nn.Conv2d, ...).

The model is traced with a Tracer that treats a registry of modules as leaves (fx cannot look
inside them) and wraps a registry of functions (they contain Python control flow on tensor
values). From timm's own registries only the functions are taken: timm marks its fused
norm+activation modules (BatchNormAct2d, ...) as untraceable for its feature extraction, but in
eval mode they are a normalisation and an activation (split before capture: norm_act.py), and
their activations must be seen. A leaf hides its activations from calibration: the tracer
records which leaves it kept and why (`Tracer.leaf_reasons`), and coverage.py counts the
activation calls inside them.

Runtime assertions that fx records from the model's code (`torch._assert(x.ndim == 4, ...)`,
timm's shape checks) are dropped from the traced graph: they compute nothing, and as extra
users of a layer's output they would block rewrites of it. The capture is checked against the
model on the example batch, as before.
"""
from __future__ import annotations

import inspect
import logging
import operator
import warnings
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from egp_fx.errors import TraceError
from egp_fx.ir.activations import KINDS

from .defaults import drop_fixed_placeholders

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
    """Keep calls of `fn` as one node when tracing (activations inside are then not analysed)."""
    WRAPPED_FUNCTIONS[fn] = reason
    return fn


def wrapped_functions() -> dict[Callable, str]:
    """Every function the tracer keeps as one call, with its reason."""
    return {**_timm_functions(), **WRAPPED_FUNCTIONS}


def _timm_functions() -> dict[Callable, str]:
    try:
        import timm.models  # noqa: F401,PLC0415  (registers the models' own entries)
        from timm.layers import _fx as timm_fx  # noqa: PLC0415
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return {}
    reason = "timm registers it as untraceable (flow control on tensor values)"
    return {f: reason for f in timm_fx.get_notrace_functions() if callable(f)}


def _activation_modules() -> tuple[type, ...]:

    return tuple(cls for k in KINDS.values() for cls in k.modules)


class Tracer(fx.Tracer):
    """fx.Tracer with leaf and wrapped-function registries; records where tracing failed.

    Constructible without arguments, as GraphModule pickling requires.
    """

    def __init__(self, leaves: dict[type, str] | None = None,
                 functions: dict[Callable, str] | None = None):
        super().__init__(autowrap_functions=tuple(functions or ()))
        self._leaves = dict(leaves or {})
        self._leaf_types = tuple(self._leaves)
        self._stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None
        self.leaf_reasons: dict[str, str] = {}     # module path -> why it was kept whole

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            cls = next(c for c in self._leaves if isinstance(m, c))
            self.leaf_reasons[module_qualified_name] = \
                f"{cls.__name__} is a registered leaf module ({self._leaves[cls]})"
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


_PURE = frozenset({getattr, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                   operator.ge, operator.not_, operator.and_, operator.or_, operator.getitem,
                   operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                   operator.truediv, len})


def _harmless(node: fx.Node) -> bool:
    """An op without side effects on shapes or numbers (getattr, comparisons, arithmetic)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    try:
        return node.op == "call_function" and node.target in _PURE
    except TypeError:  # an unhashable target
        return False


def drop_asserts(graph: fx.Graph) -> int:
    """Erase torch._assert / _assert_async calls and the unused shape arithmetic that fed them
    (nothing else: dead code elimination would also take in-place ops whose result is unused)."""
    asserts = [n for n in graph.nodes if n.op == "call_function"
               and n.target in (torch._assert, torch._assert_async) and not n.users]
    for node in asserts:
        graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if not node.users and _harmless(node):
            graph.erase_node(node)
    return len(asserts)


def fx_capture(root: nn.Module, leaf_modules: dict[type, str] | None = None,
               fixed: dict | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace `root` (already the copy to keep, in eval mode): (GraphModule, {path of a leaf
    module kept whole: reason}). `fixed` parameters of forward are traced as the constants
    given (defaults.py). Raises TraceError naming the module fx could not trace."""
    leaves = {**LEAF_MODULES, **(leaf_modules or {})}
    tracer = Tracer(leaves, wrapped_functions())
    try:
        with warnings.catch_warnings():   # fx warns where it cannot check a fixed value
            warnings.simplefilter("ignore", UserWarning)
            graph = tracer.trace(root, concrete_args=dict(fixed) if fixed else None)
    except Exception as err:  # fx raises many types; we re-raise one that names the module
        where = tracer.failed_in or ("<top level>", type(root).__name__)
        raise TraceError(
            f"torch.fx cannot trace module '{where[0]}' ({where[1]}): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if fixed:
        drop_fixed_placeholders(graph, list(inspect.signature(root.forward).parameters), fixed)
    drop_asserts(graph)
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    gm.eval()
    log.debug("fx traced %s: %d nodes", type(root).__name__, len(gm.graph.nodes))
    return gm, tracer.leaf_reasons
