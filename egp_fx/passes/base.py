"""What every rewrite pass takes and gives back.

A pass is a generator `run(gm, ctx)` registered with `passes.register`. It walks the graph and
yields, for every candidate it considers,
- a Refusal: the check that failed, as a Why (a Reason code and its facts, reasons.py), or
- a Candidate: a stable key (the anchor node's name) and `apply()`, which rewrites gm in place
  and returns the Rewrite record. The value sent back into the generator is that Rewrite, or
  None when the driver chose not to apply the candidate.
The driver (`run_pass`) decides which candidates to apply: all of them, or, when compress bisects
a failed group, a subset by key. Passes know nothing about verification or rollback. The driver
then cleans the graph (dead code, unused modules and tensors), lints it and regenerates code.

Records are data: what a rewrite did is a RewriteKind, what was decided for an activation a
Decision, why a candidate was refused a Why; reasons.py renders the text. A pass reads its own
options (a frozen dataclass registered with it) with `ctx.options_of(Options)`.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import torch.fx as fx

from egp_fx.ir.batches import Batch
from egp_fx.ir.ops import Ops
from egp_fx.ir.shapes import propagate

from .reasons import Reason, Why

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


class RewriteKind(str, enum.Enum):
    """What a rewrite did (Rewrite.kind). A pass outside egp_fx may use a str enum of its own."""

    DROP_NOOP = "drop_noop"                    # cleanup
    DEAD_CODE = "dead_code"
    FOLD_BN = "fold_bn"                        # fold_bn
    CONSTANT = "constant"                      # constants
    CONSTANT_BRANCH = "constant_branch"
    ZERO_UP_TO_ROUNDING = "zero_up_to_rounding"
    DROP_ADD = "drop_add"
    MERGE_ADDS = "merge_adds"
    DROP_RELU = "drop_relu"
    NARROW_CHANNELS = "narrow_channels"        # dead_channels
    LINEARISE = "linearise"                    # linear_units
    LINEAR_O_LINEAR = "linear_o_linear"        # fold_linear: chain
    CONV_O_1X1 = "conv_o_1x1"
    PW_O_CONV = "1x1_o_conv"
    KXK_O_KXK = "kxk_o_kxk"
    RESIDUAL_INTO_LINEAR = "residual_into_linear"      # residual
    RESIDUAL_INTO_CONV = "residual_into_conv"
    SCALE_INTO_PRODUCER = "scale_into_producer"        # affine
    SCALE_INTO_CONSUMER = "scale_into_consumer"
    SHIFT_INTO_PRODUCER = "shift_into_producer"
    SHIFT_INTO_CONSUMER = "shift_into_consumer"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    because: Why | None = None     # CONSTANT_OUTPUT, NONNEGATIVE_INPUT; for KEPT, the refusal's
    before: int | None = None      # widths, for NARROWED
    after: int | None = None
    into: str | None = None        # the layer it was folded into, for FOLDED

    @property
    def why(self) -> str:
        return str(self.because) if self.because is not None else ""

    def __str__(self) -> str:
        if self.kind is DecisionKind.NARROWED:
            return f"narrowed {self.before} -> {self.after}"
        if self.kind is DecisionKind.FOLDED:
            return f"folded into {self.into}"
        return f"{self.kind.value} ({self.why})" if self.why else self.kind.value

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "why": self.why,
                "code": self.because.code.value if self.because is not None else None,
                "before": self.before,
                "after": self.after, "into": self.into, "text": str(self)}


@dataclass
class Rewrite:
    pass_name: str
    kind: RewriteKind              # or a str enum of a pass outside egp_fx
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
    why: Why                       # the code and its facts
    activation: str | None = None
    path: str = ""

    @property
    def code(self) -> Reason:
        return self.why.code

    @property
    def details(self) -> Mapping[str, object]:
        return self.why.details

    @property
    def reason(self) -> str:
        """The text (reasons.render)."""
        return str(self.why)


@dataclass
class Candidate:
    """A rewrite the pass is ready to make: `apply()` makes it and returns its record."""

    key: str
    apply: Callable[[], Rewrite]


PassRun = Generator["Candidate | Refusal", "Rewrite | None", None]


class Timings(Protocol):
    """Measured cost on the target (pipeline.latency.WidthTable): seconds of the module that
    build() -> (module, input) makes, cached under `key`."""

    def seconds(self, key: tuple, build: Callable) -> float: ...


Options = TypeVar("Options")


@dataclass
class PassContext:
    example: Batch                      # one sample, for shapes
    options: Mapping[type, object] = field(default_factory=dict)   # options class -> its values
    timings: Timings | None = None      # cost="latency": measured on the target; else FLOPs decide
    ops: Ops | None = None              # the classifier of the graph being rewritten

    def options_of(self, kind: type[Options]) -> Options:
        """The values of a pass's options dataclass (its defaults when none were given)."""
        given = self.options.get(kind)
        return given if given is not None else kind()

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
