"""Saddles: detect negative curvature and take an escape step along the most negative direction.

Near a strict saddle the gradient vanishes, so gradient descent slows to a crawl: it leaves
only as fast as the (tiny) component along the negative-curvature direction grows, a factor
``1 + eta |lambda_min|`` per step. A second-order step along the eigenvector ``v`` of the most
negative eigenvalue ``lambda_min < 0`` decreases the loss at once: on the quadratic model

.. math::
    L(\\theta + \\alpha v) \\approx L(\\theta) + \\alpha\\, g^\\top v
        + \\tfrac12 \\alpha^2 \\lambda_{\\min} < L(\\theta)

for either sign of ``alpha``; the sign is chosen so that ``g^T v <= 0``.

References:
    Dauphin et al., Identifying and attacking the saddle point problem in high-dimensional
    non-convex optimization, NeurIPS 2014. Nesterov & Polyak, Cubic regularization of Newton
    method and its global performance, Math. Program. 2006.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int, check_nonnegative, check_positive
from ..operators.base import LinearOperator, aslinearoperator
from ..operators.curvature import CurvatureOperator
from ..operators.function import FunctionHessianOperator
from .landscape import perturbed_parameters

__all__ = ["NegativeCurvature", "EscapeStep", "detect_negative_curvature", "escape_step"]


@dataclass(frozen=True)
class NegativeCurvature:
    """Extreme eigenvalues at the current point and whether the curvature is negative.

    Attributes:
        lambda_min: smallest eigenvalue.
        lambda_max: largest eigenvalue.
        eigenvector: ``(n,)`` unit eigenvector of ``lambda_min``.
        is_negative: ``lambda_min < -(atol + rtol * max(|lambda_max|, |lambda_min|))``.
        threshold: the threshold used.
        num_matvecs: curvature products used.
        converged: the Lanczos run met its tolerance.
    """

    lambda_min: float
    lambda_max: float
    eigenvector: Tensor
    is_negative: bool
    threshold: float
    num_matvecs: int
    converged: bool


def detect_negative_curvature(
    op: Any,
    *,
    rtol: float = 1e-3,
    atol: float = 0.0,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> NegativeCurvature:
    """Both ends of the spectrum in one Lanczos run; flag significant negative curvature.

    Negative curvature is significant when
    ``lambda_min < -(atol + rtol * max(|lambda_max|, |lambda_min|))`` (relative to the
    spectrum's scale, so round-off in a PSD operator is not flagged).

    Cost: one :func:`hesse.top_eigenpairs` run with ``which="both_ends"`` (``k=1``).

    Args:
        op: a symmetric :class:`hesse.LinearOperator` (e.g. :class:`hesse.HessianOperator`,
            :func:`hesse.hessian_of`) or dense tensor.
        rtol, atol: significance threshold (see above).
        tol: eigenvalue tolerance of the Lanczos run.
        v0: warm start (e.g. the previous ``eigenvector``).
        generator: randomness of the Lanczos start.

    Returns:
        :class:`NegativeCurvature`.

    Example:
        >>> from hesse import hessian_of
        >>> H = hessian_of(lambda w: w[0] ** 2 - w[1] ** 2, torch.zeros(2, dtype=torch.float64))
        >>> detect_negative_curvature(H).lambda_min
        -2.0...
    """
    from ..linalg.eigen import top_eigenpairs

    rtol = check_nonnegative(rtol, "rtol")
    atol = check_nonnegative(atol, "atol")
    A = aslinearoperator(op)
    if A.shape[0] <= 2:  # Lanczos needs n > 2 for both ends; tiny problems go dense
        evals, evecs = torch.linalg.eigh(A.to_dense())
        lam_max, lam_min = float(evals[-1]), float(evals[0])
        vec, used, converged = evecs[:, 0], A.shape[0], True
    else:
        res = top_eigenpairs(A, k=1, which="both_ends", tol=tol, v0=v0, generator=generator)
        lam_max, lam_min = float(res.eigenvalues[0]), float(res.eigenvalues[1])
        vec, used, converged = res.eigenvectors[:, 1], res.num_matvecs, bool(res.converged)
    thr = atol + rtol * max(abs(lam_max), abs(lam_min))
    return NegativeCurvature(
        lambda_min=lam_min,
        lambda_max=lam_max,
        eigenvector=vec,
        is_negative=lam_min < -thr,
        threshold=thr,
        num_matvecs=used,
        converged=converged,
    )


@dataclass(frozen=True)
class EscapeStep:
    """A step along the most negative curvature direction.

    Attributes:
        delta: ``(n,)`` the step ``alpha * direction`` (zero if not accepted).
        direction: ``(n,)`` unit eigenvector of ``lambda_min`` with ``g^T d <= 0``.
        step_size: ``alpha`` accepted (0 if none).
        lambda_min: the curvature along ``direction``.
        loss_before, loss_after: objective before and after the step.
        predicted_change: ``alpha g^T d + alpha^2 lambda_min / 2`` (quadratic model).
        accepted: the step decreased the loss by at least ``c`` times the prediction.
        applied: the parameters were updated in place (curvature operators with
            ``apply=True``).
        num_evaluations: loss evaluations of the backtracking search.
        num_matvecs: curvature products (eigenvalue run).
        detection: the :class:`NegativeCurvature` found.
    """

    delta: Tensor
    direction: Tensor
    step_size: float
    lambda_min: float
    loss_before: float
    loss_after: float
    predicted_change: float
    accepted: bool
    applied: bool
    num_evaluations: int
    num_matvecs: int
    detection: NegativeCurvature


def _loss_oracle(op: LinearOperator):
    """``(loss0, gradient, loss_at(delta), apply(delta))`` for supported operators."""
    if isinstance(op, FunctionHessianOperator):
        x = op.x.detach()

        def loss_at(delta: Tensor) -> Tensor:
            with torch.no_grad():
                return op.f(x + delta.view_as(x)).reshape(())

        return op.value, op.gradient, loss_at, None
    if isinstance(op, CurvatureOperator):
        ob = op.objective
        loss0, g = ob.value_and_grad()

        def loss_at(delta: Tensor) -> Tensor:
            with perturbed_parameters(ob.params) as set_delta:
                set_delta(delta)
                return ob.loss()

        def apply(delta: Tensor) -> None:
            i = 0
            with torch.no_grad():
                for p in ob.params.values():
                    m = p.numel()
                    p.add_(delta[i : i + m].view_as(p))
                    i += m

        return loss0, g, loss_at, apply
    raise TypeError(
        "escape_step needs a curvature operator (hesse.HessianOperator, ...) or "
        f"hesse.hessian_of(f, x); got {type(op).__name__}."
    )


def escape_step(
    op: Any,
    *,
    step_size: float = 1.0,
    max_backtracks: int = 20,
    c: float = 0.5,
    apply: bool = True,
    rtol: float = 1e-3,
    atol: float = 0.0,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EscapeStep:
    """Escape a saddle: step along the most negative eigenvector, with backtracking.

    Finds ``lambda_min`` and its unit eigenvector ``v`` (:func:`detect_negative_curvature`),
    orients it downhill (``g^T d <= 0``) and tries ``alpha = step_size, step_size / 2, ...``
    until the actual decrease is at least ``c`` times the quadratic model's prediction,

    .. math::
        L(\\theta + \\alpha d) - L(\\theta) \\le c\\,\\big(\\alpha\\, g^\\top d
            + \\tfrac12 \\alpha^2 \\lambda_{\\min}\\big) < 0 .

    If the curvature is not significantly negative, or no step is accepted, nothing changes
    (``accepted=False``).

    Cost: one both-ends Lanczos run, one gradient, and up to ``max_backtracks + 1`` loss
    evaluations.

    Args:
        op: a :class:`hesse.CurvatureOperator` (e.g. ``HessianOperator(model, loss, data)``;
            with ``apply=True`` the model's parameters are moved in place) or
            ``hesse.hessian_of(f, x)`` (then use ``x + result.delta.view_as(x)``).
        step_size: first trial ``alpha`` (in parameter units).
        max_backtracks: halvings of ``alpha`` before giving up.
        c: sufficient-decrease fraction in ``(0, 1)``.
        apply: update the model's parameters (curvature operators only).
        rtol, atol, tol, v0, generator: as in :func:`detect_negative_curvature`.

    Returns:
        :class:`EscapeStep`.

    Example:
        ``f(w) = w1^2 - w2^2 + w2^4 / 4`` has a saddle at 0 and minima ``f = -1`` at
        ``w2 = +-sqrt(2)``. Gradient descent started at ``(0.3, 1e-8)`` with ``lr = 0.1`` is
        still at ``f ~ 0`` after 50 steps; one escape step (``alpha = 1``) reaches
        ``f = -0.75`` and gradient descent then converges to ``-1``.
    """
    step_size = check_positive(step_size, "step_size")
    max_backtracks = check_int(max_backtracks, "max_backtracks", minimum=0)
    if not (0.0 < c < 1.0):
        raise ValueError(f"Invalid c={c!r}; must lie in (0, 1).")
    loss0, g, loss_at, do_apply = _loss_oracle(op)
    det = detect_negative_curvature(op, rtol=rtol, atol=atol, tol=tol, v0=v0, generator=generator)
    d = det.eigenvector
    slope = float(g @ d)
    if slope > 0:
        d, slope = -d, -slope
    zero = torch.zeros_like(d)
    l0 = float(loss0)
    if not det.is_negative:
        return EscapeStep(
            zero, d, 0.0, det.lambda_min, l0, l0, 0.0, False, False, 0, det.num_matvecs, det
        )
    alpha = step_size
    evals = 0
    for _ in range(max_backtracks + 1):
        pred = alpha * slope + 0.5 * alpha**2 * det.lambda_min
        new = float(loss_at(alpha * d))
        evals += 1
        if new - l0 <= c * pred:
            delta = alpha * d
            applied = False
            if apply and do_apply is not None:
                do_apply(delta)
                applied = True
            return EscapeStep(
                delta,
                d,
                alpha,
                det.lambda_min,
                l0,
                new,
                pred,
                True,
                applied,
                evals,
                det.num_matvecs,
                det,
            )
        alpha *= 0.5
    return EscapeStep(
        zero, d, 0.0, det.lambda_min, l0, l0, 0.0, False, False, evals, det.num_matvecs, det
    )
