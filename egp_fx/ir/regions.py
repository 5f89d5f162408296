"""Regions of an activation: the intervals of its input on which it is exactly affine.

Every supported activation is split along the pre-activation axis z into at most three intervals:

    LOW   z <= lo          HIGH  z > hi (or z >= hi)          MID   between them

Each interval has an exact affine map y = slope*z + offset, or None where the activation is
nonlinear there. A map may differ per channel (PReLU's learned slopes a_c): its slope and offset
are then tuples with one entry per channel, and `RegionSpec.affine(region, c)` gives channel c's
scalar map. The regions of each activation kind are given in activations.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

Number = float | tuple[float, ...]


def _at(value: Number, c: int) -> float:
    return value[c] if isinstance(value, tuple) else value


def _take(value: Number, keep: Sequence[int]) -> Number:
    return tuple(value[c] for c in keep) if isinstance(value, tuple) else value


def _all(value: Number, test) -> bool:
    return all(test(v) for v in value) if isinstance(value, tuple) else test(value)


@dataclass(frozen=True)
class Affine:
    """y = slope*z + offset; slope and offset are floats, or tuples with one entry per channel."""

    slope: Number
    offset: Number

    @property
    def per_channel(self) -> bool:
        return isinstance(self.slope, tuple) or isinstance(self.offset, tuple)

    @property
    def channels(self) -> int | None:
        """The number of per-channel entries, or None for one map shared by every channel."""
        for v in (self.slope, self.offset):
            if isinstance(v, tuple):
                return len(v)
        return None

    def at(self, c: int) -> Affine:
        """Channel c's map (the map itself when it is shared)."""
        return Affine(_at(self.slope, c), _at(self.offset, c)) if self.per_channel else self

    def select(self, keep: Sequence[int]) -> Affine:
        """The map restricted to channels `keep` (after a pass narrowed the layer)."""
        return Affine(_take(self.slope, keep), _take(self.offset, keep)) \
            if self.per_channel else self

    @property
    def is_zero(self) -> bool:
        return _all(self.slope, lambda v: v == 0.0) and _all(self.offset, lambda v: v == 0.0)

    @property
    def is_constant(self) -> bool:
        return _all(self.slope, lambda v: v == 0.0)

    @property
    def max_abs_slope(self) -> float:
        return max(abs(v) for v in self.slope) if isinstance(self.slope, tuple) \
            else abs(self.slope)


@dataclass(frozen=True)
class RegionSpec:
    """Where the regions of one activation call lie and what each computes.

    `lipschitz` bounds |f(a) - f(b)| / |a - b| where f is continuous, and `jump` bounds the
    size of a discontinuity (Hardshrink's jump of lambda at +-lambda, Threshold's step): the
    rounding bound of a constant passed through the activation (passes/constant_values.py).
    `zero_value` is f(0), the output of a unit whose pre-activation is 0 on all data."""

    kind: str
    lo: float                 # LOW is z <= lo
    hi: float                 # HIGH is z > hi (hi_strict) or z >= hi
    hi_strict: bool
    low: Affine | None
    mid: Affine | None        # None: nonlinear (or empty when lo == hi)
    high: Affine | None
    params: tuple[tuple[str, float], ...] = ()
    lipschitz: float = 1.2
    jump: float = 0.0
    zero_value: float = 0.0

    @property
    def has_mid(self) -> bool:
        return self.hi > self.lo

    @property
    def channels(self) -> int | None:
        """The number of channels its per-channel maps have (None: every map is shared)."""
        for a in (self.low, self.mid, self.high):
            if a is not None and a.channels is not None:
                return a.channels
        return None

    def affine(self, region: int, channel: int | None = None) -> Affine | None:
        """The map of region 0/1/2 (low/mid/high); channel c's own map when one is given."""
        a = (self.low, self.mid, self.high)[region]
        return a.at(channel) if a is not None and channel is not None else a

    def select(self, keep: Sequence[int]) -> RegionSpec:
        """The spec restricted to channels `keep` (per-channel maps narrowed with the layer)."""
        if self.channels is None:
            return self
        pick = lambda a: a.select(keep) if a is not None else None  # noqa: E731
        return replace(self, low=pick(self.low), mid=pick(self.mid), high=pick(self.high))
