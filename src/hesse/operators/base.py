"""Matrix-free linear operators in torch, with lazy algebra.

A subclass implements :meth:`LinearOperator._matmat` on a block ``V`` of shape ``(n, k)`` and
declares ``shape``, ``dtype``, ``device``, ``symmetric`` and ``psd`` at construction.
Everything else (``matvec``, ``@``, ``+``, scalar ``*``, ``.T``, ``to_dense``, ``to_scipy``)
comes from the base class. Products stay in torch; nothing is copied through NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_vector, warn_once

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "IdentityOperator",
    "DiagonalOperator",
    "LowRankOperator",
    "SumOperator",
    "ScaledOperator",
    "ProductOperator",
    "aslinearoperator",
]

DEFAULT_MAX_DIM = 20_000


def _refuse_array(other: Any) -> None:
    if hasattr(other, "__array__"):
        raise TypeError(
            f"Operators multiply torch tensors, got {type(other).__name__}. Convert with "
            "torch.as_tensor(v, dtype=op.dtype, device=op.device)."
        )


class LinearOperator:
    """Base class of every operator: ``A @ V`` for ``V`` of shape ``(n,)`` or ``(n, k)``.

    Args:
        shape: ``(m, n)``.
        dtype, device: of the products.
        symmetric: ``A == A.T`` (declared, never probed).
        psd: positive semi-definite (declared, never probed; implies ``symmetric``).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        symmetric: bool = False,
        psd: bool = False,
    ):
        m, n = (int(s) for s in shape)
        self.shape = (m, n)
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = bool(symmetric or psd)
        self.psd = bool(psd)
        self.num_matvecs = 0  # columns multiplied so far (a block of k counts k)

    # -- to implement -------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatmat(self, V: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmat(V)
        raise NotImplementedError(f"{type(self).__name__} does not implement its adjoint.")

    # -- products -----------------------------------------------------------------------
    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape ``(n, k)``; one batched pass for all ``k`` columns."""
        check_vector(V, self.shape[1], self.dtype, self.device, "block")
        if V.ndim != 2:
            raise ValueError(
                f"matmat expects a block (n, k), got shape {tuple(V.shape)}; "
                "use matvec for a single vector."
            )
        self.num_matvecs += V.shape[1]
        return self._matmat(V)

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(n,)``."""
        check_vector(v, self.shape[1], self.dtype, self.device)
        if v.ndim != 1:
            raise ValueError(
                f"matvec expects a vector (n,), got shape {tuple(v.shape)}; use matmat for a block."
            )
        self.num_matvecs += 1
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def rmatmat(self, V: Tensor) -> Tensor:
        """``A.T @ V``."""
        check_vector(V, self.shape[0], self.dtype, self.device, "block")
        V2 = V.unsqueeze(1) if V.ndim == 1 else V
        self.num_matvecs += V2.shape[1]
        out = self._rmatmat(V2)
        return out.squeeze(1) if V.ndim == 1 else out

    __array_ufunc__ = None  # numpy_array @ op comes to __rmatmul__ (and is refused there)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        if isinstance(other, Tensor):
            return self.matvec(other) if other.ndim == 1 else self.matmat(other)
        _refuse_array(other)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, Tensor):  # v^T A == (A^T v)^T
            if other.ndim == 1:
                return self.rmatmat(other)
            return self.rmatmat(other.T).T
        _refuse_array(other)
        return NotImplemented

    # -- lazy algebra -------------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator([self, other])
        if isinstance(other, Tensor):
            return SumOperator([self, DenseOperator(other)])
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: Any) -> LinearOperator:
        return self + (-1.0) * aslinearoperator(other)

    def __mul__(self, alpha: Any) -> LinearOperator:
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            return ScaledOperator(self, float(alpha))
        if isinstance(alpha, Tensor) and alpha.ndim == 0:
            return ScaledOperator(self, float(alpha))
        return NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __truediv__(self, alpha: Any) -> LinearOperator:
        return self * (1.0 / float(alpha))

    @property
    def T(self) -> LinearOperator:
        if self.symmetric:
            return self
        return _AdjointOperator(self)

    def identity(self) -> IdentityOperator:
        """The identity of matching size, for ``A + damping * A.identity()``."""
        return IdentityOperator(self.shape[1], self.dtype, self.device)

    def damped(self, damping: float) -> LinearOperator:
        """``A + damping * I``."""
        return self + damping * self.identity()

    # -- materialisation ----------------------------------------------------------------
    def to_dense(self, max_dim: int = DEFAULT_MAX_DIM, block_size: int = 64) -> Tensor:
        """Materialise ``A`` as a dense ``(m, n)`` tensor by products with identity blocks.

        Costs ``n`` matvecs in blocks of ``block_size``. Refuses operators larger than
        ``max_dim`` in either dimension (raise it explicitly if you have the memory).
        """
        m, n = self.shape
        if max(m, n) > max_dim:
            gb = (
                m * n * torch.finfo(self.dtype).bits / 8 / 1e9
                if self.dtype.is_floating_point
                else 0
            )
            raise ValueError(
                f"Refusing to materialise a {m} x {n} operator (~{gb:.2f} GB) with "
                f"max_dim={max_dim}. Use matrix-free algorithms (hesse.top_eigenpairs, "
                f"hesse.spectral_density), a parameter subset, or pass a larger max_dim."
            )
        if max(m, n) > 0.5 * max_dim:
            warn_once(f"to_dense: materialising a {m} x {n} operator (close to max_dim={max_dim}).")
        cols = []
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (interop only; products run in torch)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as SciPyOp

        def mv(x):
            X = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return (
                (self @ X.reshape(self.shape[1], -1))
                .cpu()
                .numpy()
                .reshape(x.shape[:-1] + (self.shape[0],) if x.ndim == 1 else (self.shape[0], -1))
            )

        def mm(X):
            Xt = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.matmat(Xt).cpu().numpy()

        def rmm(X):
            Xt = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return self.rmatmat(Xt).cpu().numpy()

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        return SciPyOp(
            self.shape,
            matvec=lambda x: mm(x.reshape(-1, 1)).ravel(),
            matmat=mm,
            rmatvec=lambda x: rmm(x.reshape(-1, 1)).ravel(),
            rmatmat=rmm,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        flags = ", ".join(f for f in ("symmetric", "psd") if getattr(self, f))
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}" + (
            f", {flags})" if flags else ")"
        )


class _AdjointOperator(LinearOperator):
    def __init__(self, A: LinearOperator):
        super().__init__((A.shape[1], A.shape[0]), A.dtype, A.device)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A._rmatmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.A._matmat(V)


class DenseOperator(LinearOperator):
    """Wrap a dense ``(m, n)`` tensor. ``symmetric``/``psd`` are declared by the caller."""

    def __init__(self, A: Tensor, *, symmetric: bool | None = None, psd: bool = False):
        if not isinstance(A, Tensor) or A.ndim != 2:
            raise ValueError(f"DenseOperator expects a 2-D tensor, got {getattr(A, 'shape', A)!r}.")
        if symmetric is None:
            symmetric = A.shape[0] == A.shape[1] and bool(
                torch.allclose(A, A.T, rtol=1e-6, atol=1e-12 * float(A.abs().max().clamp_min(1)))
            )
        super().__init__(tuple(A.shape), A.dtype, A.device, symmetric=symmetric, psd=psd)
        self.A = A

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.A.T @ V

    def to_dense(self, max_dim: int = DEFAULT_MAX_DIM, block_size: int = 64) -> Tensor:
        return self.A.clone()


class IdentityOperator(LinearOperator):
    def __init__(self, n: int, dtype: torch.dtype = torch.float32, device: Any = "cpu"):
        super().__init__((n, n), dtype, device, symmetric=True, psd=True)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


class DiagonalOperator(LinearOperator):
    def __init__(self, diag: Tensor):
        if diag.ndim != 1:
            raise ValueError(
                f"DiagonalOperator expects a 1-D tensor, got shape {tuple(diag.shape)}."
            )
        super().__init__(
            (diag.numel(), diag.numel()),
            diag.dtype,
            diag.device,
            symmetric=True,
            psd=bool((diag >= 0).all()),
        )
        self.diag = diag

    def _matmat(self, V: Tensor) -> Tensor:
        return self.diag.unsqueeze(1) * V


class LowRankOperator(LinearOperator):
    """``U diag(s) U^T`` (symmetric low-rank), e.g. from an eigen-decomposition."""

    def __init__(self, U: Tensor, s: Tensor):
        n = U.shape[0]
        super().__init__((n, n), U.dtype, U.device, symmetric=True, psd=bool((s >= 0).all()))
        self.U, self.s = U, s

    def _matmat(self, V: Tensor) -> Tensor:
        return self.U @ (self.s.unsqueeze(1) * (self.U.T @ V))


def _check_same(ops: Sequence[LinearOperator], what: str) -> None:
    first = ops[0]
    for op in ops[1:]:
        if op.dtype != first.dtype or op.device != first.device:
            raise TypeError(
                f"Cannot {what} operators of dtype/device {first.dtype}/{first.device} "
                f"and {op.dtype}/{op.device}."
            )


class SumOperator(LinearOperator):
    def __init__(self, ops: Sequence[LinearOperator]):
        flat: list[LinearOperator] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, SumOperator) else [op])
        shape = flat[0].shape
        for op in flat:
            if op.shape != shape:
                raise ValueError(f"Shape mismatch in sum: {shape} vs {op.shape}.")
        _check_same(flat, "add")
        super().__init__(
            shape,
            flat[0].dtype,
            flat[0].device,
            symmetric=all(o.symmetric for o in flat),
            psd=all(o.psd for o in flat),
        )
        self.ops = flat

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0]._matmat(V)
        for op in self.ops[1:]:
            out = out + op._matmat(V)
        return out

    def _rmatmat(self, V: Tensor) -> Tensor:
        out = self.ops[0]._rmatmat(V)
        for op in self.ops[1:]:
            out = out + op._rmatmat(V)
        return out


class ScaledOperator(LinearOperator):
    def __init__(self, A: LinearOperator, alpha: float):
        if not math.isfinite(alpha):
            raise ValueError(f"Invalid scale alpha={alpha!r}; must be finite.")
        super().__init__(
            A.shape, A.dtype, A.device, symmetric=A.symmetric, psd=A.psd and alpha >= 0
        )
        self.A, self.alpha = A, alpha

    def _matmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.A._matmat(V)

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.A._rmatmat(V)


class ProductOperator(LinearOperator):
    """``A @ B`` (lazy)."""

    def __init__(self, A: LinearOperator, B: LinearOperator):
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"Shape mismatch in product: {A.shape} @ {B.shape}.")
        _check_same([A, B], "compose")
        super().__init__((A.shape[0], B.shape[1]), A.dtype, A.device)
        self.A, self.B = A, B

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A._matmat(self.B._matmat(V))

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.B._rmatmat(self.A._rmatmat(V))


def aslinearoperator(A: Any) -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator` (dense tensors are wrapped)."""
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    raise TypeError(
        f"Expected a hesse LinearOperator or a 2-D torch.Tensor, got {type(A).__name__}."
    )
