"""Critical points, the second-order stopping rule, spectrum summaries and step-size limits.

All of these compose :func:`hesse.top_eigenpairs` and :func:`hesse.spectral_density`; none
re-implements an eigen-solver. Small problems (``n <= dense_max``) are decided exactly with
``torch.linalg.eigh`` of the dense matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_nonnegative, check_positive
from .._serialize import Serializable
from ..linalg import EigenResult, SpectralDensity, spectral_density, top_eigenpairs
from ..linalg.lanczos import default_generator, random_block
from ..operators.base import LinearOperator, aslinearoperator
from ..operators.curvature import CurvatureOperator, SubOperator
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
class CriticalPoint(Serializable):
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
            small problems, from the spectral density otherwise), with ``negative_stderr``
            (spread over the density's probes) and ``negative_resolution``: the quadrature
            cannot tell on which side of ``-threshold`` the mass of its nearest nodes lies
            (a null space or a bulk at the threshold). By the Chebyshev-Markov-Stieltjes
            inequalities each probe's count is within the weight of the node on either
            side of ``-threshold``; ``negative_resolution`` is the mean of the larger one, so
            the error is within about ``2 * negative_stderr + negative_resolution``. Both are
            0 when exact.
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
    negative_resolution: float = 0.0

    @property
    def is_critical(self) -> bool:
        return self.kind != "not_critical"


def _require_hessian(A: Any, what: str) -> None:
    """Refuse a model's GGN/Fisher (``psd=True`` by construction) where the Hessian is needed."""
    base = A
    while isinstance(base, SubOperator):
        base = base.parent
    if isinstance(base, CurvatureOperator) and base.psd:
        raise ValueError(
            f"{what} needs the Hessian, but got a {type(base).__name__}, which is positive "
            "semi-definite by construction (psd=True): it has no negative curvature to find, "
            "so it cannot tell a minimum from a saddle or a maximum. Pass "
            "hesse.HessianOperator(model, loss_fn, data) for this verdict (the GGN/Fisher are "
            "fine for step sizes and spectra)."
        )


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


def _threshold_resolution(nodes: Tensor, weights: Tensor, t: float) -> float:
    """Mean over probes of the larger weight of the two quadrature nodes around ``t``: by the
    Chebyshev-Markov-Stieltjes inequalities, how far each probe's Gauss-quadrature count of
    the mass below ``t`` can be from its spectral measure's."""
    order = nodes.argsort(dim=1)
    x, w = nodes.gather(1, order), weights.gather(1, order).double()
    below = (x < t).sum(1)  # index of the first node at or above t
    idx = torch.arange(x.shape[1], device=x.device)
    near = (idx == (below - 1).unsqueeze(1)) | (idx == below.unsqueeze(1))
    return float((w * near).amax(1).mean())


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
            symmetric operator with ``gradient`` given. A model's GGN/Fisher (``psd=True`` by
            construction) is refused: it cannot show negative curvature.
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
        _require_hessian(A, "classify_critical_point")
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
    neg_res = 0.0
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
        neg_res = _threshold_resolution(density.nodes, density.weights, -thr)
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
        negative_resolution=neg_res,
        index=neg_frac * n,
        escape_direction=vmin if lam_min < -thr else None,
        grad_tol=grad_tol,
        eig_tol=eig_tol,
        num_matvecs=A.num_matvecs - before,
        exact=exact,
    )


@dataclass(frozen=True)
class StoppingRule(Serializable):
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
class SpectrumSummary(Serializable):
    """Scalar summaries of a spectrum estimated by SLQ (plus exact extremes).

    Attributes:
        lambda_max, lambda_min: extreme eigenvalues (Lanczos).
        trace, trace_stderr: from the density's quadrature.
        condition_number: ``lambda_max / lambda_+``, ``lambda_+`` the smallest Ritz node above
            ``condition_threshold`` (an estimate: SLQ resolves the bottom of the bulk only to
            its node spacing). When positive eigenvalues lie at or below the threshold (the
            bulk runs into it), ``lambda_+`` is not resolved: then ``condition_number`` is
            ``lambda_max / condition_threshold`` and ``condition_number_is_lower_bound`` is
            ``True`` (print it as ``"> X"``; a smaller ``null_tol`` resolves more).
        condition_number_is_lower_bound: see ``condition_number``.
        condition_threshold: ``null_tol * |lambda_max|``, the absolute threshold used.
        effective_rank: ``exp(entropy)`` of ``p_i = |lambda_i| / sum_j |lambda_j|`` (Roy &
            Vetterli 2007), from the quadrature.
        near_null_fraction: fraction of eigenvalues with ``|lambda| <= condition_threshold``.
        negative_fraction: fraction below ``-condition_threshold``; ``nan`` for a GGN/Fisher
            density (``psd``: negative eigenvalues are impossible by construction, so the
            spectrum cannot say anything about them), with ``negative_resolution`` (the
            quadrature's own uncertainty at the threshold, as in :class:`CriticalPoint`).
        null_tol: the relative threshold used.
        psd: the density is of an operator that is PSD by construction (GGN, Fisher).
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
    condition_number_is_lower_bound: bool = False
    condition_threshold: float = math.nan
    psd: bool = False
    negative_resolution: float = math.nan

    def condition_number_text(self, fmt: str = ".3g") -> str:
        """``"123"`` or ``"> 1e+03"`` (a lower bound), for printing."""
        text = format(self.condition_number, fmt)
        return f"> {text}" if self.condition_number_is_lower_bound else text


def _mean_err(x: Tensor) -> tuple[float, float]:
    m = float(x.mean())
    e = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return m, e


def spectrum_summary(
    density: SpectralDensity, extremes: EigenResult | None = None, *, null_tol: float = 1e-3
) -> SpectrumSummary:
    """Condition number, effective rank and near-null fraction from an SLQ density.

    With ``tau = null_tol * |lambda_max|`` the condition number is
    ``kappa = lambda_max / lambda_+``, ``lambda_+`` the smallest eigenvalue above ``tau``. If
    the density has mass on positive nodes in ``(z, tau]`` (``z = 1000 eps |lambda_max|``, below
    which a node is numerically zero: a null space, not a small eigenvalue), the positive
    spectrum runs below the threshold and only ``kappa > lambda_max / tau`` is known: the
    result says so (``condition_number_is_lower_bound``) instead of reporting a number capped
    near ``1 / null_tol``.

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
    scale = max(abs(lam_max), 1e-300)
    thr = null_tol * scale
    zero = 1000 * torch.finfo(density.nodes.dtype).eps * scale
    near = ((nodes.abs() <= thr).double() * w).sum(1)
    neg = ((nodes < -thr).double() * w).sum(1)
    small_pos = ((nodes > zero) & (nodes <= thr)).double() * w
    unresolved = float(small_pos.sum(1).mean()) > 0.1 / density.n
    mag = nodes.abs()
    total = (mag * w).sum(1, keepdim=True)  # (1/n) sum |lambda| per probe
    n = density.n
    p = mag / (n * total).clamp_min(1e-300)  # p_i = |lambda_i| / sum |lambda|
    ent = -(w * n * torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), 0.0)).sum(1)
    pos = nodes[(nodes > thr) & (w > 0)]
    if lam_max <= 0:
        kappa = math.nan
    elif unresolved:
        kappa = lam_max / thr
    else:
        kappa = lam_max / float(pos.min()) if pos.numel() else math.inf
    psd = bool(getattr(density, "psd", False))
    neg_frac, neg_err = (math.nan, math.nan) if psd else _mean_err(neg)
    return SpectrumSummary(
        lambda_max=lam_max,
        lambda_min=lam_min,
        trace=float(density.trace),
        trace_stderr=float(density.trace_stderr),
        condition_number=kappa,
        effective_rank=_mean_err(torch.exp(ent))[0],
        effective_rank_stderr=_mean_err(torch.exp(ent))[1],
        near_null_fraction=_mean_err(near)[0],
        near_null_stderr=_mean_err(near)[1],
        negative_fraction=neg_frac,
        negative_stderr=neg_err,
        null_tol=null_tol,
        condition_number_is_lower_bound=bool(unresolved and lam_max > 0),
        condition_threshold=thr,
        psd=psd,
        negative_resolution=math.nan if psd else _threshold_resolution(nodes, w, -thr),
    )


@dataclass(frozen=True)
class LRBound(Serializable):
    """The gradient-descent speed limit ``eta < 2 / lambda_max``, on the safe side.

    Lanczos gives a Ritz value ``theta <= lambda_max`` (so ``2 / theta`` would overshoot the
    limit) and the true residual ``r = ||A y - theta y||`` of its unit Ritz vector ``y``. For
    symmetric ``A`` an eigenvalue lies within ``r`` of ``theta``, and it is the top one unless
    the Krylov space missed the top eigenvalue. :func:`max_stable_lr` makes that unlikely: its
    start vector always has a random component and it trusts a Ritz pair only after 20 products
    (Kuczynski & Wozniakowski 1992: from a random start the top eigenvalue emerges within
    ``O(log(n) / sqrt(eps))`` steps). It is not impossible: no method with fewer than ``n``
    products can exclude an eigenvalue its Krylov space never saw. On adversarial spectra (a
    top cluster of uniformly spaced eigenvalues) the measured worst overshoot of ``value`` was
    0.7% at ``tol=1e-2`` and 0.02% at ``tol=1e-3``; on spectra whose top eigenvalue is 5% above
    the next none was seen. ``value`` uses the upper bound ``theta + r`` (plus
    ``100 eps |theta|`` for rounding), so the true limit lies in ``[value, value_upper]``.

    Attributes:
        value: ``2 / lambda_max_upper``, the conservative limit (``inf`` if it is ``<= 0``).
        lambda_max: the top Ritz value ``theta`` (a lower bound of ``lambda_max``).
        eigen: the :class:`EigenResult` (residuals, HVP count).
        lambda_max_upper: ``theta + error_bound``, the upper bound of ``lambda_max`` used.
        error_bound: the bound added to ``theta``.
        bound: what ``error_bound`` is: ``"residual"`` (``||A y - theta y||`` + rounding) or
            ``"none"`` (an ``LRBound`` built by hand from a bare eigenvalue).
    """

    value: float
    lambda_max: float
    eigen: EigenResult
    lambda_max_upper: float = math.nan
    error_bound: float = math.nan
    bound: str = "none"

    @property
    def value_upper(self) -> float:
        """``2 / theta`` (``theta <= lambda_max``): the true limit is at most this."""
        return 2.0 / self.lambda_max if self.lambda_max > 0 else math.inf

    def recommended(self, safety: float = 0.5) -> float:
        """``safety * value`` (a margin below the edge)."""
        return safety * self.value

    @classmethod
    def from_eigen(cls, eigen: EigenResult) -> LRBound:
        """The bound from a ``which="largest"`` (or ``"both_ends"``) :class:`EigenResult`."""
        if eigen.which not in ("largest", "both_ends", "largest_magnitude"):
            raise ValueError(
                f"LRBound.from_eigen needs the largest eigenvalue, got which={eigen.which!r}."
            )
        theta = float(eigen.eigenvalues[0])
        eps = torch.finfo(eigen.eigenvalues.dtype).eps
        err = float(eigen.residual_norms[0]) + 100 * eps * abs(theta)
        upper = theta + err
        return cls(
            value=2.0 / upper if upper > 0 else math.inf,
            lambda_max=theta,
            eigen=eigen,
            lambda_max_upper=upper,
            error_bound=err,
            bound="residual",
        )


MIN_KRYLOV = 20  # products before a Ritz pair is trusted as the top one (see LRBound)


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
    ``0 < eta < 2 / lambda_i``: the largest eigenvalue sets the speed limit. The returned
    ``value`` is ``2 / (theta + r)`` with ``r`` the Ritz residual (see :class:`LRBound`), so it
    is below the true limit; Lanczos first builds a Krylov space of ``min(n, 20)`` products
    from a random start (so that the top eigenvalue has emerged, not a lower one with a small
    residual), then runs until ``r <= tol * theta`` (``criterion="residual"``), so the value is
    within about ``tol`` of the limit.

    Cost: ``20`` products plus a few, about ``10`` more than a bare ``top_eigenpairs``.

    Args:
        op: symmetric curvature operator or dense tensor.
        tol: relative accuracy of the bound (residual criterion of :func:`hesse.top_eigenpairs`).
        v0: warm start (e.g. the previous top eigenvector); a random vector is always added to
            it, so a ``v0`` orthogonal to the top eigenvector cannot hide it.
        generator: randomness of the start vectors.

    Example:
        >>> b = max_stable_lr(torch.diag(torch.tensor([10.0, 3.0, 0.5], dtype=torch.float64)))
        >>> b.value <= 0.2 <= b.value_upper
        True
    """
    op = aslinearoperator(op)
    n = op.shape[0]
    g = default_generator(generator, op.device)
    rand = random_block(n, 1, op.dtype, op.device, g)
    start = rand if v0 is None else torch.cat([v0.reshape(n, -1), rand], 1)
    # phase 1: a Krylov space of MIN_KRYLOV products (tol below anything reachable)
    pre = top_eigenpairs(
        op,
        k=1,
        tol=1e-300,
        criterion="residual",
        num_matvecs=min(n, MIN_KRYLOV),
        v0=start,
        generator=g,
    )
    warm = torch.cat([pre.eigenvectors, random_block(n, 1, op.dtype, op.device, g)], 1)
    res = top_eigenpairs(op, k=1, tol=tol, v0=warm, generator=g, criterion="residual")
    res = dataclasses.replace(res, num_matvecs=res.num_matvecs + pre.num_matvecs)
    return LRBound.from_eigen(res)


def layer_max_stable_lr(
    op: CurvatureOperator, *, tol: float = 1e-3, generator: torch.Generator | None = None
) -> dict[str, LRBound]:
    """Conservative ``2 / lambda_max`` of every layer's diagonal block (per-layer rates).

    The block ``H_ll`` is the curvature seen by a step that moves only layer ``l``; layer-wise
    learning rates ``eta_l < 2 / lambda_max(H_ll)`` (e.g. ``0.5 * value`` each) follow it.
    Each value is a lower bound of the block's limit, as in :func:`max_stable_lr`.
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
            y = evecs[:, -1:]
            res = EigenResult(
                evals[-1:],
                y,
                torch.linalg.vector_norm(D @ y - evals[-1] * y, dim=0),
                torch.zeros(1, dtype=D.dtype),
                block.shape[0],
                True,
                "largest",
                tol,
            )
            out[name] = LRBound.from_eigen(res)
        else:
            out[name] = max_stable_lr(block, tol=tol, generator=generator)
    return out


@dataclass(frozen=True)
class TaylorCheck(Serializable):
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
