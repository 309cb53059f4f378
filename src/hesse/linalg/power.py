"""Power iteration with deflation, residual-based stopping and warm start."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite, check_int, check_positive, check_vector
from ._results import EigenResult
from .lanczos import as_symmetric_operator, default_generator, random_block

__all__ = ["power_iteration"]


def power_iteration(
    A: Any,
    *,
    num_matvecs: int = 1000,
    tol: float = 1e-3,
    v0: Tensor | None = None,
    deflate: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The eigenpair of largest magnitude by power iteration.

    Iterates ``v <- P A P v / ||P A P v||`` with ``P = I - U U^T`` the projector that removes
    the ``deflate`` basis ``U`` (so it finds the dominant eigenpair of ``A`` restricted to the
    complement of ``span(U)``: pass the top eigenvector to get the second one). It stops on
    the *residual*, not on the change of the Rayleigh quotient:

    .. math::
        \\theta = v^T P A P v, \\qquad \\|P A P v - \\theta v\\| \\le \\mathrm{tol}\\,|\\theta|,

    which also bounds the eigenvalue error by ``min(r, r^2 / gap)``. Convergence is linear
    with ratio ``|lambda_2 / lambda_1|``; :func:`hesse.top_eigenpairs` (Lanczos) needs far
    fewer products and is the default choice. Power iteration is kept as the simple,
    memory-light reference (one vector).

    Cost: one matvec per iteration; memory ``O(n (1 + j))``.

    Args:
        A: symmetric ``LinearOperator`` or dense ``(n, n)`` tensor.
        num_matvecs: budget (default 1000); exhausting it gives ``converged=False``.
        tol: relative residual tolerance (default ``1e-3``), ``> 0``.
        v0: warm start ``(n,)``.
        deflate: ``(n,)`` or ``(n, j)`` vectors to project out (orthonormalised here).
        generator: randomness of the default start (``None``: a fresh seed).

    Returns:
        :class:`EigenResult` with ``which="largest_magnitude"`` and one pair.

    Raises:
        ValueError: non-square/non-symmetric operator, ``tol <= 0``, bad shapes.
        NonFiniteError: a product held NaN/inf; ``.partial`` is the current estimate.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64))
        >>> e1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> g = torch.Generator().manual_seed(0)
        >>> r = power_iteration(A, deflate=e1, tol=1e-10, generator=g)
        >>> round(float(r.eigenvalues[0]), 8)
        1.0

    References:
        von Mises & Pollaczek-Geiringer, "Praktische Verfahren der Gleichungsauflösung", 1929.
    """
    op = as_symmetric_operator(A, "power_iteration")
    n = op.shape[0]
    budget = check_int(num_matvecs, "num_matvecs")
    tol = check_positive(tol, "tol")
    g = default_generator(generator, op.device)
    U = None
    if deflate is not None:
        check_vector(deflate, n, op.dtype, op.device, "deflate")
        D = deflate.unsqueeze(1) if deflate.ndim == 1 else deflate
        if D.shape[1] >= n:
            raise ValueError(
                f"Invalid deflate with {D.shape[1]} columns; must be fewer than n={n}."
            )
        U, _ = torch.linalg.qr(D)

    def project(x: Tensor) -> Tensor:
        if U is None:
            return x
        return x - U @ (U.T @ x)

    if v0 is None:
        v = random_block(n, 1, op.dtype, op.device, g)[:, 0]
    else:
        check_vector(v0, n, op.dtype, op.device, "v0")
        if v0.ndim != 1:
            raise ValueError(f"v0 must be a vector (n,), got shape {tuple(v0.shape)}.")
        v = v0.clone()
    v = project(v)
    nv = v.norm()
    if not bool(nv > 0) or not bool(torch.isfinite(nv)):
        raise ValueError(
            "Invalid v0: it is zero, non-finite, or inside the deflated span; give another."
        )
    v = v / nv
    eps = torch.finfo(op.dtype).eps
    count = 0
    theta = torch.zeros((), dtype=op.dtype, device=op.device)
    res = torch.full((), float("inf"), dtype=op.dtype, device=op.device)
    converged = False

    def result() -> EigenResult:
        return EigenResult(
            eigenvalues=theta.reshape(1).clone(),
            eigenvectors=v.reshape(n, 1).clone(),
            residual_norms=res.reshape(1).clone(),
            error_bounds=res.reshape(1).clone(),
            num_matvecs=count,
            converged=converged,
            which="largest_magnitude",
            tol=tol,
            criterion="residual",
            num_restarts=0,
            converged_mask=torch.tensor([converged]),
        )

    while count < budget:
        w = project(op.matvec(v))
        check_finite(w, f"the operator product at power iteration {count + 1}", result())
        count += 1
        theta = v @ w
        res = (w - theta * v).norm()
        nw = w.norm()
        if bool(res <= torch.clamp(tol * theta.abs(), min=50 * eps * nw)):
            converged = True
            break
        if not bool(nw > 0):  # v is in the null space of P A P: the dominant value is 0
            converged = True
            break
        v = w / nw
    return result()
