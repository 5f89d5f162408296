"""What every rewrite pass takes and gives back.

A pass is a generator `run(gm, ctx)` registered with `passes.register`. It walks the graph and
yields, for every candidate it considers,
- a Refusal (the check that failed and why), or
- a Candidate: a stable key (the anchor node's name) and `apply()`, which rewrites gm in place
  and returns the Rewrite record. The value sent back into the generator is that Rewrite, or
  None when the driver chose not to apply the candidate.
The driver (`run_pass`) decides which candidates to apply: all of them, or, when compress bisects
a failed group, a subset by key. Passes know nothing about verification or rollback. The driver
then cleans the graph (dead code, unused modules and tensors), lints it and regenerates code.

Decisions are data (Decision, Status): inspect reads them directly.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch.fx as fx

from egp_fx.ir.batches import Batch
from egp_fx.ir.ops import Ops
from egp_fx.ir.shapes import propagate

SHAPES_VALID = "egp_shapes_valid"


class Status(str, enum.Enum):
    APPLIED = "applied"
    ROLLED_BACK = "rolled back"


class DecisionKind(str, enum.Enum):
    """What happened to an activation call (one of the table's categories)."""

    REMOVED = "removed"
    NARROWED = "narrowed"
    LINEARISED = "linearised"
    FOLDED = "folded"
    KEPT = "kept"
    NOT_ANALYSED = "not analysed"      # runs inside a leaf or an unknown op: never observed


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    why: str = ""                  # "constant output", "input is non-negative", ...
    before: int | None = None      # widths, for NARROWED
    after: int | None = None
    into: str | None = None        # the layer it was folded into, for FOLDED

    def __str__(self) -> str:
        if self.kind is DecisionKind.NARROWED:
            return f"narrowed {self.before} -> {self.after}"
        if self.kind is DecisionKind.FOLDED:
            return f"folded into {self.into}"
        return f"{self.kind.value} ({self.why})" if self.why else self.kind.value

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "why": self.why, "before": self.before,
                "after": self.after, "into": self.into, "text": str(self)}


@dataclass
class Rewrite:
    pass_name: str
    kind: str                      # e.g. "fold_bn", "narrow_channels", "constant_branch", ...
    key: str                       # stable identity (anchor node name), used for bisection
    nodes: list[str]               # nodes of the graph involved (names as in the original)
    exact: bool
    detail: str
    params_saved: int = 0
    flops_saved: int = 0           # analytic, per sample
    activation: str | None = None  # the activation call this decision is about, if any
    decision: Decision | None = None
    path: str = ""                 # module path of the anchor, for reports
    bound: float | None = None     # for rewrites exact up to rounding: the bound used
    error: float | None = None     # measured relative output error after the group was applied
    status: Status = Status.APPLIED
    tensors: list[str] = field(default_factory=list)   # attributes replaced (narrow_channels)


@dataclass
class Refusal:
    pass_name: str
    key: str
    nodes: list[str]
    reason: str
    activation: str | None = None
    path: str = ""


@dataclass
class Candidate:
    """A rewrite the pass is ready to make: `apply()` makes it and returns its record."""

    key: str
    apply: Callable[[], Rewrite]


PassRun = Generator["Candidate | Refusal", "Rewrite | None", None]


@dataclass(frozen=True)
class PassOptions:
    """Options every pass may read (compress's keyword arguments)."""

    channel_multiple: int = 16          # narrowed widths stay a multiple of this
    allow_approximate: bool = False
    cost: str = "flops"                 # "flops" or "latency"
    latency_fn: Callable | None = None  # (nn.Module, input) -> seconds, for cost="latency"
    timings: object = None              # latency.WidthTable: cached timings, cost="latency"

    @property
    def by_latency(self) -> bool:
        return self.cost == "latency" and self.timings is not None


@dataclass
class PassContext:
    example: Batch                      # one sample, for shapes
    options: PassOptions = field(default_factory=PassOptions)
    ops: Ops | None = None              # the classifier of the graph being rewritten

    def begin(self, gm: fx.GraphModule, shapes: bool) -> None:
        """Prepare for a pass over gm: the op table, and shapes when the pass reads them.

        Shapes are propagated once; passes keep them valid (a narrowing updates the shapes it
        changes, a new node gets the metadata of the node it stands for). A pass that cannot
        drops the mark (SHAPES_VALID), and the next pass that needs shapes propagates again."""
        self.ops = Ops(gm)
        if shapes and not gm.meta.get(SHAPES_VALID):
            propagate(gm, self.example)
            gm.meta[SHAPES_VALID] = True


class PassOutcome(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite]
    refusals: list[Refusal]
