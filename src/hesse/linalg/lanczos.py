"""The Lanczos process in torch, batched over independent start vectors.

``lanczos(A, num_steps, v0=...)`` runs one Lanczos recurrence per column of ``v0``; all
columns share each product with ``A`` (one ``matmat`` per step), which is what stochastic
Lanczos quadrature needs. Restarted eigen-solvers live in :mod:`hesse.linalg.eigen`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite, check_int, check_vector
from .._serialize import Serializable
from ..operators.base import LinearOperator, aslinearoperator

__all__ = ["LanczosDecomposition", "lanczos"]


def as_symmetric_operator(A: Any, what: str = "Lanczos") -> LinearOperator:
    """``A`` as a square symmetric :class:`LinearOperator`, or a ``ValueError`` saying why not."""
    op = aslinearoperator(A)
    m, n = op.shape
    if m != n:
        raise ValueError(f"{what} needs a square operator, got shape {op.shape}.")
    if not op.symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator, got {op!r} declared symmetric=False. "
            "Wrap a symmetric matrix with hesse.DenseOperator(A, symmetric=True), or use "
            "a symmetric operator (Hessian, GGN, Fisher)."
        )
    if not op.dtype.is_floating_point:
        raise TypeError(f"{what} needs a floating-point operator, got dtype {op.dtype}.")
    return op


def default_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The caller's generator, or a freshly seeded one (never the global RNG)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        return generator
    g = torch.Generator(device=device)
    g.seed()
    return g


def random_block(
    n: int, k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Tensor:
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(n, k, generator=generator, dtype=work, device=generator.device).to(
        dtype=dtype, device=device
    )


def orthonormalize(
    R: Tensor,
    V: Tensor | None,
    generator: torch.Generator,
    *,
    drop_tol: float | None = None,
    refs: Tensor | None = None,
    passes: int = 2,
) -> tuple[Tensor, Tensor]:
    """Orthonormalise the columns of ``R`` against ``V`` (orthonormal) and each other.

    Classical Gram-Schmidt ``passes`` times (default twice: "twice is enough"; one when
    ``R`` was projected once already) per column. A column whose norm falls
    below ``drop_tol`` times its reference norm (``refs``, default its own input norm) is
    numerically in the span already; it is replaced by a random direction orthogonal to
    everything kept (if room remains), so a breakdown never stalls the process.

    Returns:
        ``(Q, norms)``: ``Q (n, c)`` orthonormal (``c`` may be smaller than ``R.shape[1]``
        when the space is exhausted) and the norms of the projected columns before
        normalisation (0 for replaced columns).
    """
    n, k = R.shape
    dtype = R.dtype
    if drop_tol is None:
        drop_tol = 100 * torch.finfo(dtype).eps
    if k == 1 and V is not None and 0 < V.shape[1] < n - 1:
        # fast path of a single vector (Lanczos): no Python loop unless it breaks down
        x = R[:, 0]
        for _ in range(passes):
            x = x - V @ (V.T @ x)
        nx = x.norm()
        ref0 = R[:, 0].norm() if refs is None else refs[0]
        if bool(nx > drop_tol * ref0.clamp_min(torch.finfo(dtype).tiny)):
            return (x / nx).unsqueeze(1), nx.reshape(1)
    ref = R.norm(dim=0) if refs is None else refs
    basis = V if V is not None and V.shape[1] > 0 else None
    cols: list[Tensor] = []
    norms: list[Tensor] = []
    used = 0 if basis is None else basis.shape[1]
    for c in range(k):
        if used + len(cols) >= n:
            break
        x = R[:, c]
        for attempt in range(3):
            for _ in range(passes if attempt == 0 else 2):
                if basis is not None:
                    x = x - basis @ (basis.T @ x)
                if cols:
                    Qc = torch.stack(cols, 1)
                    x = x - Qc @ (Qc.T @ x)
            nx = x.norm()
            if attempt == 0:
                norms.append(nx)
            if bool(nx > drop_tol * ref[c].clamp_min(torch.finfo(dtype).tiny)) or attempt == 2:
                break
            # breakdown: an invariant subspace; continue with a fresh random direction
            x = random_block(n, 1, dtype, R.device, generator)[:, 0]
            ref = ref.clone()
            ref[c] = x.norm()
            norms[-1] = torch.zeros((), dtype=dtype, device=R.device)
        cols.append(x / nx)
    Q = torch.stack(cols, 1) if cols else R.new_zeros(n, 0)
    return Q, torch.stack(norms) if norms else R.new_zeros(0)


@dataclass(frozen=True, eq=False)
class LanczosDecomposition(Serializable):
    """``A Q_p = Q_p T_p + beta_p q_{p, m+1} e_m^T`` for each start vector ``p``.

    Attributes:
        basis: ``(p, m, n)`` orthonormal Lanczos vectors per start vector (``None`` if not
            kept).
        alpha: ``(p, m)`` diagonal of each tridiagonal ``T_p``.
        beta: ``(p, m)`` off-diagonal: ``beta[:, i]`` couples steps ``i`` and ``i + 1``;
            ``beta[:, m - 1]`` is the norm of the final residual.
        num_steps: ``(p,)`` steps actually taken per start vector (fewer than requested when
            its Krylov space became invariant: then its residual was zero).
        num_matvecs: products with ``A``.
    """

    basis: Tensor | None
    alpha: Tensor
    beta: Tensor
    num_steps: Tensor
    num_matvecs: int

    def tridiagonal(self, p: int = 0) -> Tensor:
        """The dense ``(m_p, m_p)`` tridiagonal ``T_p`` (float64)."""
        m = int(self.num_steps[p])
        a = self.alpha[p, :m].to(torch.float64)
        b = self.beta[p, : m - 1].to(torch.float64)
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


def lanczos(
    A: Any,
    num_steps: int,
    *,
    v0: Tensor | None = None,
    num_vectors: int = 1,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    basis_dtype: torch.dtype | None = None,
) -> LanczosDecomposition:
    """Run ``num_steps`` Lanczos steps from each column of ``v0`` at once.

    For each start vector ``q_1 = v0_p / ||v0_p||`` the three-term recurrence

    .. math:: \\beta_j q_{j+1} = A q_j - \\alpha_j q_j - \\beta_{j-1} q_{j-1},
        \\qquad \\alpha_j = q_j^T A q_j,

    builds an orthonormal basis of the Krylov space ``K_m(A, q_1)`` and the tridiagonal
    ``T = Q^T A Q``. All start vectors advance together: step ``j`` is one ``A.matmat`` of the
    ``p`` current vectors (one batched pass for curvature operators). With
    ``reorthogonalize=True`` (default) every new vector is orthogonalised twice against its
    own full basis (exact arithmetic behaviour, no ghost eigenvalues).

    Cost: ``p * num_steps`` matvecs in ``num_steps`` batched passes; memory
    ``p * num_steps * n`` for the bases.

    Args:
        A: symmetric ``LinearOperator`` or dense tensor ``(n, n)``.
        num_steps: Lanczos steps ``m`` (capped at ``n``).
        v0: ``(n,)`` or ``(n, p)`` start vectors; default ``num_vectors`` Gaussian vectors.
        num_vectors: number of random start vectors when ``v0`` is ``None``.
        generator: randomness for the default start and breakdown restarts.
        reorthogonalize: full reorthogonalisation (needs the basis).
        keep_basis: return the basis (forced on by ``reorthogonalize``).
        basis_dtype: storage dtype of the basis (e.g. ``torch.float32`` for a float64
            operator, halving memory); default the operator's dtype.

    Returns:
        :class:`LanczosDecomposition`.

    Raises:
        ValueError: non-square or non-symmetric operator, bad sizes.
        NonFiniteError: a product held NaN/inf; ``.partial`` is the decomposition so far.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> dec = lanczos(A, 3, v0=torch.ones(3, dtype=torch.float64))
        >>> torch.linalg.eigvalsh(dec.tridiagonal(0))
        tensor([1., 2., 3.], dtype=torch.float64)

    References:
        Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
        differential and integral operators", 1950.
    """
    op = as_symmetric_operator(A)
    n = op.shape[0]
    check_int(num_steps, "num_steps", minimum=1)
    m = min(num_steps, n)
    g = default_generator(generator, op.device)
    if v0 is None:
        check_int(num_vectors, "num_vectors", minimum=1)
        Z = random_block(n, num_vectors, op.dtype, op.device, g)
    else:
        check_vector(v0, n, op.dtype, op.device, "v0")
        Z = v0.unsqueeze(1) if v0.ndim == 1 else v0
    nrm = Z.norm(dim=0)
    if not bool((nrm > 0).all()) or not bool(torch.isfinite(nrm).all()):
        raise ValueError("Invalid v0: every start vector must be finite and non-zero.")
    return _batched_lanczos(
        op, Z / nrm, m, g, reorthogonalize, keep_basis or reorthogonalize, basis_dtype
    )


def _batched_lanczos(
    op: LinearOperator,
    Q0: Tensor,
    m: int,
    generator: torch.Generator,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    basis_dtype: torch.dtype | None = None,
    *,
    resume: dict | None = None,
    save: Callable[[dict], None] | None = None,
    save_every: int = 0,
    progress: bool = False,
) -> LanczosDecomposition:
    """Independent Lanczos recurrences for the unit columns of ``Q0`` (see :func:`lanczos`).

    ``resume`` continues from a state produced by ``save`` (called every ``save_every``
    matvecs and, before re-raising, on ``KeyboardInterrupt``).
    """
    n, p = Q0.shape
    dtype = op.dtype
    dev = op.device
    bdtype = basis_dtype or dtype
    eps = torch.finfo(dtype).eps
    basis = torch.zeros(p, m, n, dtype=bdtype, device=dev) if keep_basis else None
    alpha = torch.zeros(p, m, dtype=dtype, device=dev)
    beta = torch.zeros(p, m, dtype=dtype, device=dev)
    steps = torch.zeros(p, dtype=torch.long)
    active = torch.ones(p, dtype=torch.bool)
    q = Q0.T.contiguous()  # (p, n) current vectors
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(p, dtype=dtype, device=dev)
    count = 0
    scale = torch.zeros((), dtype=dtype, device=dev)
    start = 0
    if resume is not None:
        start = int(resume["j"])
        if basis is not None:
            basis[:, :start] = resume["basis"].to(dev)
        alpha[:, :start] = resume["alpha"].to(dev)
        beta[:, :start] = resume["beta"].to(dev)
        steps[:] = resume["steps"]
        active[:] = resume["active"]
        q, q_prev = resume["q"].to(dev), resume["q_prev"].to(dev)
        b_prev, scale = resume["b_prev"].to(dev), resume["scale"].to(dev)
        count = int(resume["count"])

    def partial() -> LanczosDecomposition:
        return LanczosDecomposition(basis, alpha, beta, steps.clone(), count)

    def state(j: int) -> dict:
        return {
            "j": j,
            "basis": None if basis is None else basis[:, :j].clone(),
            "alpha": alpha[:, :j].clone(),
            "beta": beta[:, :j].clone(),
            "steps": steps.clone(),
            "active": active.clone(),
            "q": q.clone(),
            "q_prev": q_prev.clone(),
            "b_prev": b_prev.clone(),
            "scale": scale.clone(),
            "count": count,
        }

    saved_at = count
    snapshot = None
    j = start
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=m, initial=start, desc="Lanczos", unit="step", leave=False)
    try:
        for j in range(start, m):
            idx = torch.nonzero(active).reshape(-1)
            if idx.numel() == 0:
                break
            qa = q[idx]
            W = op.matmat(qa.T.contiguous()).T  # (a, n)
            check_finite(W, f"the operator product at Lanczos step {j + 1}", partial())
            snapshot = j  # from here until the step ends the state is not consistent
            count += idx.numel()
            if basis is not None:
                basis[idx, j] = qa.to(bdtype)
            a = (qa * W).sum(1)
            alpha[idx, j] = a
            W = W - a.unsqueeze(1) * qa - b_prev[idx].unsqueeze(1) * q_prev[idx]
            if reorthogonalize and basis is not None:
                B = basis[:, : j + 1] if idx.numel() == p else basis[idx, : j + 1]
                B = B.to(dtype)  # (a, j+1, n); a no-op view unless basis_dtype differs
                for _ in range(2):
                    W = W - torch.bmm(torch.bmm(B, W.unsqueeze(2)).transpose(1, 2), B).squeeze(1)
            bnew = W.norm(dim=1)
            scale = torch.maximum(scale, (a.abs() + bnew + b_prev[idx]).max())
            beta[idx, j] = bnew
            steps[idx] = j + 1
            # breakdown: the Krylov space of this start vector is invariant; it is finished
            done = bnew <= 10 * eps * scale * (j + 1)
            if bool(done.any()):
                beta[idx[done], j] = 0.0
                active[idx[done].cpu()] = False
            q_prev[idx] = qa
            b_prev[idx] = bnew
            q[idx] = W / bnew.clamp_min(torch.finfo(dtype).tiny).unsqueeze(1)
            snapshot = None
            if bar is not None:
                bar.update(1)
            if save is not None and save_every and count - saved_at >= save_every:
                save(state(j + 1))
                saved_at = count
    except KeyboardInterrupt:
        if save is not None and snapshot is None:
            save(state(j))
        raise
    finally:
        if bar is not None:
            bar.close()
    return partial()
