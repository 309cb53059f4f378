"""Trust-region machinery shared by SR1 and Newton: the exact dense subproblem and radius update.

(The truncated-CG (Steihaug-Toint) subproblem is :func:`hesse.linalg.cg_solve` with ``radius``.)

The subproblem

.. math::
    \\min_p\\; m(p) = g^\\top p + \\tfrac12 p^\\top B p
    \\quad \\text{s.t.}\\; \\|p\\| \\le \\Delta

is solved exactly from the eigendecomposition ``B = Q diag(lam) Q^T`` (Nocedal & Wright 2006,
Section 4.3): ``p(mu) = -(B + mu I)^{-1} g`` with ``mu >= max(0, -lam_min)`` chosen by a
safeguarded Newton iteration on the secular equation ``1/Delta - 1/||p(mu)|| = 0``, including
the "hard case". Cost: one ``eigh`` of an ``n x n`` matrix (small ``n`` only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["solve_dense_subproblem", "update_radius"]


def solve_dense_subproblem(
    B: Tensor, g: Tensor, radius: float, *, max_iters: int = 60
) -> tuple[Tensor, float, bool]:
    """Exact trust-region step. Returns ``(p, predicted_reduction, on_boundary)``."""
    if float(g.norm()) == 0.0:
        return torch.zeros_like(g), 0.0, False
    lam, Q = torch.linalg.eigh(B)
    gh = Q.T @ g
    lam_min = float(lam[0])
    scale = max(1.0, float(lam.abs().max()))
    eps = 1e-12 * scale

    def p_of(mu: float) -> Tensor:
        return -gh / (lam + mu)

    if lam_min > eps:
        ph = p_of(0.0)
        if float(ph.norm()) <= radius:
            p = Q @ ph
            return p, _pred(B, g, p), False
    lo = max(0.0, -lam_min + eps)
    # hard case: g has (almost) no component along the bottom eigenvectors
    bottom = lam <= lam_min + eps
    gnorm = float(g.norm())
    if float(gh[bottom].norm()) <= 1e-10 * max(gnorm, 1e-300):
        mu = max(0.0, -lam_min)
        denom = lam + mu
        ph = torch.where(bottom, torch.zeros_like(gh), -gh / torch.where(bottom, 1.0, denom))
        nrm = float(ph.norm())
        if nrm <= radius:
            idx = int(torch.nonzero(bottom)[0])
            tau = math.sqrt(max(radius * radius - nrm * nrm, 0.0))
            ph = ph.clone()
            ph[idx] = ph[idx] + tau
            p = Q @ ph
            return p, _pred(B, g, p), True
    # secular equation: bracket [lo, hi] then safeguarded Newton
    hi = max(lo, 0.0) + gnorm / radius + scale
    mu = lo if lo > 0 else 0.0
    if float(p_of(mu).norm()) <= radius and mu == 0.0:
        mu = 0.0
    else:
        mu = max(mu, lo) + 1e-8 * scale
        for _ in range(max_iters):
            ph = p_of(mu)
            nrm = float(ph.norm())
            if abs(nrm - radius) <= 1e-10 * radius or nrm == 0.0:
                break
            if nrm > radius:
                lo = mu
            else:
                hi = mu
            # Newton step on 1/Delta - 1/||p||
            dn = float((gh * gh / (lam + mu) ** 3).sum()) / nrm  # -d||p||/dmu
            step = (nrm - radius) / radius * (nrm * nrm) / max(dn * nrm, 1e-300)
            new = mu + step
            mu = new if lo < new < hi else 0.5 * (lo + hi)
    p = Q @ p_of(mu)
    return p, _pred(B, g, p), True


def _pred(B: Tensor, g: Tensor, p: Tensor) -> float:
    return -float(g.dot(p) + 0.5 * p.dot(B @ p))


def update_radius(
    radius: float,
    rho: float,
    step_norm: float,
    *,
    max_radius: float,
    eta_shrink: float = 0.25,
    eta_grow: float = 0.75,
) -> float:
    """Nocedal & Wright Algorithm 4.1: shrink on poor agreement, grow at the boundary."""
    if not math.isfinite(rho) or rho < eta_shrink:
        return 0.25 * min(radius, step_norm) if step_norm > 0 else 0.25 * radius
    if rho > eta_grow and step_norm >= 0.99 * radius:
        return min(2.0 * radius, max_radius)
    return radius
