"""Strong Wolfe line search (Nocedal & Wright 2006, Algorithms 3.5 and 3.6), shared by all methods.

Finds a step ``alpha > 0`` along a descent direction ``d`` with

.. math::
    \\phi(\\alpha) \\le \\phi(0) + c_1 \\alpha \\phi'(0), \\qquad
    |\\phi'(\\alpha)| \\le c_2 |\\phi'(0)|, \\qquad \\phi(\\alpha) = f(x + \\alpha d).

The bracketing phase extrapolates (cubic, safeguarded to at most ``10 alpha``); the zoom
phase interpolates with the cubic through both ends (quadratic or bisection as fallbacks,
safeguarded away from the ends). A NaN/inf trial value counts as "too large" and shrinks the
bracket, so a step that overflows is never accepted. Cost: one function + gradient evaluation
per trial, at most ``max_evals``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["LineSearchResult", "strong_wolfe", "cubic_minimizer"]


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of a line search.

    Attributes:
        alpha: accepted step (0.0 if no point with sufficient decrease was found).
        f: objective at ``alpha``.
        g: payload (flat gradient) at ``alpha`` (``None`` when ``alpha == 0``).
        dphi: directional derivative at ``alpha``.
        converged: both strong Wolfe conditions hold at ``alpha``.
        num_evals: trial evaluations used.
    """

    alpha: float
    f: float
    g: Any
    dphi: float
    converged: bool
    num_evals: int


def cubic_minimizer(
    a: float, fa: float, da: float, b: float, fb: float, db: float, lo: float, hi: float
) -> float:
    """Minimiser of the cubic through ``(a, fa, da)`` and ``(b, fb, db)``, clipped to ``[lo, hi]``.

    Falls back to the midpoint of ``[lo, hi]`` when the cubic has no real minimiser.
    """
    if a == b or not all(math.isfinite(v) for v in (fa, da, fb, db)):
        return 0.5 * (lo + hi)
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if disc < 0:
        return 0.5 * (lo + hi)
    d2 = math.copysign(math.sqrt(disc), b - a)
    den = db - da + 2.0 * d2
    if den == 0:
        return 0.5 * (lo + hi)
    t = b - (b - a) * ((db + d2 - d1) / den)
    if not math.isfinite(t):
        return 0.5 * (lo + hi)
    return min(max(t, lo), hi)


def _quadratic_minimizer(a: float, fa: float, da: float, b: float, fb: float) -> float:
    den = 2.0 * (fb - fa - da * (b - a))
    if den <= 0 or not math.isfinite(den):
        return math.nan
    return a - da * (b - a) ** 2 / den


def strong_wolfe(
    phi: Callable[[float], tuple[float, Any, float]],
    f0: float,
    dphi0: float,
    alpha1: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evals: int = 25,
    alpha_max: float = 1e10,
) -> LineSearchResult:
    """Strong Wolfe line search along a descent direction.

    Args:
        phi: ``alpha -> (f, payload, dphi)``; ``f`` may be ``inf`` for a failed evaluation.
        f0, dphi0: value and slope at ``alpha = 0`` (``dphi0 < 0``).
        alpha1: first trial step.
        c1, c2: Wolfe constants, ``0 < c1 < c2 < 1``.
        max_evals: budget of trial evaluations.
        alpha_max: largest step tried.

    Returns:
        A :class:`LineSearchResult`. When the budget runs out it returns the best point with
        sufficient decrease found so far (``converged=False``), or ``alpha=0`` if there is none.
    """
    evals = 0
    a_prev, f_prev, d_prev, p_prev = 0.0, f0, dphi0, None
    a = min(alpha1, alpha_max)
    best = (0.0, f0, None, dphi0)  # best point with sufficient decrease

    def armijo(al: float, fv: float) -> bool:
        return math.isfinite(fv) and fv <= f0 + c1 * al * dphi0

    def zoom(lo, hi, remaining):  # lo/hi: (alpha, f, payload, dphi)
        nonlocal evals, best
        for _ in range(remaining):
            a_lo, f_lo, _, d_lo = lo
            a_hi, f_hi, _, d_hi = hi
            left, right = min(a_lo, a_hi), max(a_lo, a_hi)
            width = right - left
            if width <= 1e-14 * max(1.0, right):
                break
            margin = 0.1 * width
            if math.isfinite(f_hi) and math.isfinite(d_hi):
                t = cubic_minimizer(a_lo, f_lo, d_lo, a_hi, f_hi, d_hi, left, right)
            elif math.isfinite(f_hi):
                t = _quadratic_minimizer(a_lo, f_lo, d_lo, a_hi, f_hi)
            else:
                t = math.nan
            if not math.isfinite(t) or t < left + margin or t > right - margin:
                t = 0.5 * (left + right)
            ft, pt, dt = phi(t)
            evals += 1
            if not armijo(t, ft) or ft >= f_lo:
                hi = (t, ft, pt, dt)
            else:
                if ft < best[1]:
                    best = (t, ft, pt, dt)
                if abs(dt) <= -c2 * dphi0:
                    return LineSearchResult(t, ft, pt, dt, True, evals)
                if dt * (a_hi - a_lo) >= 0:
                    hi = lo
                lo = (t, ft, pt, dt)
        a_b, f_b, p_b, d_b = best
        return LineSearchResult(a_b, f_b, p_b, d_b, False, evals)

    for i in range(max_evals):
        f, p, dphi = phi(a)
        evals += 1
        if not armijo(a, f) or (i > 0 and f >= f_prev):
            return zoom((a_prev, f_prev, p_prev, d_prev), (a, f, p, dphi), max_evals - evals)
        if f < best[1]:
            best = (a, f, p, dphi)
        if abs(dphi) <= -c2 * dphi0:
            return LineSearchResult(a, f, p, dphi, True, evals)
        if dphi >= 0:
            return zoom((a, f, p, dphi), (a_prev, f_prev, p_prev, d_prev), max_evals - evals)
        if a >= alpha_max:
            break
        lo, hi = a + 1.1 * (a - a_prev), min(10.0 * a, alpha_max)
        a_next = cubic_minimizer(a_prev, f_prev, d_prev, a, f, dphi, lo, hi) if lo < hi else hi
        a_prev, f_prev, p_prev, d_prev = a, f, p, dphi
        a = a_next
    a_b, f_b, p_b, d_b = best
    return LineSearchResult(a_b, f_b, p_b, d_b, False, evals)
