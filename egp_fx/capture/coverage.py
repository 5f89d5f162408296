"""Which activation calls that run are analysed: counted at dispatch level, node by node.

    activation_coverage(gm, example, analysed) -> Coverage

The captured graph runs once on one sample under an fx Interpreter, with a TorchDispatchMode
that counts the aten activation ops each node dispatches: the aten spellings of every kind in
activations.py (relu6 dispatches as hardtanh), in-place forms included.
Dispatch level sees every activation whatever spelled it: a module, a function, a tensor method,
or an aten op of a torch.export graph. A node of `analysed` (the activation calls calibration
observes) accounts for one call; any other call hides in a node the analysis cannot look into:

- a leaf module kept whole by the tracer (the leaf registry, with the reason it was registered,
  or a torch.nn module that fx does not enter, such as nn.TransformerEncoderLayer);
- a wrapped function (the function registry: Python control flow on tensor values);
- an activation op the classifier does not know;
- a call of a kind that cannot be analysed (RReLU in training mode, a PReLU whose slope is
  computed, or whose slopes run along another axis than the channels: calibration's reasons).

Each such node is a Hidden record with its count, the activation kinds and the reason; compress
warns with the total and the decision table has a row for each. Calls of activations that are
not kinds (sigmoid, tanh, softmax: activations.OTHERS) are counted apart, in `other`, each named
with the reason it has no exact regions; they are not warned about.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from egp_fx.ir.activations import KINDS, OTHERS
from egp_fx.ir.attrs import module_path
from egp_fx.ir.ops import Ops, Role

COVERAGE_META_KEY = "egp_coverage"


def counted_ops() -> dict[str, str]:
    """aten op name (in-place forms included) -> activation kind, for every kind of
    activations.KINDS that names aten overloads (relu6 dispatches as hardtanh)."""
    return _aten_names(KINDS.values())


def other_ops() -> dict[str, str]:
    """aten op name -> the activations.OTHERS entry it belongs to (sigmoid, softmax, ...)."""
    return _aten_names(OTHERS.values())


def _aten_names(entries) -> dict[str, str]:
    out = {}
    for entry in entries:
        for fn in entry.functions:
            if isinstance(fn, torch._ops.OpOverload):
                out[fn.overloadpacket.__name__] = entry.name
    return out


class ActivationCounter(TorchDispatchMode):
    """Counts aten activation ops by kind while active (`kinds`, a Counter), and the calls of
    activations that are not kinds (`others`)."""

    def __init__(self):
        super().__init__()
        self.kinds: Counter = Counter()
        self.others: Counter = Counter()
        self.ops = counted_ops()
        self.other_ops = other_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = self.ops.get(name)
        if kind is not None:
            self.kinds[kind] += 1
        elif name in self.other_ops:
            self.others[self.other_ops[name]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.kinds.values())


@dataclass
class Hidden:
    """Activation calls that run inside one node of the graph but are not analysed."""

    node: str
    path: str                 # module path ('' for a function)
    what: str                 # the module's class or the function's name
    count: int
    kinds: dict[str, int]
    reason: str

    def describe(self) -> str:
        where = self.path or self.node
        return (f"{self.count} activation call(s) inside {where} ({self.what}) not analysed: "
                f"{self.reason}")


@dataclass
class Coverage:
    """Activation calls that ran on one sample of the captured graph, and those analysed.

    `run` counts the calls of activation kinds; each one is analysed or in `hidden`, named with
    the reason. `other` names the calls of activations that are not kinds (sigmoid, softmax:
    activations.OTHERS), with theirs."""

    run: int
    analysed: int
    hidden: list[Hidden] = field(default_factory=list)
    other: list[Hidden] = field(default_factory=list)

    @property
    def unanalysed(self) -> int:
        return sum(h.count for h in self.hidden)

    @property
    def others(self) -> int:
        return sum(h.count for h in self.other)

    def describe(self) -> str:
        text = f"{self.analysed} of {self.run} activation calls that run are analysed"
        if self.hidden:
            text += "; " + "; ".join(h.describe() for h in self.hidden)
        if self.other:
            text += (f"; {self.others} call(s) of activations without exact regions: "
                     + "; ".join(f"{h.path or h.node} ({h.what}): {h.reason}"
                                 for h in self.other))
        return text

    def to_dict(self) -> dict:
        return {"run": self.run, "analysed": self.analysed, "unanalysed": self.unanalysed,
                "hidden": [asdict(h) for h in self.hidden],
                "other": [asdict(h) for h in self.other]}


class _Counting(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: ActivationCounter):
        super().__init__(gm, garbage_collect_values=True)
        self.counter = counter
        self.per_node: dict[str, Counter] = {}
        self.others: dict[str, Counter] = {}

    def run_node(self, n: fx.Node):
        before, others = Counter(self.counter.kinds), Counter(self.counter.others)
        out = super().run_node(n)
        for seen, now, into in ((before, self.counter.kinds, self.per_node),
                                (others, self.counter.others, self.others)):
            delta = now - seen
            if delta:
                into[n.name] = delta
        return out


def _what(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _reason(gm: fx.GraphModule, node: fx.Node, leaves: dict[str, str],
            functions: dict, ops: Ops) -> tuple[str, str]:
    """(what, reason) for a node hiding activation calls."""
    op = ops(node)
    if op.role is Role.NONLINEAR and op.params.get("reason"):
        return _what(gm, node), f"{op.kind}: {op.params['reason']}"
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        what = type(mod).__name__
        if str(node.target) in leaves:
            return what, leaves[str(node.target)]
        if type(mod).__module__.startswith("torch.nn"):
            return what, f"torch.fx keeps torch.nn modules whole ({type(mod).__module__}.{what})"
        return what, "the module was kept whole when the graph was captured"
    if node.op == "call_function":
        what = getattr(node.target, "__name__", str(node.target))
        try:
            reason = functions.get(node.target)
        except TypeError:   # an unhashable target
            reason = None
        return what, reason or "a function call egp_fx does not classify as an activation"
    return str(node.target), "a method call egp_fx does not classify as an activation"


def activation_coverage(gm: fx.GraphModule, example, analysed: set[str], *,
                        leaves: dict[str, str] | None = None,
                        functions: dict | None = None,
                        reasons: dict[str, str] | None = None) -> Coverage:
    """Run `gm` on `example` (a data.Batch of one sample) and count what `analysed` misses.

    `leaves` maps module paths the tracer kept whole to the reason; `functions` maps wrapped
    functions to theirs; `reasons` maps activation nodes calibration did not observe to theirs
    (PReLU slopes along another axis than the channels). `gm` is not changed.
    """
    counter = ActivationCounter()
    interp = _Counting(gm, counter)
    bound = inspect.signature(gm.forward).bind(*example.args, **example.kwargs)
    bound.apply_defaults()
    with torch.no_grad(), counter:
        interp.run(*bound.args, *bound.kwargs.values())
    ops = Ops(gm)
    hidden, other = [], []
    for node in gm.graph.nodes:
        path = module_path(node, gm) if node.op == "call_module" else ""
        kinds = interp.per_node.get(node.name)
        count = sum(kinds.values()) - (1 if node.name in analysed else 0) if kinds else 0
        if count > 0:
            if (reasons or {}).get(node.name):
                what, reason = _what(gm, node), reasons[node.name]
            else:
                what, reason = _reason(gm, node, leaves or {}, functions or {}, ops)
            hidden.append(Hidden(node.name, path, what, count, dict(kinds), reason))
        names = interp.others.get(node.name)
        if names:
            reason = "; ".join(f"{name}: {OTHERS[name].reason}" for name in names) \
                if len(names) > 1 else OTHERS[next(iter(names))].reason
            other.append(Hidden(node.name, path, _what(gm, node), sum(names.values()),
                                dict(names), reason))
    return Coverage(counter.total, len(analysed), hidden, other)
