"""Matrix functions of symmetric positive semi-definite matrices: the inverse p-th root.

Used by Shampoo (inverse 2k-th roots of its per-dimension statistics) and by any
preconditioner that needs ``(A + eps I)^{-1/p}`` robustly in low precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import (
    check_choice,
    check_finite,
    check_int,
    check_nonnegative,
    check_positive,
    warn_once,
)

__all__ = ["matrix_inverse_root"]


def matrix_inverse_root(
    A: Tensor,
    p: int,
    *,
    eps: float = 0.0,
    method: str = "eigh",
    max_iters: int = 100,
    tol: float | None = None,
) -> Tensor:
    """Inverse ``p``-th root ``(A + eps I)^{-1/p}`` of a symmetric PSD matrix.

    .. math:: X = Q\\,\\mathrm{diag}\\big((\\max(\\lambda_i, 0) + \\epsilon)^{-1/p}\\big)\\,Q^\\top,
              \\qquad A = Q \\Lambda Q^\\top

    ``method="eigh"`` (default) symmetrises ``A``, takes ``torch.linalg.eigh`` in float64 and
    clamps negative round-off eigenvalues to zero before adding ``eps``; an eigenvalue that
    is still zero is floored at ``max(lambda) * finfo(A.dtype).eps`` (so a singular float32
    matrix gives a large but finite root). ``method="newton"`` runs the coupled Newton
    iteration of Guo & Higham (2006) in ``A``'s own dtype (matrix products only, GPU
    friendly), started from ``X_0 = I / c``, ``M_0 = A / c^p`` with
    ``c = (2 ||A||_F / (p + 1))^{1/p}``:

    .. math:: T_k = \\tfrac{1}{p}\\big((p + 1) I - M_k\\big),\\quad X_{k+1} = X_k T_k,
              \\quad M_{k+1} = T_k^{\\,p} M_k,

    stopping when ``||M_k - I||_max <= tol``. If the iteration loses definiteness (a
    matrix too ill-conditioned for the dtype), it warns once and falls back to ``"eigh"``.

    Cost: one ``n x n`` eigendecomposition (``eigh``), or ``O(p)`` matrix products per
    Newton iteration. Memory ``O(n^2)``.

    Args:
        A: symmetric PSD matrix ``(n, n)`` (any float dtype).
        p: root order, an int ``>= 1``.
        eps: ridge added to ``A`` (``>= 0``).
        method: ``"eigh"`` or ``"newton"``.
        max_iters: Newton iteration cap.
        tol: Newton stopping tolerance on ``||M - I||_max`` (default ``1e-6`` for float32,
            ``1e-12`` for float64).

    Returns:
        ``(A + eps I)^{-1/p}`` as a tensor of ``A``'s dtype and device.

    Raises:
        ValueError: ``A`` is not square, or bad ``p``/``eps``/``method``.
        NonFiniteError: ``A`` holds NaN or inf.

    Example:
        >>> A = torch.diag(torch.tensor([16.0, 1.0], dtype=torch.float64))
        >>> matrix_inverse_root(A, 4)
        tensor([[0.5000, 0.0000],
                [0.0000, 1.0000]], dtype=torch.float64)

    References:
        Guo & Higham, "A Schur-Newton method for the matrix p-th root and its inverse",
        SIAM J. Matrix Anal. Appl. 2006. Gupta, Koren & Singer, "Shampoo", ICML 2018.
    """
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}.")
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"Shape mismatch: expected a square matrix (n, n), got {tuple(A.shape)}.")
    p = check_int(p, "p")
    eps = check_nonnegative(eps, "eps")
    method = check_choice(method, "method", ("eigh", "newton"))
    check_finite(A, "the matrix passed to matrix_inverse_root")
    n = A.shape[0]
    if method == "eigh":
        S = A.to(torch.float64)
        S = 0.5 * (S + S.T)
        evals, Q = torch.linalg.eigh(S)
        evals = evals.clamp_min(0.0) + eps
        floor = evals.max().clamp_min(torch.finfo(torch.float64).tiny) * torch.finfo(A.dtype).eps
        evals = torch.maximum(evals, floor)
        return ((Q * evals.pow(-1.0 / p)) @ Q.T).to(A.dtype)
    max_iters = check_int(max_iters, "max_iters")
    if tol is None:
        tol = 1e-12 if A.dtype == torch.float64 else 1e-6
    tol = check_positive(tol, "tol")
    I = torch.eye(n, dtype=A.dtype, device=A.device)
    S = 0.5 * (A + A.T) + eps * I
    norm = torch.linalg.matrix_norm(S).clamp_min(torch.finfo(A.dtype).tiny)
    c = (2.0 * norm / (p + 1)) ** (1.0 / p)
    X = I / c
    M = S / c**p
    best = float("inf")
    for _ in range(max_iters):
        T = ((p + 1) * I - M) / p
        X_new = X @ T
        M = torch.linalg.matrix_power(T, p) @ M
        M = 0.5 * (M + M.T)
        err = float((M - I).abs().max())  # one sync per iteration, not per element
        if not math.isfinite(err) or err > 2.0 * best + 1.0:
            # lost definiteness in low precision (condition number ~ 1/finfo.eps):
            # fall back to the float64 eigendecomposition
            warn_once(
                "matrix_inverse_root: coupled Newton diverged (matrix too ill-conditioned "
                f"for {A.dtype}); fell back to eigh in float64. Increase eps to avoid this."
            )
            return matrix_inverse_root(A, p, eps=eps, method="eigh")
        X = X_new
        if err <= tol or (err > 0.9 * best and err < 1e3 * tol):
            break  # converged, or stagnated at the precision floor
        best = min(best, err)
    return 0.5 * (X + X.T)
