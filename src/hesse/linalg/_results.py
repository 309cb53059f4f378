"""Frozen result objects of the linalg algorithms, and their :class:`Status`.

Every result derives from :class:`hesse._serialize.Serializable`: ``to_dict()`` /
``from_dict()`` and ``save(path)`` / ``load(path)`` round-trip it exactly through plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from .._serialize import Serializable, register

__all__ = [
    "Status",
    "CGStatus",
    "EigenResult",
    "SpectralDensity",
    "TraceResult",
    "DiagonalResult",
    "CGResult",
    "gaussian_smoothing",
]


class Status(str, Enum):
    """Why an algorithm stopped (one enum for every solver; users may compare with strings).

    ``max_iters`` (the budget ran out) is a status, not an error: a truncated solve or a
    partial Lanczos run is still a valid, usable result.
    """

    CONVERGED = "converged"  # the tolerance was met
    MAX_ITERS = "max_iters"  # budget exhausted (truncation)
    NEGATIVE_CURVATURE = "negative_curvature"  # p^T (A + damping I) p <= 0 met by CG
    BOUNDARY = "boundary"  # Steihaug-Toint: the step reached the trust-region radius
    CALLBACK = "callback"  # the callback asked to stop
    BREAKDOWN = "breakdown"  # MINRES: Krylov space exhausted without meeting tol (singular)


CGStatus = Status  # the name used by cg_solve / minres_solve before Status existed
register(Status)


def _status(converged: bool) -> Status:
    return Status.CONVERGED if converged else Status.MAX_ITERS


@dataclass(frozen=True, eq=False)
class EigenResult(Serializable):
    """Eigenpairs found by an iterative method.

    Attributes:
        eigenvalues: ``(k,)``, ordered by ``which``: ``"largest"`` descending, ``"smallest"``
            ascending, ``"both_ends"`` is ``(2k,)`` with the ``k`` largest first (descending)
            then the ``k`` smallest (ascending); ``"largest_magnitude"`` (power iteration)
            ``(1,)``.
        eigenvectors: ``(n, k)`` unit columns matching ``eigenvalues``.
        residual_norms: ``(k,)`` true residuals ``||A y_i - theta_i y_i||`` (recomputed from
            stored products, not estimated).
        error_bounds: ``(k,)`` estimated eigenvalue errors ``min(r_i, r_i^2 / gap_i)``.
        num_matvecs: products with ``A`` (a block of ``k`` columns counts ``k``).
        converged: every requested pair met the tolerance.
        which: the end of the spectrum that was requested.
        tol: the tolerance that was requested.
        criterion: ``"eigenvalue"`` or ``"residual"`` (what ``tol`` bounds).
        num_restarts: thick restarts performed (0 for power iteration).
        converged_mask: ``(k,)`` bool, per pair.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    error_bounds: Tensor
    num_matvecs: int
    converged: bool
    which: str
    tol: float
    criterion: str = "eigenvalue"
    num_restarts: int = 0
    converged_mask: Tensor | None = None

    @property
    def status(self) -> Status:
        """``Status.CONVERGED`` or ``Status.MAX_ITERS`` (the budget ran out first)."""
        return _status(self.converged)

    def __repr__(self) -> str:
        vals = ", ".join(f"{float(v):.6g}" for v in self.eigenvalues[:6])
        more = ", ..." if self.eigenvalues.numel() > 6 else ""
        return (
            f"EigenResult(which={self.which!r}, eigenvalues=[{vals}{more}], "
            f"max_residual={float(self.residual_norms.max()):.3g}, "
            f"num_matvecs={self.num_matvecs}, converged={self.converged})"
        )


def gaussian_smoothing(
    nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float
) -> tuple[Tensor, Tensor]:
    """Per-probe Gaussian-smoothed densities ``(p, g)`` and their mean ``(g,)``.

    .. math:: \\phi_p(t) = \\sum_j w_{pj} \\frac{1}{\\sigma\\sqrt{2\\pi}}
        \\exp\\Big(-\\frac{(t - \\theta_{pj})^2}{2\\sigma^2}\\Big)
    """
    z = (grid.reshape(1, 1, -1) - nodes.unsqueeze(-1)) / sigma  # (p, m, g)
    kern = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    per_probe = (weights.unsqueeze(-1) * kern).sum(1)
    return per_probe, per_probe.mean(0)


@dataclass(frozen=True, eq=False)
class SpectralDensity(Serializable):
    """Spectral density estimated by stochastic Lanczos quadrature (SLQ).

    Attributes:
        grid: ``(g,)`` evaluation points: eigenvalues (linear scale) or ``log10(lambda)``
            (``log_scale=True``).
        density: ``(g,)`` the smoothed density (mean over probes). On the linear scale it
            integrates to 1; on the log scale it integrates to the fraction of the spectrum
            above ``log_floor`` (the positive part).
        density_stderr: ``(g,)`` standard error of the mean across probes.
        nodes: ``(num_probes, k + num_steps)`` quadrature nodes per probe: the ``k`` deflated
            eigenvalues (if any) then the Ritz values of the probe's Lanczos run.
        weights: same shape; quadrature weights, each row sums to 1 (deflated eigenvalues
            get ``1/n``). A probe whose Krylov space became invariant early is padded with
            zero weights (its last node repeated).
        sigma: smoothing width (in eigenvalue units, or decades on the log scale).
        log_scale: whether ``grid``/``density`` are over ``log10(lambda)``.
        log_floor: eigenvalues ``<= log_floor`` are left out of the log-scale density.
        trace: implied trace ``n * mean_p sum_j w_pj theta_pj``.
        trace_stderr: its standard error across probes.
        n: operator size.
        num_matvecs: products with the operator.
        num_probes, num_steps: the budget used.
        converged: every probe ran its steps (``False`` for a partial result).
        psd: the operator is positive semi-definite by construction (a GGN or Fisher), so
            negative nodes are rounding, not negative curvature.
    """

    grid: Tensor
    density: Tensor
    density_stderr: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    log_scale: bool
    log_floor: float
    trace: Tensor
    trace_stderr: Tensor
    n: int
    num_matvecs: int
    num_probes: int
    num_steps: int
    converged: bool = True
    psd: bool = False

    @property
    def status(self) -> Status:
        """``Status.CONVERGED`` or ``Status.MAX_ITERS`` (the budget ran out first)."""
        return _status(self.converged)

    def smooth(
        self,
        grid: Tensor | None = None,
        sigma: float | None = None,
        *,
        log_scale: bool = False,
        log_floor: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Re-smooth the stored quadrature (no new products): ``(grid, density, stderr)``.

        Args:
            grid: points (eigenvalues, or ``log10`` values when ``log_scale``); default a
                1024-point grid over the nodes' range with a margin of ``3 sigma``.
            sigma: kernel width; default 1/200 of the range (linear) or 0.05 decades (log).
            log_scale: smooth ``log10(theta)`` over the nodes above ``log_floor``.
            log_floor: default the one stored in this result.
        """
        floor = self.log_floor if log_floor is None else float(log_floor)
        g, d, e, _ = _smooth(self.nodes, self.weights, grid, sigma, log_scale, floor, 1024)
        return g, d, e

    def cdf(self, x: Tensor) -> Tensor:
        """Cumulative spectral distribution ``F(x) = mean_p sum_j w_pj [theta_pj <= x]``."""
        x = torch.as_tensor(x, dtype=self.nodes.dtype)
        ind = (self.nodes.unsqueeze(-1) <= x.reshape(1, 1, -1)).to(self.weights.dtype)
        return (self.weights.unsqueeze(-1) * ind).sum(1).mean(0).reshape(x.shape)

    def wasserstein_distance(self, eigenvalues: Tensor) -> float:
        """Wasserstein-1 distance between this estimate and the uniform measure on
        ``eigenvalues`` (e.g. an exact ``eigvalsh``): ``int |F_slq(x) - F(x)| dx``.
        Divide by ``eigenvalues.max() - eigenvalues.min()`` for the relative distance."""
        lam = torch.as_tensor(eigenvalues).to(torch.float64).reshape(-1)
        nodes = self.nodes.to(torch.float64).reshape(-1)
        w = (self.weights.to(torch.float64) / self.weights.shape[0]).reshape(-1)
        pts = torch.cat([lam, nodes])
        mass = torch.cat([-torch.full_like(lam, 1.0 / lam.numel()), w])
        order = torch.argsort(pts)
        pts, mass = pts[order], mass[order]
        cum = torch.cumsum(mass, 0)[:-1]
        return float((cum.abs() * (pts[1:] - pts[:-1])).sum())

    def __repr__(self) -> str:
        return (
            f"SpectralDensity(n={self.n}, num_probes={self.num_probes}, "
            f"num_steps={self.num_steps}, trace={float(self.trace):.6g} "
            f"+- {float(self.trace_stderr):.2g}, log_scale={self.log_scale}, "
            f"num_matvecs={self.num_matvecs})"
        )


def _smooth(
    nodes: Tensor,
    weights: Tensor,
    grid: Tensor | None,
    sigma: float | None,
    log_scale: bool,
    log_floor: float,
    num_grid: int,
) -> tuple[Tensor, Tensor, Tensor, float]:
    nodes = nodes.to(torch.float64)
    weights = weights.to(torch.float64)
    if log_scale:
        keep = nodes > log_floor
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        nodes = torch.log10(
            torch.where(keep, nodes, torch.full_like(nodes, max(log_floor, 1e-300)))
        )
        if sigma is None:
            sigma = 0.05
        live = nodes[keep] if bool(keep.any()) else torch.zeros(1, dtype=torch.float64)
    else:
        live = nodes[weights > 0] if bool((weights > 0).any()) else nodes.reshape(-1)
    lo, hi = float(live.min()), float(live.max())
    if sigma is None:
        sigma = max(hi - lo, abs(hi), 1e-12) / 200.0
    sigma = float(sigma)
    if grid is None:
        grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, num_grid, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid).to(torch.float64)
    per_probe, mean = gaussian_smoothing(nodes, weights, grid, sigma)
    p = per_probe.shape[0]
    if p > 1:
        stderr = per_probe.std(0, unbiased=True) / math.sqrt(p)
    else:
        stderr = torch.full_like(mean, float("nan"))
    return grid, mean, stderr, sigma


@dataclass(frozen=True)
class TraceResult(Serializable):
    r"""A trace estimate.

    Attributes:
        estimate: 0-d tensor, the estimate of :math:`\operatorname{tr}(A)`.
        stderr: 0-d tensor, its standard error: the standard deviation of the per-probe
            estimates over the square root of their number (for XTrace plus the jackknife
            variance of its low-rank parts, see :func:`hesse.xtrace`); ``0`` when exact,
            ``nan`` with a single probe.
        num_matvecs: products with ``A`` used (columns of all blocks).
        method: ``"hutchinson"``, ``"hutchpp"``, ``"xtrace"`` or ``"exact"``.
        samples: the per-probe estimates whose mean is ``estimate`` (for Hutch++ the exact
            low-rank part is added to each), shape ``(m,)``.
        exact: ``True`` when the budget covered all ``n`` directions and the trace is exact.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str
    samples: Tensor
    exact: bool = False

    @property
    def converged(self) -> bool:
        """Estimators always spend their whole budget; ``True`` unless the result is partial."""
        return bool(torch.isfinite(self.estimate))

    @property
    def status(self) -> Status:
        """``Status.CONVERGED`` or ``Status.MAX_ITERS`` (the budget ran out first)."""
        return _status(self.converged)

    def __float__(self) -> float:
        return float(self.estimate)


@dataclass(frozen=True)
class DiagonalResult(Serializable):
    """An estimate of :math:`\\operatorname{diag}(A)`.

    Attributes:
        estimate: ``(n,)``.
        stderr: ``(n,)`` per-entry standard errors (zeros when exact).
        num_matvecs: products with ``A`` used.
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        exact: ``True`` for :func:`exact_diagonal`.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int
    method: str
    exact: bool = False

    @property
    def converged(self) -> bool:
        return bool(torch.isfinite(self.estimate).all())

    @property
    def status(self) -> Status:
        """``Status.CONVERGED`` or ``Status.MAX_ITERS`` (the budget ran out first)."""
        return _status(self.converged)


@dataclass(frozen=True, eq=False)
class CGResult(Serializable):
    r"""Result of :func:`cg_solve` or :func:`minres_solve`.

    Attributes:
        solution: ``x`` with the shape of ``b``.
        converged: every column met ``tol``.
        status: a :class:`Status` value (for a block, the first column's status that is not
            ``"converged"``, else ``"converged"``; see ``statuses``).
        residual_norm: final residual norm, ``()`` or ``(k,)`` (CG: ``||r||`` from the
            recurrence; MINRES: its estimate, in the :math:`M^{-1}`-norm when preconditioned).
        residual_norms: history, ``(num_iters + 1,)`` or ``(num_iters + 1, k)`` (a finished
            column keeps its last value).
        num_iters: iterations run (the most over the columns).
        num_matvecs: products with ``A`` (a block of ``k`` active columns counts ``k``).
        statuses: per-column statuses (a tuple of one for ``b`` of shape ``(n,)``).
        direction: CG only, a direction of non-positive curvature ``p`` (shape of ``b``,
            zero columns where none was met), or ``None``.
        curvature: ``p^T (A + damping I) p / ||p||^2`` for those directions (``nan`` where none),
            or ``None``.
        iterates: iterates kept by ``return_iterates``, ``{iteration: x}``, or ``None``.
        method: ``"cg"`` or ``"minres"``.
    """

    solution: Tensor
    converged: bool
    status: str
    residual_norm: Tensor
    residual_norms: Tensor
    num_iters: int
    num_matvecs: int
    statuses: tuple[str, ...]
    direction: Tensor | None = None
    curvature: Tensor | None = None
    iterates: dict[int, Tensor] | None = None
    method: str = "cg"

    def __repr__(self) -> str:
        rn = self.residual_norm
        rn_s = f"{float(rn):.3g}" if rn.ndim == 0 else f"max {float(rn.max()):.3g}"
        return (
            f"CGResult(method={self.method!r}, status={self.status!r}, num_iters="
            f"{self.num_iters}, residual_norm={rn_s}, num_matvecs={self.num_matvecs})"
        )
