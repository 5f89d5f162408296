"""Float32 margins of smooth activations, found numerically on torch's own CPU kernels.

A smooth activation f (ELU, CELU, SELU, Softplus, Mish) tends to a constant c as z -> -inf and,
for some, to the identity as z -> +inf. Beyond a margin it equals that map to float32 rounding:

    low_margin   the largest float32 lo such that |f(z) - c| <= 2^-24 max(1, |c|) for every
                 float32 z <= lo (the unit roundoff at the scale of the output);
    high_margin  the smallest float32 hi such that f(z) == z, bit for bit, for every float32
                 z >= hi.

How: f is evaluated on a geometric grid of 16 points per octave over 24 octaves around the
kind's input scale (2^-8 .. 2^16 times it); from the outermost grid point that fails, every
float32 of the next quarter octave outwards is evaluated too (2M values near 16). Each runs
both of torch's CPU loops, the vectorised one and the scalar one, which round differently (SELU's
scalar loop reaches its constant at -17.33, the vectorised one at -16.75): a margin holds for
both. Beyond that window f approaches its limit exponentially; a test compares the results
with an exhaustive scan of every float32 in [1, 64] on each side. A margin costs about half a
second, so activations.py holds the margins of the default parameters as constants (a test
recomputes them here) and only other parameters are computed, once per process. Other devices' kernels may round differently by an ulp, which
the verification tolerance absorbs.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

aten = torch.ops.aten
ROUNDOFF = 2.0 ** -24
_OCTAVE = 16                      # grid points per octave
_STEPS = _OCTAVE * 24             # over 24 octaves
_WINDOW = 4                       # scanned exhaustively: a quarter octave outwards
_CHUNK = 2 ** 20


def float32(x: float) -> float:
    """x rounded to float32 (how kernels compare with a Python scalar bound)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _next(x: float, towards: float) -> float:
    t = torch.tensor(x, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(towards, dtype=torch.float32)))


def _between(a: float, b: float) -> torch.Tensor:
    """Every float32 in [a, b], a and b of the same sign."""
    ends = torch.tensor([a, b], dtype=torch.float32).view(torch.int32).tolist()
    return torch.arange(min(ends), max(ends) + 1, dtype=torch.int32).view(torch.float32)


def _grid(scale: float, sign: float) -> torch.Tensor:
    """sign * scale * 2^(k/16 - 8), from the innermost point outwards."""
    k = torch.arange(_STEPS, dtype=torch.float64)
    return (sign * scale * torch.exp2(k / 16 - 8)).float()


def _both_paths(fn: Callable, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn on contiguous z (the vectorised loop) and on a strided copy (the scalar loop): CPU
    kernels round differently in the two, and a margin must hold for both."""
    strided = torch.empty(2 * len(z), dtype=z.dtype)[::2]
    strided.copy_(z)
    with torch.no_grad():
        return fn(z), fn(strided)


def _failing(fn: Callable, bad: Callable, z: torch.Tensor) -> torch.Tensor:
    vec, scalar = _both_paths(fn, z)
    return bad(z, vec) | bad(z, scalar)


def _outer_margin(fn: Callable, bad: Callable, scale: float, sign: float) -> float:
    """The float32 just outside the outermost z on the `sign` side where bad(z, fn(z))."""
    grid = _grid(scale, sign)
    failing = _failing(fn, bad, grid).nonzero()
    if not len(failing):
        return float(grid[0])
    k = int(failing[-1])
    if k + 1 == len(grid):
        return sign * math.inf          # never settles on the grid: no margin
    edge = float(grid[k])
    window = _between(edge, float(grid[min(k + _WINDOW, len(grid) - 1)]))
    for chunk in window.split(_CHUNK):
        worst = chunk[_failing(fn, bad, chunk)]
        if len(worst):
            edge = float(worst.abs().max()) * sign
    return _next(edge, sign * math.inf)


def low_margin(fn: Callable, const: float, scale: float = 1.0) -> float:
    """The largest float32 lo with |fn(z) - const| <= 2^-24 max(1, |const|) for all z <= lo."""
    tol = ROUNDOFF * max(1.0, abs(const))
    return _outer_margin(fn, lambda z, y: (y.double() - const).abs() > tol, scale, -1.0)


def high_margin(fn: Callable, scale: float = 1.0) -> float:
    """The smallest float32 hi with fn(z) == z exactly for all z >= hi."""
    return _outer_margin(fn, lambda z, y: y != z, scale, 1.0)


def saturation(fn: Callable, scale: float = 1.0) -> float:
    """The float32 value fn tends to as z -> -inf (taken far beyond the grid)."""
    with torch.no_grad():
        return float(fn(torch.tensor([-scale * 2.0 ** 20], dtype=torch.float32)))


@functools.lru_cache(maxsize=256)
def elu_tail(alpha: float, scale: float, input_scale: float) -> tuple[float, float]:
    """(lo, c): aten.elu(z, alpha, scale, input_scale) (ELU, CELU and SELU all run it) is c to
    float32 rounding for z <= lo."""
    fn = lambda z: aten.elu(z, alpha, scale, input_scale)  # noqa: E731
    reach = 1.0 / abs(input_scale) if input_scale else 1.0
    c = saturation(fn, reach)
    return low_margin(fn, c, reach), c


@functools.lru_cache(maxsize=256)
def softplus_margins(beta: float, threshold: float) -> tuple[float, float]:
    """(lo, hi): softplus is 0 to float32 rounding for z <= lo and z exactly for z >= hi."""
    fn = lambda z: F.softplus(z, beta, threshold)  # noqa: E731
    reach = 1.0 / abs(beta)
    return low_margin(fn, 0.0, reach), high_margin(fn, reach)


@functools.lru_cache(maxsize=1)
def mish_margins() -> tuple[float, float]:
    """(lo, hi): mish is 0 to float32 rounding for z <= lo and z exactly for z >= hi."""
    return low_margin(F.mish, 0.0), high_margin(F.mish)


def softplus_at_zero(beta: float, threshold: float) -> float:
    return float(F.softplus(torch.zeros(1), beta, threshold))


__all__ = ["ROUNDOFF", "elu_tail", "float32", "high_margin", "low_margin", "mish_margins", "saturation",
           "softplus_at_zero", "softplus_margins"]
