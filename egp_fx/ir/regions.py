"""Regions of an activation: the intervals of its input on which it is exactly affine.

Every supported activation is split along the pre-activation axis z into at most three intervals:

    LOW   z <= lo          HIGH  z > hi (or z >= hi)          MID   between them

Each interval has an exact affine map y = slope*z + offset, or None where the activation is
nonlinear there. The regions of each activation kind are given in activations.py.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Affine:
    slope: float
    offset: float

    @property
    def is_zero(self) -> bool:
        return self.slope == 0.0 and self.offset == 0.0

    @property
    def is_constant(self) -> bool:
        return self.slope == 0.0


@dataclass(frozen=True)
class RegionSpec:
    """Where the regions of one activation call lie and what each computes."""

    kind: str
    lo: float                 # LOW is z <= lo
    hi: float                 # HIGH is z > hi (hi_strict) or z >= hi
    hi_strict: bool
    low: Affine | None
    mid: Affine | None        # None: nonlinear (or empty when lo == hi)
    high: Affine | None
    params: tuple[tuple[str, float], ...] = ()

    @property
    def has_mid(self) -> bool:
        return self.hi > self.lo

    def affine(self, region: int) -> Affine | None:
        return (self.low, self.mid, self.high)[region]

