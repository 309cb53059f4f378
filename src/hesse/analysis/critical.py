"""Critical points, the second-order stopping rule, spectrum summaries and step-size limits.

All of these compose :func:`hesse.top_eigenpairs` and :func:`hesse.spectral_density`; none
re-implements an eigen-solver. Small problems (``n <= dense_max``) are decided exactly with
``torch.linalg.eigh`` of the dense matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_nonnegative, check_positive
from ..linalg import EigenResult, SpectralDensity, spectral_density, top_eigenpairs
from ..operators.base import LinearOperator, aslinearoperator
from ..operators.curvature import CurvatureOperator
from ..operators.function import hessian_of

__all__ = [
    "CriticalPoint",
    "StoppingRule",
    "SpectrumSummary",
    "LRBound",
    "TaylorCheck",
    "classify_critical_point",
    "stopping_rule",
    "spectrum_summary",
    "max_stable_lr",
    "layer_max_stable_lr",
    "taylor_check",
]

DENSE_MAX = 64  # decide exactly with eigh below this size


@dataclass(frozen=True)
class CriticalPoint:
    """What kind of point the parameters sit at, with the evidence.

    Attributes:
        kind: ``"minimum"``, ``"maximum"``, ``"saddle"``, ``"degenerate"`` (gradient small but
            some curvature within ``+-threshold`` of zero and none beyond on the other side)
            or ``"not_critical"`` (gradient larger than ``grad_tol``).
        gradient_norm: ``||g||``.
        lambda_min, lambda_max: extreme eigenvalues.
        threshold: eigenvalues within ``+-threshold`` count as zero
            (``eig_tol * max(|lambda_min|, |lambda_max|)``).
        negative_fraction: estimated fraction of eigenvalues below ``-threshold`` (exact for
            small problems, from the spectral density otherwise), with ``negative_stderr``.
        index: estimated count of negative eigenvalues (``negative_fraction * n``; the Morse
            index at a nondegenerate saddle).
        escape_direction: ``(n,)`` unit eigenvector of ``lambda_min`` (the direction to leave
            a saddle along), ``None`` when ``lambda_min >= 0``.
        grad_tol, eig_tol: tolerances used.
        num_matvecs: curvature products used.
        exact: decided with a dense eigendecomposition.
    """

    kind: str
    gradient_norm: float
    lambda_min: float
    lambda_max: float
    threshold: float
    negative_fraction: float
    negative_stderr: float
    index: float
    escape_direction: Tensor | None
    grad_tol: float
    eig_tol: float
    num_matvecs: int
    exact: bool

    @property
    def is_critical(self) -> bool:
        return self.kind != "not_critical"


def _extremes(
    A: LinearOperator, tol: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """``(eigenvalues used, (lambda_min, lambda_max), v_min, exact)``."""
    n = A.shape[0]
    if n <= DENSE_MAX:
        D = A.to_dense()
        evals, evecs = torch.linalg.eigh(0.5 * (D + D.T))
        return evals, torch.stack([evals[0], evals[-1]]), evecs[:, 0], True
    res = top_eigenpairs(A, k=1, which="both_ends", tol=tol, generator=generator)
    lam_max, lam_min = res.eigenvalues[0], res.eigenvalues[1]
    return res.eigenvalues, torch.stack([lam_min, lam_max]), res.eigenvectors[:, 1], False


def classify_critical_point(
    f: Callable[[Tensor], Tensor] | LinearOperator,
    x: Tensor | None = None,
    *,
    grad_tol: float = 1e-5,
    eig_tol: float = 1e-6,
    gradient: Tensor | None = None,
    density: SpectralDensity | None = None,
    tol: float = 1e-4,
    extremes: tuple[EigenResult, EigenResult] | None = None,
    generator: torch.Generator | None = None,
) -> CriticalPoint:
    """Classify the point as a minimum, maximum, saddle or degenerate critical point.

    With gradient ``g`` and the extreme eigenvalues of the Hessian ``H``,
    ``tau = eig_tol * max(|lambda_min|, |lambda_max|)``:

    * ``||g|| > grad_tol``: ``"not_critical"``;
    * ``lambda_min > tau``: ``"minimum"`` (``H`` positive definite);
    * ``lambda_max < -tau``: ``"maximum"``;
    * ``lambda_min < -tau < tau < lambda_max``: ``"saddle"``;
    * otherwise ``"degenerate"`` (semi-definite: the second-order test is inconclusive).

    Args:
        f: a scalar function of one tensor (then ``x`` is the point) or a curvature operator
            of a model (``hesse.HessianOperator``: its ``gradient()`` is used) or any
            symmetric operator with ``gradient`` given.
        x: the point, for a plain function.
        grad_tol: absolute tolerance on ``||g||``.
        eig_tol: relative tolerance for "zero" curvature.
        gradient: the gradient, when ``f`` is an operator without ``gradient()``.
        density: a :func:`hesse.spectral_density` of the operator, for the negative fraction
            of a large problem (computed with 4 probes x 32 steps if not given and needed).
        tol: Lanczos eigenvalue tolerance for large problems.
        extremes: ``(largest, smallest)`` :class:`EigenResult` already computed (then no
            eigen-solve is run).
        generator: randomness for Lanczos/SLQ.

    Returns:
        :class:`CriticalPoint`.

    Example:
        >>> f = lambda w: w[0] ** 3 - 3 * w[0] - w[1] ** 2
        >>> classify_critical_point(f, torch.tensor([1.0, 0.0], dtype=torch.float64)).kind
        'saddle'
    """
    grad_tol = check_nonnegative(grad_tol, "grad_tol")
    eig_tol = check_nonnegative(eig_tol, "eig_tol")
    if isinstance(f, (LinearOperator, Tensor)):
        A = aslinearoperator(f)
        if gradient is None:
            if not isinstance(A, CurvatureOperator) and not hasattr(A, "gradient"):
                raise TypeError(
                    "Pass gradient=... for an operator that is not a model's curvature operator."
                )
            gradient = A.gradient() if callable(A.gradient) else A.gradient
    else:
        if x is None:
            raise TypeError(
                "classify_critical_point(f, x): the point x is required for a function."
            )
        A = hessian_of(f, x)
        gradient = A.gradient
    gnorm = float(torch.linalg.vector_norm(gradient))
    before = A.num_matvecs
    if extremes is not None:
        largest, smallest = extremes
        evals, exact = None, False
        lam_min, lam_max = smallest.eigenvalues[0], largest.eigenvalues[0]
        vmin = smallest.eigenvectors[:, 0]
    else:
        evals, (lam_min, lam_max), vmin, exact = _extremes(A, tol, generator)
    lam_min, lam_max = float(lam_min), float(lam_max)
    thr = eig_tol * max(abs(lam_min), abs(lam_max))
    n = A.shape[0]
    if exact:
        neg_frac, neg_err = float((evals < -thr).double().mean()), 0.0
    elif lam_min >= -thr:
        neg_frac, neg_err = 0.0, 0.0
    else:
        if density is None:
            density = spectral_density(A, num_probes=4, num_steps=32, generator=generator)
        per_probe = ((density.nodes < -thr).to(density.weights.dtype) * density.weights).sum(1)
        neg_frac = float(per_probe.mean())
        neg_err = (
            float(per_probe.std() / math.sqrt(per_probe.numel()))
            if per_probe.numel() > 1
            else float("nan")
        )
    if gnorm > grad_tol:
        kind = "not_critical"
    elif lam_min > thr:
        kind = "minimum"
    elif lam_max < -thr:
        kind = "maximum"
    elif lam_min < -thr and lam_max > thr:
        kind = "saddle"
    else:
        kind = "degenerate"
    return CriticalPoint(
        kind=kind,
        gradient_norm=gnorm,
        lambda_min=lam_min,
        lambda_max=lam_max,
        threshold=thr,
        negative_fraction=neg_frac,
        negative_stderr=neg_err,
        index=neg_frac * n,
        escape_direction=vmin if lam_min < -thr else None,
        grad_tol=grad_tol,
        eig_tol=eig_tol,
        num_matvecs=A.num_matvecs - before,
        exact=exact,
    )


@dataclass(frozen=True)
class StoppingRule:
    """The second-order stopping rule: small gradient AND positive semi-definite Hessian.

    Attributes:
        converged: ``gradient_small and hessian_psd``.
        gradient_small: ``||g|| <= grad_tol``.
        hessian_psd: ``lambda_min >= -eig_tol * max(|lambda|)``.
        gradient_norm, lambda_min, lambda_max: the evidence.
        reason: one line saying why (not) converged.
    """

    converged: bool
    gradient_small: bool
    hessian_psd: bool
    gradient_norm: float
    lambda_min: float
    lambda_max: float
    reason: str


def stopping_rule(
    f: Any, x: Tensor | None = None, *, grad_tol: float = 1e-5, eig_tol: float = 1e-6, **kwargs: Any
) -> StoppingRule:
    """Converged only if ``||g|| <= grad_tol`` AND ``H`` is PSD to tolerance.

    A small gradient alone also holds at saddles and maxima, which first-order methods cannot
    tell apart from minima (Nocedal & Wright 2006, Thm. 2.3-2.4: second-order necessary
    conditions). Arguments as in :func:`classify_critical_point`.
    """
    cp = classify_critical_point(f, x, grad_tol=grad_tol, eig_tol=eig_tol, **kwargs)
    small = cp.gradient_norm <= grad_tol
    psd = cp.lambda_min >= -cp.threshold
    if small and psd:
        reason = "gradient small and Hessian positive semi-definite"
    elif not small:
        reason = f"gradient norm {cp.gradient_norm:.3g} > grad_tol {grad_tol:.3g}"
    else:
        reason = (
            f"negative curvature lambda_min = {cp.lambda_min:.3g} "
            f"(saddle or maximum): not a minimum"
        )
    return StoppingRule(
        small and psd, small, psd, cp.gradient_norm, cp.lambda_min, cp.lambda_max, reason
    )


@dataclass(frozen=True)
class SpectrumSummary:
    """Scalar summaries of a spectrum estimated by SLQ (plus exact extremes).

    Attributes:
        lambda_max, lambda_min: extreme eigenvalues (Lanczos).
        trace, trace_stderr: from the density's quadrature.
        condition_number: ``lambda_max / lambda_+`` of the positive part, ``lambda_+`` the
            smallest Ritz node above the null threshold (an estimate: SLQ resolves the bottom
            of the bulk only to its node spacing).
        effective_rank: ``exp(entropy)`` of ``p_i = |lambda_i| / sum_j |lambda_j|`` (Roy &
            Vetterli 2007), from the quadrature.
        near_null_fraction: fraction of eigenvalues with ``|lambda| <= null_tol * lambda_max``.
        negative_fraction: fraction below ``-null_tol * lambda_max``.
        null_tol: the relative threshold used.
        *_stderr: standard errors across SLQ probes.
    """

    lambda_max: float
    lambda_min: float
    trace: float
    trace_stderr: float
    condition_number: float
    effective_rank: float
    effective_rank_stderr: float
    near_null_fraction: float
    near_null_stderr: float
    negative_fraction: float
    negative_stderr: float
    null_tol: float


def _mean_err(x: Tensor) -> tuple[float, float]:
    m = float(x.mean())
    e = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return m, e


def spectrum_summary(
    density: SpectralDensity, extremes: EigenResult | None = None, *, null_tol: float = 1e-3
) -> SpectrumSummary:
    """Condition number, effective rank and near-null fraction from an SLQ density.

    Args:
        density: a :func:`hesse.spectral_density` result.
        extremes: a ``which="both_ends"`` :class:`EigenResult` for exact extremes (else the
            extreme Ritz nodes are used).
        null_tol: eigenvalues within ``null_tol * lambda_max`` of zero count as null.
    """
    null_tol = check_positive(null_tol, "null_tol")
    nodes, w = density.nodes.double(), density.weights.double()
    if extremes is not None and extremes.which == "both_ends":
        k = extremes.eigenvalues.numel() // 2
        lam_max, lam_min = float(extremes.eigenvalues[0]), float(extremes.eigenvalues[k])
    else:
        lam_max, lam_min = float(nodes.max()), float(nodes.min())
    thr = null_tol * max(abs(lam_max), 1e-300)
    near = ((nodes.abs() <= thr).double() * w).sum(1)
    neg = ((nodes < -thr).double() * w).sum(1)
    mag = nodes.abs()
    total = (mag * w).sum(1, keepdim=True)  # (1/n) sum |lambda| per probe
    n = density.n
    p = mag / (n * total).clamp_min(1e-300)  # p_i = |lambda_i| / sum |lambda|
    ent = -(w * n * torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), 0.0)).sum(1)
    pos = nodes[(nodes > thr) & (w > 0)]
    lam_plus = float(pos.min()) if pos.numel() else float("nan")
    return SpectrumSummary(
        lambda_max=lam_max,
        lambda_min=lam_min,
        trace=float(density.trace),
        trace_stderr=float(density.trace_stderr),
        condition_number=lam_max / lam_plus if pos.numel() else float("inf"),
        effective_rank=_mean_err(torch.exp(ent))[0],
        effective_rank_stderr=_mean_err(torch.exp(ent))[1],
        near_null_fraction=_mean_err(near)[0],
        near_null_stderr=_mean_err(near)[1],
        negative_fraction=_mean_err(neg)[0],
        negative_stderr=_mean_err(neg)[1],
        null_tol=null_tol,
    )


@dataclass(frozen=True)
class LRBound:
    """The gradient-descent speed limit ``eta < 2 / lambda_max``.

    Attributes:
        value: ``2 / lambda_max`` (``inf`` if ``lambda_max <= 0``).
        lambda_max: the eigenvalue it came from.
        eigen: the :class:`EigenResult` (residuals, HVP count).
    """

    value: float
    lambda_max: float
    eigen: EigenResult

    def recommended(self, safety: float = 0.5) -> float:
        """``safety * 2 / lambda_max`` (a margin below the edge)."""
        return safety * self.value


def max_stable_lr(
    op: Any,
    *,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LRBound:
    """Largest stable gradient-descent step on the local quadratic model, ``2 / lambda_max``.

    On ``q(theta) = g^T theta + theta^T H theta / 2`` gradient descent multiplies the error
    along eigenvector ``i`` by ``1 - eta lambda_i`` per step, which shrinks iff
    ``0 < eta < 2 / lambda_i``: the largest eigenvalue sets the speed limit.

    Args:
        op: symmetric curvature operator or dense tensor.
        tol, v0, generator: passed to :func:`hesse.top_eigenpairs`.

    Example:
        >>> max_stable_lr(torch.diag(torch.tensor([4.0, 1.0, 0.5]))).value
        0.5...
    """
    res = top_eigenpairs(op, k=1, which="largest", tol=tol, v0=v0, generator=generator)
    lam = float(res.eigenvalues[0])
    return LRBound(2.0 / lam if lam > 0 else math.inf, lam, res)


def layer_max_stable_lr(
    op: CurvatureOperator, *, tol: float = 1e-3, generator: torch.Generator | None = None
) -> dict[str, LRBound]:
    """``2 / lambda_max`` of every layer's diagonal Hessian block (per-layer learning rates).

    The block ``H_ll`` is the curvature seen by a step that moves only layer ``l``; layer-wise
    learning rates ``eta_l < 2 / lambda_max(H_ll)`` (e.g. ``0.5 * value`` each) follow it.
    Note that a joint step can still be unstable: ``lambda_max(H) >= max_l lambda_max(H_ll)``.
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            "layer_max_stable_lr needs a model curvature operator "
            f"(HessianOperator/GGNOperator/FisherOperator), got {type(op).__name__}."
        )
    out = {}
    for name, block in op.layer_blocks().items():
        if block.shape[0] <= 2:
            D = block.to_dense()
            evals, evecs = torch.linalg.eigh(0.5 * (D + D.T))
            res = EigenResult(
                evals[-1:],
                evecs[:, -1:],
                torch.zeros(1, dtype=D.dtype),
                torch.zeros(1, dtype=D.dtype),
                block.shape[0],
                True,
                "largest",
                tol,
            )
            lam = float(evals[-1])
            out[name] = LRBound(2.0 / lam if lam > 0 else math.inf, lam, res)
        else:
            out[name] = max_stable_lr(block, tol=tol, generator=generator)
    return out


@dataclass(frozen=True)
class TaylorCheck:
    """Second-order Taylor model vs the actual loss change along a direction.

    Attributes:
        steps: ``(m,)`` step lengths ``alpha``.
        actual: ``(m,)`` ``L(theta + alpha d) - L(theta)``.
        predicted: ``(m,)`` ``alpha g^T d + alpha^2 / 2 d^T H d``.
        first_order: ``(m,)`` ``alpha g^T d``.
        relative_error: ``(m,)`` ``|actual - predicted| / max(|actual|, tiny)``.
    """

    steps: Tensor
    actual: Tensor
    predicted: Tensor
    first_order: Tensor
    relative_error: Tensor


def taylor_check(
    model: Any,
    loss_fn: Any,
    data: Any,
    direction: Any,
    *,
    steps: Any = (1e-3, 1e-2, 1e-1),
    **kwargs: Any,
) -> TaylorCheck:
    """Compare the quadratic model's predicted loss change with the actual one.

    The error of the second-order model is ``O(alpha^3)``: its relative error should fall
    about 100x per 10x shorter step until round-off takes over. Uses
    :func:`hesse.analysis.loss_slice` (same arguments in ``kwargs``).
    """
    from .landscape import loss_slice

    rows = []
    for a in steps:
        s = loss_slice(model, loss_fn, data, direction, radius=float(a), num_points=3, **kwargs)
        rows.append(
            (
                s.alphas[-1],
                s.losses[-1] - s.loss0,
                s.quadratic[-1] - s.loss0,
                s.alphas[-1] * s.slope,
            )
        )
    steps_t, actual, pred, first = (
        torch.stack([torch.as_tensor(r[i]) for r in rows]) for i in range(4)
    )
    rel = (actual - pred).abs() / actual.abs().clamp_min(torch.finfo(actual.dtype).tiny)
    return TaylorCheck(steps_t, actual, pred, first, rel)
