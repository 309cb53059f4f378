r"""Diagonal of an operator: Hutchinson-type estimate with per-entry standard errors, or exact."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import NonFiniteError, check_choice, check_int
from ._probes import probes
from ._results import DiagonalResult
from .trace import DEFAULT_BLOCK_SIZE, _block_size, _matmat_blocked, _square_operator

__all__ = ["DiagonalResult", "hutchinson_diagonal", "exact_diagonal", "xdiag"]


def _partial(sums: Tensor | None, sq: Tensor | None, count: int) -> DiagonalResult | None:
    if sums is None or count == 0:
        return None
    mean = sums / count
    if count < 2:
        se = torch.full_like(mean, float("nan"))
    else:
        var = (sq - count * mean * mean).clamp_min(0) / (count - 1)
        se = torch.sqrt(var / count)
    return DiagonalResult(mean, se, count, "hutchinson")


def hutchinson_diagonal(
    A: Any,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
    probe: str = "rademacher",
    block_size: int | None = None,
) -> DiagonalResult:
    r"""Stochastic estimate of the diagonal (Bekas, Kokiopoulou & Saad 2007).

    .. math::

        \widehat{\operatorname{diag}}(A) = \frac{1}{m} \sum_{i=1}^m z_i \odot A z_i,

    unbiased for probes with :math:`\mathbb{E}[z z^\top] = I`. With Rademacher probes
    (exactly :math:`\pm 1`, default) entry ``j`` has variance
    :math:`\sum_{l \ne j} A_{jl}^2 / m`, so a diagonal matrix is recovered exactly.
    ``stderr[j]`` is the sample standard deviation of :math:`(z_i \odot A z_i)_j` over
    :math:`\sqrt{m}`.

    Cost: ``num_matvecs`` products in blocks of ``block_size``; memory ``O(n * block_size)``.

    Args:
        A: square :class:`~hesse.LinearOperator` or dense tensor.
        num_matvecs: number of probes (>= 2).
        generator: source of the probes; ``None`` draws a fresh seed.
        probe: ``"rademacher"`` (default) or ``"gaussian"``.
        block_size: columns per product (default ``min(num_matvecs, 32)``).

    Returns:
        :class:`DiagonalResult`.

    Raises:
        NonFiniteError: a product held NaN/inf; ``err.partial`` is the estimate so far.

    Example:
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 3.0]], dtype=torch.float64)
        >>> r = hutchinson_diagonal(A, 400, generator=torch.Generator().manual_seed(0))
        >>> bool((r.estimate - torch.tensor([2.0, 3.0], dtype=torch.float64)).abs().max() < 0.2)
        True

    References:
        Bekas, Kokiopoulou & Saad (2007), An estimator for the diagonal of a matrix.
        Appl. Numer. Math. 57(11-12).
    """
    op = _square_operator(A)
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs < 2:
        raise ValueError(f"Invalid num_matvecs={num_matvecs}; hutchinson_diagonal needs >= 2.")
    m = check_int(num_matvecs, "num_matvecs", minimum=2)
    kind = check_choice(probe, "probe", ("rademacher", "gaussian"))
    bs = (
        min(m, DEFAULT_BLOCK_SIZE)
        if block_size is None
        else check_int(block_size, "block_size", minimum=1)
    )
    n = op.shape[0]
    sums: Tensor | None = None
    sq: Tensor | None = None
    count = 0
    for start in range(0, m, bs):
        k = min(bs, m - start)
        Z = probes(kind, n, k, op.dtype, op.device, generator)
        AZ = op.matmat(Z)
        if not bool(torch.isfinite(AZ).all()):
            raise NonFiniteError(
                "Non-finite values (NaN/inf) in operator product (A @ probes) during "
                "hutchinson_diagonal.",
                _partial(sums, sq, count),
            )
        P = Z * AZ
        s, q = P.sum(1), (P * P).sum(1)
        sums = s if sums is None else sums + s
        sq = q if sq is None else sq + q
        count += k
    return _partial(sums, sq, count)  # type: ignore[return-value]


def exact_diagonal(A: Any, *, block_size: int = DEFAULT_BLOCK_SIZE) -> DiagonalResult:
    r"""The exact diagonal :math:`A_{jj} = e_j^\top A e_j` from ``n`` products with unit vectors.

    Cost: ``n`` matvecs in blocks of ``block_size`` (one batched pass per block); memory
    ``O(n * block_size)``. For small models (``n`` up to a few thousand).

    Args:
        A: square operator or dense tensor.
        block_size: columns per product (default 32).

    Returns:
        :class:`DiagonalResult` with zero ``stderr`` and ``exact=True``.

    Raises:
        NonFiniteError: a product held NaN/inf; ``err.partial`` holds the entries computed
            so far (a tensor of length < n).
    """
    op = _square_operator(A)
    bs = check_int(block_size, "block_size", minimum=1)
    n = op.shape[0]
    out = torch.empty(n, dtype=op.dtype, device=op.device)
    for start in range(0, n, bs):
        stop = min(n, start + bs)
        E = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
        idx = torch.arange(start, stop, device=op.device)
        E[idx, idx - start] = 1
        AE = op.matmat(E)
        if not bool(torch.isfinite(AE).all()):
            raise NonFiniteError(
                "Non-finite values (NaN/inf) in operator product (A @ identity block) during "
                "exact_diagonal.",
                out[:start].clone(),
            )
        out[start:stop] = AE[idx, idx - start]
    return DiagonalResult(out, torch.zeros_like(out), n, "exact", True)


def xdiag(
    A: Any,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
    probe: str = "rademacher",
    block_size: int | None = None,
) -> DiagonalResult:
    r"""XDiag: exchangeable leave-one-out diagonal estimator (low-rank part exact + residual).

    With ``m = num_matvecs // 2`` test vectors :math:`\Omega`, :math:`A\Omega = QR`, and the
    projector :math:`P_{(i)} = Q (I - s_i s_i^\top) Q^\top` onto the range of
    :math:`A\Omega` without column ``i`` (:math:`s_i` the normalised ``i``-th column of
    :math:`R^{-\top}`),

    .. math::

        \widehat{\operatorname{diag}}(A) = \frac{1}{m} \sum_{i=1}^m \Big[
        \operatorname{diag}(P_{(i)} A) + \omega_i \odot (I - P_{(i)}) A \omega_i \Big].

    The first term is exact given :math:`P_{(i)}`; the second is the Hutchinson diagonal
    estimator of the residual. Matrices with a dominant low-rank part (curvature matrices
    usually have one) are estimated far more accurately than by :func:`hutchinson_diagonal`
    for the same budget; a matrix of rank ``< m - 1`` is recovered exactly. ``stderr`` is the
    per-entry standard error of the ``m`` leave-one-out estimates.

    Cost: ``2 * (num_matvecs // 2)`` products (``A Omega`` and ``A^T Q``), in blocks; memory
    ``O(n m)``. If ``m >= n`` the exact diagonal is returned (``n`` products).

    Args:
        A: square operator or dense tensor.
        num_matvecs: total budget (>= 4).
        generator: source of the test vectors.
        probe: ``"rademacher"`` (default) or ``"gaussian"``.
        block_size: columns per product (default ``min(m, 32)``).

    Returns:
        :class:`DiagonalResult` with ``method="xdiag"``.

    References:
        Epperly, Tropp & Webber (2024), XTrace: Making the most of every sample in stochastic
        trace estimation. SIAM J. Matrix Anal. Appl. 45(1) (XDiag, section 4).
    """
    op = _square_operator(A)
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs < 4:
        raise ValueError(f"Invalid num_matvecs={num_matvecs}; xdiag needs at least 4.")
    total = check_int(num_matvecs, "num_matvecs", minimum=4)
    kind = check_choice(probe, "probe", ("rademacher", "gaussian"))
    n = op.shape[0]
    m = total // 2
    bs = _block_size(block_size, m)
    if m >= n:
        return exact_diagonal(op, block_size=bs)
    what = "operator product (A @ probes) during xdiag"
    Om = probes(kind, n, m, op.dtype, op.device, generator)
    Q, R = torch.linalg.qr(_matmat_blocked(op, Om, bs, what))
    eye = torch.eye(m, dtype=R.dtype, device=R.device)
    Rinv_T = torch.linalg.solve_triangular(R, eye, upper=True).T
    S = Rinv_T / torch.linalg.vector_norm(Rinv_T, dim=0)
    Z = _matmat_blocked(op.T, Q, bs, what)  # A^T Q
    c = (S * R).sum(0)  # s_i^T R e_i; (I - P_i) A w_i = c_i Q s_i since A w_i = Q R e_i
    QS, ZS = Q @ S, Z @ S
    samples = (Q * Z).sum(1, keepdim=True) - QS * ZS + c * Om * QS  # (n, m)
    est = samples.mean(1)
    se = samples.std(1, unbiased=True) / math.sqrt(m)
    return DiagonalResult(est, se, 2 * m, "xdiag")
