r"""Krylov solvers for :math:`(A + \delta I) x = b`: conjugate gradients (with Steihaug-Toint
trust-region truncation) and MINRES for symmetric indefinite systems.

Both take a :class:`~hesse.LinearOperator` or a dense tensor, a right-hand side ``(n,)`` or a
block ``(n, k)`` (the ``k`` systems share one batched product per iteration; a column that has
finished drops out of the block), and return a frozen :class:`CGResult`. Running out of
iterations is a status, not an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import (
    NonFiniteError,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_vector,
)
from ..operators.base import LinearOperator
from ._results import CGResult, CGStatus
from .trace import _square_operator

__all__ = ["CGStatus", "CGResult", "CGState", "cg_solve", "minres_solve"]


_CODES = [s.value for s in CGStatus]
_RUNNING = -1


@dataclass(frozen=True, eq=False)
class CGState:
    r"""What a ``callback`` sees after each iteration.

    Attributes:
        iteration: iterations done (products with ``A``).
        solution: current iterate ``x`` (``(n,)`` or ``(n, k_active)``; do not modify).
        residual: ``b - (A + damping I) x`` (CG: the recurrence residual; MINRES: ``None``).
        residual_norm: its norm (``()`` or ``(k_active,)``).
        rhs: the right-hand side columns being solved.
        columns: indices of the columns of ``b`` still iterating.
    """

    iteration: int
    solution: Tensor
    residual: Tensor | None
    residual_norm: Tensor
    rhs: Tensor
    columns: Tensor

    @property
    def model_value(self) -> Tensor:
        r"""The quadratic model :math:`\phi(x) = \tfrac12 x^\top (A + \delta I) x - b^\top x`.

        Computed for free from the residual as :math:`-\tfrac12 x^\top (r + b)` (CG only).
        """
        if self.residual is None:
            raise ValueError("model_value needs the residual, which MINRES does not form.")
        return -0.5 * (self.solution * (self.residual + self.rhs)).sum(0)


# -- input handling -----------------------------------------------------------------------------


def _preconditioner(M: Any, op: LinearOperator) -> Callable[[Tensor], Tensor] | None:
    """Return a function applying ``M^{-1}`` to a block ``(n, k)``."""
    if M is None:
        return None
    n = op.shape[0]
    if isinstance(M, LinearOperator):
        if M.shape != (n, n):
            raise ValueError(
                f"Shape mismatch: preconditioner has shape {M.shape}, expected {(n, n)}."
            )
        if M.dtype != op.dtype:
            raise TypeError(f"Dtype mismatch: operator is {op.dtype}, preconditioner {M.dtype}.")
        return M.matmat
    if isinstance(M, Tensor):
        if M.ndim != 1:
            raise TypeError(
                "A tensor preconditioner must be the diagonal (n,) of M ~ A (Jacobi); got shape "
                f"{tuple(M.shape)}. For a dense M^-1 pass hesse.aslinearoperator(M_inv)."
            )
        check_vector(M, n, op.dtype, op.device, "preconditioner diagonal")
        if not bool((M > 0).all()) or not bool(torch.isfinite(M).all()):
            raise ValueError(
                "Invalid preconditioner diagonal: every entry must be finite and > 0 (PCG needs "
                "a positive definite M); add damping or clamp, e.g. d.clamp_min(1e-8)."
            )
        inv = (1.0 / M).unsqueeze(1)
        return lambda R: inv * R
    if callable(M):
        return M
    raise TypeError(
        "Invalid preconditioner; expected None, a LinearOperator applying M^-1, a 1-D tensor "
        f"diag(M), or a callable applying M^-1 to an (n, k) block, got {type(M).__name__}."
    )


def _iterate_schedule(return_iterates: Any) -> Callable[[int], bool]:
    if return_iterates is None or return_iterates is False:
        return lambda i: False
    if return_iterates is True:
        return lambda i: True
    if isinstance(return_iterates, Iterable) and not isinstance(return_iterates, (str, Tensor)):
        wanted = set()
        for i in return_iterates:
            wanted.add(check_int(i, "return_iterates entry", minimum=0))
        return wanted.__contains__
    raise TypeError(
        "Invalid return_iterates; expected None, True, or an iterable of iteration numbers, "
        f"got {return_iterates!r}."
    )


def _prepare(
    A: Any, b: Any, x0: Any, damping: float, tol: float, atol: float, max_iters: int | None
) -> tuple[LinearOperator, Tensor, Tensor | None, bool, float, float, float, int]:
    op = _square_operator(A)
    if not op.symmetric:
        raise ValueError(
            "cg_solve/minres_solve need a symmetric operator; got one declared non-symmetric "
            f"({op!r}). Solve with A.T @ A (normal equations) or declare symmetric=True."
        )
    n = op.shape[0]
    check_vector(b, n, op.dtype, op.device, "right-hand side b")
    vector = b.ndim == 1
    B = b.unsqueeze(1) if vector else b
    if x0 is not None:
        check_vector(x0, n, op.dtype, op.device, "x0")
        if x0.shape != b.shape:
            raise ValueError(
                f"Shape mismatch: x0 has shape {tuple(x0.shape)}, b has {tuple(b.shape)}."
            )
        x0 = x0.unsqueeze(1) if vector else x0
    damping = check_nonnegative(damping, "damping")
    tol = check_positive(tol, "tol")
    atol = check_nonnegative(atol, "atol")
    iters = 10 * n if max_iters is None else check_int(max_iters, "max_iters", minimum=0)
    return op, B, x0, vector, damping, tol, atol, iters


def _apply(op: LinearOperator, V: Tensor, damping: float) -> Tensor:
    out = op.matmat(V)
    return out + damping * V if damping else out


class _Output:
    """Per-column results filled in as columns finish (the working block shrinks)."""

    def __init__(self, B: Tensor, vector: bool, keep: Callable[[int], bool], method: str):
        k = B.shape[1]
        self.vector, self.method, self.keep = vector, method, keep
        self.x = torch.zeros_like(B)
        self.rnorm = torch.zeros(k, dtype=B.dtype, device=B.device)
        self.status = [_RUNNING] * k
        self.direction: Tensor | None = None
        self.curvature: Tensor | None = None
        self.history: list[Tensor] = []
        self.iterates: dict[int, Tensor] = {}
        self.num_matvecs = 0
        self.num_iters = 0
        self._B = B

    def finish(self, cols: Tensor, X: Tensor, rnorm: Tensor, code: int) -> None:
        self.x[:, cols] = X
        self.rnorm[cols] = rnorm
        for c in cols.tolist():
            self.status[c] = code

    def record(self, cols: Tensor, rnorm: Tensor) -> None:
        self.rnorm[cols] = rnorm
        self.history.append(self.rnorm.clone())

    def set_direction(self, cols: Tensor, P: Tensor, curv: Tensor) -> None:
        if self.direction is None:
            self.direction = torch.zeros_like(self._B)
            self.curvature = torch.full_like(self.rnorm, float("nan"))
        self.direction[:, cols] = P
        self.curvature[cols] = curv  # type: ignore[index]

    def snapshot(self, it: int, cols: Tensor, X: Tensor) -> None:
        if self.keep(it):
            full = self.x.clone()
            full[:, cols] = X
            self.iterates[it] = full.squeeze(1) if self.vector else full

    def result(self) -> CGResult:
        statuses = tuple(_CODES[s] for s in self.status)
        others = [s for s in statuses if s != CGStatus.CONVERGED.value]
        sq = (lambda t: t.squeeze(1)) if self.vector else (lambda t: t)
        hist = torch.stack(self.history) if self.history else self.rnorm.unsqueeze(0)
        return CGResult(
            solution=sq(self.x),
            converged=not others,
            status=others[0] if others else CGStatus.CONVERGED.value,
            residual_norm=self.rnorm[0] if self.vector else self.rnorm,
            residual_norms=hist[:, 0] if self.vector else hist,
            num_iters=self.num_iters,
            num_matvecs=self.num_matvecs,
            statuses=statuses,
            direction=None if self.direction is None else sq(self.direction),
            curvature=None
            if self.curvature is None
            else (self.curvature[0] if self.vector else self.curvature),
            iterates=dict(self.iterates) if self.iterates else None,
            method=self.method,
        )

    def partial(self, cols: Tensor, X: Tensor) -> CGResult:
        self.x[:, cols] = X
        for c in cols.tolist():
            self.status[c] = _CODES.index(CGStatus.BREAKDOWN.value)
        return self.result()


def _boundary_step(X: Tensor, P: Tensor, radius: float) -> Tensor:
    """``tau >= 0`` with ``||x + tau p|| = radius`` per column (``||x|| <= radius``)."""
    a = (P * P).sum(0)
    bq = 2 * (X * P).sum(0)
    c = (X * X).sum(0) - radius * radius
    disc = torch.sqrt((bq * bq - 4 * a * c).clamp_min(0))
    # Stable roots: c <= 0, so the positive root is -2c / (bq + disc) when bq >= 0.
    tiny = torch.finfo(X.dtype).tiny
    pos = -2 * c / (bq + disc).clamp_min(tiny)
    neg = (-bq + disc) / (2 * a).clamp_min(tiny)
    return torch.where(bq >= 0, pos, neg)


# -- conjugate gradients ------------------------------------------------------------------------


def _start(
    op: Any, B: Tensor, X0: Tensor | None, damping: float, out: Any, cols: Tensor, name: str
) -> tuple[Tensor, Tensor]:
    """Initial iterate and residual ``(X0, B - A X0)`` (``(0, B)`` without a start)."""
    if X0 is None:
        return torch.zeros_like(B), B.clone()
    X = X0.clone()
    AX = _apply(op, X, damping)
    out.num_matvecs += B.shape[1]
    if not bool(torch.isfinite(AX).all()):
        raise NonFiniteError(
            f"Non-finite values (NaN/inf) in the product A @ x0 in {name}.",
            out.partial(cols, X),
        )
    return X, B - AX


def cg_solve(
    A: Any,
    b: Tensor,
    *,
    damping: float = 0.0,
    preconditioner: Any = None,
    x0: Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_iters: int | None = None,
    radius: float | None = None,
    on_negative_curvature: str = "raise",
    callback: Callable[[CGState], Any] | None = None,
    return_iterates: bool | Iterable[int] | None = None,
) -> CGResult:
    r"""Solve :math:`(A + \delta I) x = b` by (preconditioned) conjugate gradients.

    Iterates until the residual meets

    .. math:: \|b - (A + \delta I) x_i\|_2 \le \max(\mathrm{tol} \cdot \|b\|_2,\ \mathrm{atol}),

    or ``max_iters`` is reached (status ``"max_iters"``, the truncated solution of
    Hessian-free optimisation), for symmetric positive definite :math:`A + \delta I`.
    The error obeys :math:`\|x_i - x_*\|_A \le 2 \big(\tfrac{\sqrt\kappa - 1}{\sqrt\kappa + 1}
    \big)^i \|x_0 - x_*\|_A`, and CG terminates in at most as many iterations as
    :math:`A` has distinct eigenvalues (in exact arithmetic).

    **Negative curvature.** If :math:`p^\top (A + \delta I) p \le 0` for a search direction
    ``p`` the operator is not positive definite. With ``radius=None`` and
    ``on_negative_curvature="raise"`` (default) this raises ``ValueError``; with ``"stop"`` the
    iterate so far is returned with status ``"negative_curvature"`` and ``p`` in
    ``result.direction`` (a descent direction of non-positive curvature).

    **Trust region (Steihaug-Toint).** With ``radius``, starting from ``x0 = 0``, CG stops
    when an iterate would leave :math:`\|x\|_2 \le \Delta` (status ``"boundary"``) or on
    non-positive curvature (status ``"negative_curvature"``); in both cases it moves along the
    current direction to the boundary, so :math:`\|x\| = \Delta`. The quadratic model
    :math:`\phi(x) = \tfrac12 x^\top (A + \delta I) x - b^\top x` decreases monotonically.
    (The radius is measured in the Euclidean norm, also when preconditioned.)

    Cost: one product per iteration (a block ``b`` of ``k`` columns: one batched product of
    the still-active columns), plus one if ``x0`` is given; memory: 4 vectors per column.

    Args:
        A: symmetric :class:`~hesse.LinearOperator` or dense tensor ``(n, n)``.
        b: right-hand side ``(n,)`` or block ``(n, k)``, same dtype/device as ``A``.
        damping: :math:`\delta \ge 0` (Levenberg-Marquardt / Tikhonov), applied without
            building ``A + delta I``.
        preconditioner: ``None``; a :class:`~hesse.LinearOperator` or callable applying
            :math:`M^{-1}` to an ``(n, k)`` block; or a positive 1-D tensor ``diag(M)`` with
            :math:`M \approx A + \delta I` (Jacobi: pass ``exact_diagonal(A).estimate +
            damping``). ``M`` must be symmetric positive definite.
        x0: starting point, shape of ``b`` (default zeros).
        tol: relative residual tolerance, > 0.
        atol: absolute residual tolerance, >= 0.
        max_iters: iteration budget (default ``10 n``); 0 returns ``x0``.
        radius: trust-region radius :math:`\Delta > 0` (Steihaug-Toint), or ``None``.
        on_negative_curvature: ``"raise"`` (default) or ``"stop"``; ignored with ``radius``.
        callback: called as ``callback(state: CGState)`` after every iteration; returning
            ``True`` stops with status ``"callback"`` (e.g. Martens' relative-progress rule on
            ``state.model_value``).
        return_iterates: ``True`` keeps every iterate, an iterable of iteration numbers keeps
            those (e.g. Martens' CG backtracking at ``ceil(1.3**j)``); ``None`` keeps none.

    Returns:
        :class:`CGResult`.

    Raises:
        ValueError: invalid ``tol``/``damping``/``radius``, a non-symmetric operator, or
            negative curvature with ``on_negative_curvature="raise"``.
        TypeError: ``b``/``x0`` of the wrong kind or dtype.
        NonFiniteError: a product held NaN/inf; ``err.partial`` is the :class:`CGResult` so
            far (status ``"breakdown"`` for the affected columns).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> r = cg_solve(A, torch.ones(3, dtype=torch.float64))
        >>> r.solution, r.num_iters, r.status
        (tensor([1.0000, 0.5000, 0.2500], dtype=torch.float64), 3, 'converged')

    References:
        Hestenes & Stiefel (1952), Methods of conjugate gradients for solving linear systems.
        Steihaug (1983), The conjugate gradient method and trust regions in large scale
        optimization. Martens (2010), Deep learning via Hessian-free optimization.
    """
    op, B, X0, vector, damping, tol, atol, max_iters = _prepare(
        A, b, x0, damping, tol, atol, max_iters
    )
    mode = check_choice(on_negative_curvature, "on_negative_curvature", ("raise", "stop"))
    if radius is not None:
        radius = check_positive(radius, "radius")
        if X0 is not None and bool((torch.linalg.vector_norm(X0, dim=0) >= radius).any()):
            raise ValueError(
                f"Invalid x0: ||x0|| must be < radius={radius} for trust-region CG "
                "(Steihaug-Toint starts inside the region; use x0=None)."
            )
    if callback is not None and not callable(callback):
        raise TypeError(f"Invalid callback={callback!r}; must be callable.")
    Minv = _preconditioner(preconditioner, op)
    out = _Output(B, vector, _iterate_schedule(return_iterates), "cg")
    k = B.shape[1]
    cols = torch.arange(k, device=B.device)

    X, R = _start(op, B, X0, damping, out, cols, "cg_solve")
    Bs = B
    thresh = torch.clamp_min(tol * torch.linalg.vector_norm(B, dim=0), atol)
    rnorm = torch.linalg.vector_norm(R, dim=0)
    out.record(cols, rnorm)
    out.snapshot(0, cols, X)
    Z = R if Minv is None else Minv(R)
    P = Z.clone()
    rz = (R * Z).sum(0)

    def drop(mask: Tensor, code: int, Xf: Tensor, rn: Tensor) -> Tensor:
        """Finish the masked columns; return the keep-mask."""
        out.finish(cols[mask], Xf[:, mask], rn[mask], code)
        return ~mask

    def compact(keep: Tensor) -> None:
        nonlocal cols, X, R, Z, P, rz, rnorm, thresh, Bs
        if bool(keep.all()):
            return
        cols, X, R, Z, P = cols[keep], X[:, keep], R[:, keep], Z[:, keep], P[:, keep]
        rz, rnorm, thresh, Bs = rz[keep], rnorm[keep], thresh[keep], Bs[:, keep]

    done = rnorm <= thresh
    if bool(done.any()):
        compact(drop(done, 0, X, rnorm))
    it = 0
    while cols.numel() and it < max_iters:
        it += 1
        AP = _apply(op, P, damping)
        out.num_matvecs += cols.numel()
        if not bool(torch.isfinite(AP).all()):
            raise NonFiniteError(
                f"Non-finite values (NaN/inf) in the product A @ p at CG iteration {it}.",
                out.partial(cols, X),
            )
        pAp = (P * AP).sum(0)
        neg = pAp <= 0
        keep = torch.ones_like(neg)
        if bool(neg.any()):
            pp = (P * P).sum(0)
            curv = pAp / pp.clamp_min(torch.finfo(pp.dtype).tiny)
            if radius is None and mode == "raise":
                j = int(torch.nonzero(neg)[0])
                raise ValueError(
                    f"cg_solve met non-positive curvature p^T (A + damping I) p / ||p||^2 = "
                    f"{float(curv[j]):.3g} at iteration {it}: the operator is indefinite (or "
                    "singular). Add damping (damping > |lambda_min|), use minres_solve for "
                    "indefinite systems, or pass on_negative_curvature='stop'."
                )
            out.set_direction(cols[neg], P[:, neg], curv[neg])
            Xn, rn = X, rnorm
            if radius is not None:
                tau = _boundary_step(X[:, neg], P[:, neg], radius)
                Xn, rn = X.clone(), rnorm.clone()
                Xn[:, neg] = X[:, neg] + tau * P[:, neg]
                rn[neg] = torch.linalg.vector_norm(R[:, neg] - tau * AP[:, neg], dim=0)
            keep = drop(neg, _CODES.index(CGStatus.NEGATIVE_CURVATURE.value), Xn, rn)
        alpha = torch.where(neg, torch.zeros_like(pAp), rz / torch.where(neg, 1.0, pAp))
        Xnew = X + alpha * P
        if radius is not None:
            out_of = (torch.linalg.vector_norm(Xnew, dim=0) >= radius) & keep
            if bool(out_of.any()):
                tau = _boundary_step(X[:, out_of], P[:, out_of], radius)
                Xb, rb = Xnew.clone(), rnorm.clone()
                Xb[:, out_of] = X[:, out_of] + tau * P[:, out_of]
                rb[out_of] = torch.linalg.vector_norm(R[:, out_of] - tau * AP[:, out_of], dim=0)
                keep = keep & drop(out_of, _CODES.index(CGStatus.BOUNDARY.value), Xb, rb)
        X = Xnew
        R = R - alpha * AP
        rnorm = torch.linalg.vector_norm(R, dim=0)
        out.record(cols, torch.where(keep, rnorm, out.rnorm[cols]))
        out.num_iters = it
        conv = (rnorm <= thresh) & keep
        if bool(conv.any()):
            keep = keep & drop(conv, 0, X, rnorm)
        compact(keep)
        if not cols.numel():
            break
        out.snapshot(it, cols, X)
        if callback is not None:
            state = CGState(
                it,
                X.squeeze(1) if vector else X,
                R.squeeze(1) if vector else R,
                rnorm[0] if vector else rnorm,
                Bs.squeeze(1) if vector else Bs,
                cols,
            )
            if callback(state) is True:
                all_cols = torch.ones(cols.numel(), dtype=torch.bool, device=cols.device)
                drop(all_cols, _CODES.index(CGStatus.CALLBACK.value), X, rnorm)
                cols = cols[:0]
                break
        Z = R if Minv is None else Minv(R)
        rz_new = (R * Z).sum(0)
        beta = rz_new / rz
        rz = rz_new
        P = Z + beta * P
    if cols.numel():
        out.finish(cols, X, rnorm, _CODES.index(CGStatus.MAX_ITERS.value))
    out.num_iters = it
    return out.result()


# -- MINRES -------------------------------------------------------------------------------------


def minres_solve(
    A: Any,
    b: Tensor,
    *,
    damping: float = 0.0,
    preconditioner: Any = None,
    x0: Tensor | None = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    max_iters: int | None = None,
    callback: Callable[[CGState], Any] | None = None,
    return_iterates: bool | Iterable[int] | None = None,
) -> CGResult:
    r"""Solve the symmetric, possibly indefinite, system :math:`(A + \delta I) x = b` by MINRES.

    MINRES (Paige & Saunders 1975) minimises :math:`\|b - (A + \delta I) x\|_2` over the
    Krylov space :math:`x_0 + \mathcal{K}_i` with a Lanczos recurrence and Givens rotations;
    unlike CG it needs no definiteness, so it solves Newton systems at saddle points. It stops
    when the residual estimate satisfies

    .. math:: \|r_i\| \le \max(\mathrm{tol} \cdot \|r_0\|,\ \mathrm{atol})

    (with a preconditioner, norms are in the :math:`M^{-1}` norm), at ``max_iters`` (status
    ``"max_iters"``), or when the Krylov space is exhausted without meeting ``tol`` (a
    singular, inconsistent system: status ``"breakdown"``, ``x`` minimises the residual there).

    Cost: one product per iteration (block ``b``: one batched product of the active columns);
    memory: 7 vectors per column.

    Args:
        A: symmetric operator or dense tensor.
        b: ``(n,)`` or ``(n, k)``.
        damping: :math:`\delta \ge 0`.
        preconditioner: as in :func:`cg_solve`; must be symmetric positive definite.
        x0, tol, atol, max_iters, callback, return_iterates: as in :func:`cg_solve`
            (``state.residual`` is ``None``: MINRES does not form it).

    Returns:
        :class:`CGResult` with ``method="minres"``.

    Raises:
        ValueError: bad ``tol``/``damping``, a non-symmetric operator, or an indefinite
            preconditioner.
        NonFiniteError: a product held NaN/inf; ``err.partial`` is the result so far.

    Example:
        >>> A = torch.diag(torch.tensor([2.0, -1.0, 4.0], dtype=torch.float64))
        >>> r = minres_solve(A, torch.ones(3, dtype=torch.float64))
        >>> torch.allclose(r.solution, torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64))
        True

    References:
        Paige & Saunders (1975), Solution of sparse indefinite systems of linear equations.
        SIAM J. Numer. Anal. 12(4).
    """
    op, B, X0, vector, damping, tol, atol, max_iters = _prepare(
        A, b, x0, damping, tol, atol, max_iters
    )
    if callback is not None and not callable(callback):
        raise TypeError(f"Invalid callback={callback!r}; must be callable.")
    Minv = _preconditioner(preconditioner, op)
    out = _Output(B, vector, _iterate_schedule(return_iterates), "minres")
    k = B.shape[1]
    cols = torch.arange(k, device=B.device)
    dt = B.dtype
    eps = torch.finfo(dt).eps

    X, R1 = _start(op, B, X0, damping, out, cols, "minres_solve")
    Y = R1 if Minv is None else Minv(R1)
    beta1sq = (R1 * Y).sum(0)
    if bool((beta1sq < 0).any()):
        raise ValueError("The preconditioner is not positive definite (r^T M^-1 r < 0).")
    beta1 = torch.sqrt(beta1sq)
    thresh = torch.clamp_min(tol * beta1, atol)
    out.record(cols, beta1)
    out.snapshot(0, cols, X)

    zeros = torch.zeros_like(beta1)
    st = {
        "R1": R1,
        "R2": R1.clone(),
        "Y": Y,
        "W": torch.zeros_like(B),
        "W2": torch.zeros_like(B),
        "X": X,
        "B": B,
    }
    sc = {
        "oldb": zeros.clone(),
        "beta": beta1.clone(),
        "dbar": zeros.clone(),
        "epsln": zeros.clone(),
        "phibar": beta1.clone(),
        "cs": -torch.ones_like(beta1),
        "sn": zeros.clone(),
        "thresh": thresh,
        "anorm2": zeros.clone(),
    }

    def compact(keep: Tensor) -> None:
        nonlocal cols
        if bool(keep.all()):
            return
        cols = cols[keep]
        for key in st:
            st[key] = st[key][:, keep]
        for key in sc:
            sc[key] = sc[key][keep]

    done = beta1 <= thresh
    if bool(done.any()):
        out.finish(cols[done], X[:, done], beta1[done], 0)
        compact(~done)
    it = 0
    while cols.numel() and it < max_iters:
        it += 1
        beta, oldb = sc["beta"], sc["oldb"]
        V = st["Y"] / beta
        AV = _apply(op, V, damping)
        out.num_matvecs += cols.numel()
        if not bool(torch.isfinite(AV).all()):
            raise NonFiniteError(
                f"Non-finite values (NaN/inf) in the product A @ v at MINRES iteration {it}.",
                out.partial(cols, st["X"]),
            )
        Yn = AV
        if it >= 2:
            Yn = Yn - (beta / oldb) * st["R1"]
        alfa = (V * Yn).sum(0)
        Yn = Yn - (alfa / beta) * st["R2"]
        st["R1"], st["R2"] = st["R2"], Yn
        Yp = Yn if Minv is None else Minv(Yn)
        oldb = beta
        betasq = (Yn * Yp).sum(0)
        if bool((betasq < 0).any()):
            raise ValueError("The preconditioner is not positive definite (r^T M^-1 r < 0).")
        beta = torch.sqrt(betasq)
        st["Y"] = Yp
        sc["anorm2"] = sc["anorm2"] + alfa * alfa + oldb * oldb + beta * beta
        # Apply the previous rotation, then compute and apply the next one.
        cs, sn, dbar = sc["cs"], sc["sn"], sc["dbar"]
        oldeps = sc["epsln"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar * gbar + beta * beta).clamp_min(eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * sc["phibar"]
        phibar = sn * sc["phibar"]
        W1, W2 = st["W2"], st["W"]
        W = (V - oldeps * W1 - delta * W2) / gamma
        st["W2"], st["W"] = W2, W
        st["X"] = st["X"] + phi * W
        sc.update(oldb=oldb, beta=beta, dbar=dbar, epsln=epsln, phibar=phibar, cs=cs, sn=sn)
        rnorm = phibar.abs()
        out.record(cols, rnorm)
        out.num_iters = it
        conv = rnorm <= sc["thresh"]
        # Lanczos breakdown: the Krylov space is invariant, nothing more can be gained.
        brk = (beta <= eps * torch.sqrt(sc["anorm2"])) & ~conv
        keep = ~(conv | brk)
        if bool(conv.any()):
            out.finish(cols[conv], st["X"][:, conv], rnorm[conv], 0)
        if bool(brk.any()):
            out.finish(cols[brk], st["X"][:, brk], rnorm[brk], _CODES.index("breakdown"))
        compact(keep)
        if not cols.numel():
            break
        out.snapshot(it, cols, st["X"])
        if callback is not None:
            Xs, rn = st["X"], rnorm[keep]
            state = CGState(
                it,
                Xs.squeeze(1) if vector else Xs,
                None,
                rn[0] if vector else rn,
                st["B"].squeeze(1) if vector else st["B"],
                cols,
            )
            if callback(state) is True:
                out.finish(cols, st["X"], rn, _CODES.index("callback"))
                cols = cols[:0]
                break
    if cols.numel():
        out.finish(cols, st["X"], sc["phibar"].abs(), _CODES.index(CGStatus.MAX_ITERS.value))
    out.num_iters = it
    return out.result()
