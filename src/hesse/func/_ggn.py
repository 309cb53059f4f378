"""Jacobian products through a cached output graph, and the GGN-vector product.

The generalised Gauss-Newton matrix of ``L(theta) = loss(f(theta), y)`` is

.. math:: G = J^\\top H_L J, \\qquad J = \\partial f / \\partial \\theta,\\;
          H_L = \\partial^2 \\mathrm{loss} / \\partial f^2 .

``G v`` costs one JVP (``J v``), one product with the small output Hessian, and one VJP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from .._typing import Params
from ._hvp import backward_pass

__all__ = ["OutputGraph", "ggn_vp"]


class OutputGraph:
    """Cached model outputs with their graph, for repeated ``J V`` and ``J^T W`` products.

    ``J V`` uses the double-VJP trick on the cached graph: ``J v = d/du <J^T u, v>``.

    Memory: besides the forward graph, only the graph of ``J^T u`` is kept. The dummy
    cotangent ``u`` is a zero scalar expanded to the outputs' shape (no outputs-sized
    buffer; for a language model the outputs are ``B*T*V`` floats), and the parameter-shaped
    roots ``J^T u`` are held as gradient edges of that graph, not as tensors (they are zeros).

    Args:
        outputs: model outputs built from ``params`` (any shape).
        params: tensors requiring grad.
    """

    def __init__(self, outputs: Tensor, params: Sequence[Tensor]):
        self.outputs = outputs
        self.params = list(params)
        zero = torch.zeros((), dtype=outputs.dtype, device=outputs.device, requires_grad=True)
        self._u = zero.expand(outputs.shape)
        vjp = backward_pass([outputs], self.params, [self._u], create_graph=True)
        self._live = [g is not None and g.requires_grad for g in vjp]
        self._roots = [get_gradient_edge(g) for g, ok in zip(vjp, self._live) if ok]

    def jmp(self, V: Sequence[Tensor]) -> Tensor:
        """``J V`` for ``k`` directions, tensors ``(k, *param.shape)``; returns ``(k, *out)``."""
        k = V[0].shape[0]
        if not self._roots:
            return torch.zeros(
                (k, *self.outputs.shape), dtype=self.outputs.dtype, device=self.outputs.device
            )
        if k == 1:  # one direction: one plain pass, no vmap overhead (CG)
            (out,) = backward_pass(
                self._roots, [self._u], [v[0] for v, ok in zip(V, self._live) if ok]
            )
            return out.unsqueeze(0)
        (out,) = torch.autograd.grad(
            self._roots,
            self._u,
            [v for v, ok in zip(V, self._live) if ok],
            retain_graph=True,
            is_grads_batched=True,
        )
        return out

    def vjp(self, W: Tensor) -> list[Tensor]:
        """``J^T W`` for ``W`` of shape ``(k, *out)``; returns tensors ``(k, *param.shape)``."""
        batched = W.shape[0] > 1
        if batched:
            res = torch.autograd.grad(
                self.outputs,
                self.params,
                W,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        else:
            res = backward_pass([self.outputs], self.params, [W[0]])
        return [
            torch.zeros((W.shape[0], *p.shape), dtype=p.dtype, device=p.device)
            if r is None
            else (r if batched else r.unsqueeze(0))
            for r, p in zip(res, self.params)
        ]


def ggn_vp(
    model_fn: Callable[[Params], Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    params: Params,
    v: Params,
) -> Params:
    """GGN-vector product ``J^T H_L J v`` with :mod:`torch.func` (no caching, vmap-friendly).

    Args:
        model_fn: ``params -> outputs``.
        loss_fn: ``outputs -> scalar loss`` (targets bound in).
        params, v: point and direction (same keys and shapes).
    """
    outputs, jv = torch.func.jvp(model_fn, (params,), (v,))
    hjv = torch.func.jvp(torch.func.grad(loss_fn), (outputs.detach(),), (jv,))[1]
    _, vjp_fn = torch.func.vjp(model_fn, params)
    return vjp_fn(hjv)[0]
