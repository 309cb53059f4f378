"""The Hessian of a plain function ``f: R^n -> R`` at a point (toy landscapes, tests)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_finite
from ..func import GradGraph
from .base import LinearOperator

__all__ = ["FunctionHessianOperator", "hessian_of"]


class FunctionHessianOperator(LinearOperator):
    """``H = d^2 f / dx^2`` at ``x`` for a scalar function of one tensor (flattened to ``n``).

    The gradient graph is built once; each product is one backward pass through it.
    ``.value`` and ``.gradient`` hold ``f(x)`` and ``grad f(x)`` (flattened).
    """

    def __init__(self, f: Callable[[Tensor], Tensor], x: Tensor):
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
            raise TypeError(
                "x must be a floating-point torch.Tensor, got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')}."
            )
        super().__init__((x.numel(), x.numel()), x.dtype, x.device, symmetric=True)
        self.f = f
        self.x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = f(self.x)
            if not isinstance(y, Tensor) or y.numel() != 1:
                raise ValueError(
                    f"f must return a scalar tensor; got shape {tuple(getattr(y, 'shape', ()))}."
                )
            check_finite(y, "f(x)")
            self._graph = GradGraph(y.reshape(()), [self.x])
        self.value = y.detach().reshape(())
        self.gradient = self._graph.grads[0].detach().reshape(-1)

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        (out,) = self._graph.hmp([V.T.reshape(k, *self.x.shape)])
        return out.reshape(k, -1).T


def hessian_of(f: Callable[[Tensor], Tensor], x: Tensor) -> FunctionHessianOperator:
    """The Hessian operator of ``f`` at ``x``.

    Example:
        >>> f = lambda w: w[0] ** 3 - w[1] ** 2
        >>> H = hessian_of(f, torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> H.to_dense()
        tensor([[ 6.,  0.],
                [ 0., -2.]], dtype=torch.float64)
    """
    return FunctionHessianOperator(f, x)
