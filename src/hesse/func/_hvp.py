"""Hessian-vector products of a scalar function of parameters, in two modes.

* ``"rev-rev"`` (default, fastest on CPU): Pearlmutter's trick on a cached ``create_graph``
  gradient. The first product builds the gradient graph once; every product after that is one
  backward pass through it (about 1-2x the cost of one gradient).
* ``"fwd-rev"``: forward-mode JVP of the reverse-mode gradient with :mod:`torch.func`; nothing
  is cached, and it composes with ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._typing import Params

__all__ = ["hvp", "GradGraph"]


def hvp(
    f: Callable[[Params], Tensor], params: Params, v: Params, *, mode: str = "rev-rev"
) -> Params:
    """Hessian-vector product ``H v`` of a scalar function ``f(params)``.

    .. math:: (Hv)_i = \\sum_j \\frac{\\partial^2 f}{\\partial \\theta_i \\partial \\theta_j} v_j

    Args:
        f: maps a parameter dict to a scalar tensor.
        params: point of evaluation.
        v: direction, same keys and shapes as ``params``.
        mode: ``"rev-rev"`` or ``"fwd-rev"``.

    Returns:
        ``H v`` as a dict shaped like ``params``.

    Example:
        >>> p = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
        >>> f = lambda q: q["w"][0] ** 3 - q["w"][1] ** 2
        >>> hvp(f, p, {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)})["w"]
        tensor([ 6., -2.], dtype=torch.float64)
    """
    if mode == "fwd-rev":
        return torch.func.jvp(torch.func.grad(f), (params,), (v,))[1]
    if mode != "rev-rev":
        raise ValueError(f"Invalid mode={mode!r}; expected 'rev-rev' or 'fwd-rev'.")
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        graph = GradGraph(f(leaves), list(leaves.values()))
        out = graph.hvp([v[k] for k in leaves])
    return dict(zip(leaves, out))


try:  # the C++ engine call behind torch.autograd.grad (torch >= 2.4)
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older torch: the public function
    _engine_run_backward = None


def backward_pass(
    outputs: Sequence[Tensor | torch.autograd.graph.GradientEdge],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    create_graph: bool = False,
) -> tuple[Tensor | None, ...]:
    """One reverse pass ``sum_i grad_outputs[i]^T d outputs[i] / d inputs`` that keeps the
    graph (``None`` for an input the outputs do not reach).

    ``torch.autograd.grad`` with ``retain_graph=True, allow_unused=True`` (and
    ``create_graph``) for one direction,
    minus its Python-side argument handling: that costs microseconds per tensor on every
    product and, on the first call, imports ``torch.fx.experimental.symbolic_shapes`` and
    sympy (~0.4 s of CPU) for a shape comparison. The callers pass cotangents of exactly the
    outputs' shapes and dtypes (the C++ engine still checks them).
    """
    if _engine_run_backward is None:  # pragma: no cover
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
    return _engine_run_backward(
        tuple(outputs),
        tuple(grad_outputs),
        True,
        create_graph,
        tuple(inputs),
        True,
        accumulate_grad=False,
    )


# Below this many saved elements in the double-backward graph (and on CPU), one vmapped
# backward over a block beats a backward per column: the graph is so small that per-pass
# overhead dominates. Above it vmap loses 1.1-2x (it copies the batched matmul operands).
# Measured on digits MLPs/CNNs (benchmarks/README.md, "blocks"): batched wins by 1.5-2x at
# <= 1.1e5 saved elements and k >= 4, and is at best even from ~1.3e5 on.
_BATCHED_MAX_SAVED = 110_000
_BATCHED_MIN_K = 4


def _saved_numel(roots: Sequence[Tensor], limit: int) -> int:
    """Elements of the tensors the autograd graph of ``roots`` saved (stops past ``limit``).

    A deterministic size of the work of one backward pass through a cached graph, read from
    the graph's nodes once (never from timing).
    """
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set = set()
    total = 0
    while stack and total <= limit:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        for name in dir(f):
            if not name.startswith("_saved_"):
                continue
            try:
                v = getattr(f, name)
            except RuntimeError:  # freed or inaccessible buffer
                continue
            if isinstance(v, Tensor):
                total += v.numel()
            elif isinstance(v, (tuple, list)):
                total += sum(t.numel() for t in v if isinstance(t, Tensor))
        stack.extend(nf for nf, _ in f.next_functions)
    return total


class GradGraph:
    """A cached ``create_graph`` gradient of ``loss`` w.r.t. ``params``, for repeated products.

    Args:
        loss: scalar tensor built from ``params``.
        params: tensors requiring grad.
        grads: the gradient of ``loss`` already built with ``create_graph=True`` (one entry
            per parameter, ``None`` if unused), e.g. by an optimizer's closure; skips that pass.
    """

    def __init__(
        self, loss: Tensor, params: Sequence[Tensor], grads: Sequence[Tensor | None] | None = None
    ):
        self.params = list(params)
        self.loss = loss.detach()
        if grads is None:
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        # Parameters that do not affect the gradient (e.g. a bias feeding a linear loss) have
        # zero Hessian rows; autograd reports them as unused.
        self._live = [g.requires_grad for g in self.grads]
        self._live_idx = [i for i, ok in enumerate(self._live) if ok]
        self._live_grads = [self.grads[i] for i in self._live_idx]
        self._all_live = len(self._live_idx) == len(self.params)
        self._batched_ok: bool | None = None  # decided once from the graph's size (see hmp)

    def hvp(self, v: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for one direction given as a list of tensors shaped like ``params``."""
        if len(v) != len(self.params) or any(t.shape != p.shape for t, p in zip(v, self.params)):
            raise ValueError(
                "Shape mismatch: expected one tensor per parameter with shapes "
                f"{[tuple(p.shape) for p in self.params]}, got {[tuple(t.shape) for t in v]}."
            )
        return self._backward(v, batched=False)

    def batched_wins(self) -> bool:
        """Whether :meth:`hmp` uses one vmapped backward for blocks of ``k >= 4``.

        Decided once per graph from its shapes, never from timing, so the same call gives
        bit-identical results on every run: on CUDA always (one launch per kernel instead of
        ``k``); on CPU when the double-backward graph saved at most ``1.1e5`` elements.
        """
        if self._batched_ok is None:
            dev = self.params[0].device if self.params else torch.device("cpu")
            self._batched_ok = dev.type != "cpu" or (
                _saved_numel(self._live_grads, _BATCHED_MAX_SAVED) <= _BATCHED_MAX_SAVED
            )
        return self._batched_ok

    def hmp(self, V: Sequence[Tensor]) -> list[Tensor]:
        """``H V`` for ``k`` directions at once: each tensor is ``(k, *param.shape)``.

        Either one vmapped backward pass over the cached graph (``is_grads_batched``) or one
        backward pass per column. The choice depends only on ``k`` and the graph's shapes
        (:meth:`batched_wins`): vmap wins by up to 2-3x on small graphs (per-pass overhead)
        but loses up to 2x on large ones (it copies every batched matmul operand).
        """
        k = V[0].shape[0]
        if k == 1:
            return [t.unsqueeze(0) for t in self._backward([v[0] for v in V], batched=False)]
        if k >= _BATCHED_MIN_K and self.batched_wins():
            return self._backward(V, batched=True)
        out = [torch.empty_like(v) for v in V]
        for j in range(k):
            for o, r in zip(out, self._backward([v[j] for v in V], batched=False)):
                o[j] = r
        return out

    def _backward(self, v: Sequence[Tensor], batched: bool) -> list[Tensor]:
        live = self._live_idx
        if not live:
            return [torch.zeros_like(t) for t in v]
        gv = v if self._all_live else [v[i] for i in live]
        if batched:
            res = torch.autograd.grad(
                self._live_grads,
                self.params,
                gv,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        else:
            res = backward_pass(self._live_grads, self.params, gv)
        if self._all_live and all(r is not None for r in res):
            return list(res)
        return [torch.zeros_like(t) if r is None else r for t, r in zip(v, res)]
