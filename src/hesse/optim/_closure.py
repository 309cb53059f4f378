"""Evaluate a torch-style closure, optionally keeping the gradient's graph (second derivatives).

The closure contract is written once, in the :mod:`hesse.optim` module docstring. This module
implements it:

* :func:`evaluate` calls the closure under ``torch.enable_grad()``, validates what it returns
  (a scalar loss, or ``(loss, outputs)``), and reads the gradient from ``p.grad``.
* With ``create_graph=True`` (or ``retain_graph=True``) the closure runs inside
  :func:`graph_mode` and :func:`hesse.objective.math_attention` (the fused attention kernels
  have no double backward), which temporarily
  replaces :func:`torch.autograd.backward` (and hence ``Tensor.backward``) by a version that
  computes ``torch.autograd.grad(loss, params, create_graph=True)``. The gradients keep their
  graph (so Hessian-vector products are one more backward pass), ``p.grad`` still receives the
  plain (detached) gradient, and no parameter <-> gradient reference cycle is created. The
  patch is process-global while the closure runs (not thread safe) and is always undone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._checks import _LIKELY_CAUSES, NonFiniteError, warn_once
from ..objective import math_attention

__all__ = ["Evaluation", "closure_loss", "evaluate", "graph_mode", "loss_only"]


class _GraphContext:
    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.grads: list[Tensor | None] = [None] * len(self.params)
        self.calls = 0
        self.create_graph = True


_active: list[_GraphContext] = []


@contextlib.contextmanager
def graph_mode(params: Sequence[Tensor], *, create_graph: bool = True) -> Iterator[_GraphContext]:
    """Make every ``backward()`` inside the block keep its graph (and, with ``create_graph``,
    build a differentiable gradient of ``params``).

    Yields a context whose ``grads`` hold the (summed) gradients, with their graphs when
    ``create_graph``. The forward graph is always retained (for products through outputs).
    """
    ctx = _GraphContext(params)
    ctx.create_graph = create_graph
    original = torch.autograd.backward

    def backward(
        tensors: Any,
        grad_tensors: Any = None,
        retain_graph: Any = None,
        create_graph: bool = False,
        grad_variables: Any = None,
        inputs: Any = None,
    ) -> None:
        outs = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        if grad_tensors is None:
            gouts = None
        elif isinstance(grad_tensors, Tensor):
            gouts = (grad_tensors,)
        else:
            gouts = tuple(grad_tensors)
        grads = torch.autograd.grad(
            outs,
            ctx.params,
            gouts,
            retain_graph=True,
            create_graph=ctx.create_graph,
            allow_unused=True,
        )
        ctx.calls += 1
        for i, (p, g) in enumerate(zip(ctx.params, grads)):
            if g is None:
                continue
            ctx.grads[i] = g if ctx.grads[i] is None else ctx.grads[i] + g
            gd = g.detach()
            p.grad = gd.clone() if p.grad is None else p.grad + gd

    torch.autograd.backward = backward
    _active.append(ctx)
    try:
        yield ctx
    finally:
        _active.pop()
        torch.autograd.backward = original


@dataclass
class Evaluation:
    """One closure call: the loss (detached), the flat gradient, and optional extras.

    Attributes:
        loss: the returned loss, detached (what ``step`` returns to the caller).
        f: the loss as a Python float (``inf`` if non-finite).
        grads: per-parameter gradients (detached; zeros where a parameter got none).
        graph_grads: per-parameter gradients with their graph (``create_graph`` mode only;
            ``None`` for parameters the loss does not depend on).
        outputs: model outputs if the closure returned ``(loss, outputs)``.
        graph_loss: the loss with its graph (``create_graph`` mode only).
    """

    loss: Tensor
    f: float
    grads: list[Tensor]
    graph_grads: list[Tensor | None] | None = None
    outputs: Tensor | None = None
    graph_loss: Tensor | None = None


def _unpack(ret: Any) -> tuple[Tensor, Tensor | None]:
    outputs = None
    if isinstance(ret, (tuple, list)):
        if len(ret) != 2:
            raise TypeError(
                "The closure must return the loss, or a pair (loss, outputs); got a "
                f"{type(ret).__name__} of length {len(ret)}."
            )
        ret, outputs = ret
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"The closure returned (loss, outputs) with outputs of type "
                f"{type(outputs).__name__}; outputs must be the model's output tensor."
            )
    if not isinstance(ret, Tensor):
        raise TypeError(
            f"The closure must return the loss as a torch.Tensor, got {type(ret).__name__}. "
            "Write: def closure(): opt.zero_grad(); loss = f(); loss.backward(); return loss"
        )
    if ret.numel() != 1:
        raise ValueError(
            f"The closure must return a scalar loss, got a tensor of shape {tuple(ret.shape)}. "
            "Reduce it (e.g. loss.mean()) before calling backward()."
        )
    return ret, outputs


def loss_only(closure: Callable[[], Any]) -> float:
    """Call ``closure`` for its loss only: no graph is built and ``backward()`` does nothing.

    The closure runs under ``torch.no_grad()`` with :func:`torch.autograd.backward` replaced by
    a no-op, so a torch-style closure costs one forward pass (used for Martens' CG-iterate
    backtracking and the Armijo search, which only compare losses). ``p.grad`` is untouched.
    Returns the loss as a float (``inf`` if non-finite).
    """
    original = torch.autograd.backward

    def backward(*args: Any, **kwargs: Any) -> None:
        return None

    torch.autograd.backward = backward
    try:
        with torch.no_grad():
            ret = closure()
    finally:
        torch.autograd.backward = original
    loss, _ = _unpack(ret)
    f = float(loss)
    return f if math.isfinite(f) else math.inf


def closure_loss(closure: Callable[[], Any] | None) -> Tensor | None:
    """Run an optional torch-style closure (first-order style: it fills ``p.grad``).

    Returns its loss, detached, or ``None`` without a closure; a non-finite loss raises
    :class:`~hesse.NonFiniteError` before the optimizer touches anything.
    """
    if closure is None:
        return None
    with torch.enable_grad():
        loss, _ = _unpack(closure())
    loss = loss.detach()
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteError(
            f"The closure returned a non-finite loss ({float(loss)}); parameters and optimizer "
            f"state are unchanged. {_LIKELY_CAUSES}"
        )
    return loss


def evaluate(
    closure: Callable[[], Any] | None,
    params: Sequence[Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool = False,
    require_finite: bool = False,
) -> Evaluation:
    """Call ``closure`` once and return its loss and the gradient of ``params``.

    Args:
        closure: the torch-style closure (see :mod:`hesse.optim`).
        params: the optimised parameters.
        create_graph: keep the gradient's graph, for Hessian-vector products.
        retain_graph: keep the forward graph (``graph_loss``/``outputs`` stay differentiable,
            e.g. for GGN products) without differentiating the gradient.
        require_finite: raise :class:`~hesse.NonFiniteError` on a NaN/inf loss or gradient
            (used at the start of a step, where there is no previous point to fall back to).

    Raises:
        TypeError: no closure, or the closure returned something other than a loss.
        ValueError: non-scalar loss, or no parameter received a gradient.
        NonFiniteError: non-finite loss or gradient when ``require_finite``.
    """
    if closure is None or not callable(closure):
        raise TypeError(
            "This optimizer needs a closure: opt.step(closure) with "
            "def closure(): opt.zero_grad(); loss = f(); loss.backward(); return loss"
        )
    for p in params:
        p.grad = None
    graph_grads = None
    graph_loss = None
    with torch.enable_grad():
        if create_graph or retain_graph:
            # second derivatives through attention need the twice-differentiable math backend
            with math_attention(), graph_mode(params, create_graph=create_graph) as ctx:
                ret = closure()
            loss, outputs = _unpack(ret)
            if ctx.calls == 0:
                raise ValueError(
                    "The closure did not call loss.backward(); second-order methods read the "
                    "gradient it produces. Write: loss = f(); loss.backward(); return loss"
                )
            graph_grads = ctx.grads if create_graph else None
            graph_loss = loss
        else:
            ret = closure()
            loss, outputs = _unpack(ret)
    raw = [p.grad for p in params]
    if all(g is None for g in raw):
        raise ValueError(
            "No parameter received a gradient after the closure ran: call loss.backward() "
            "inside the closure, and make sure the loss depends on the optimised parameters "
            "(requires_grad=True)."
        )
    if any(g is None for g in raw):
        missing = [i for i, g in enumerate(raw) if g is None]
        warn_once(
            f"Parameters at positions {missing} received no gradient from the closure; "
            "their gradient is taken as zero."
        )
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)]
    f = float(loss.detach())
    if not math.isfinite(f):
        if require_finite:
            raise NonFiniteError(
                f"The closure returned a non-finite loss ({f}) at the current parameters; "
                f"parameters and optimizer state are unchanged. {_LIKELY_CAUSES}"
            )
        f = math.inf
    elif require_finite:
        for i, g in enumerate(grads):
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteError(
                    f"Non-finite gradient (NaN/inf) for parameter {i} at the current parameters; "
                    f"parameters and optimizer state are unchanged. {_LIKELY_CAUSES}"
                )
    return Evaluation(loss.detach(), f, grads, graph_grads, outputs, graph_loss)
