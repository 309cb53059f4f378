"""Shared optimizer plumbing: one flat parameter vector over all groups, counters, closures.

Every method in :mod:`hesse.optim` treats the parameters of all its groups as one vector
``x`` of size ``n`` (in the promoted dtype of the parameters, on the device of the first
one). Algorithm hyperparameters must agree across groups; ``lr`` may differ per group and then
scales each group's part of the step (a fixed diagonal scaling of the direction).

All algorithm state lives in ``self.state[anchor]`` (``anchor`` = the first parameter with the
working dtype) as tensors and Python numbers, so ``state_dict``/``load_state_dict`` round-trip
it exactly and a resumed run is bit-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._checks import check_positive
from ..operators.base import LinearOperator
from ._closure import Evaluation, evaluate

__all__ = [
    "SecondOrderOptimizer",
    "ParamVector",
    "GradHVPOperator",
    "GGNProductOperator",
    "COUNTERS",
]

COUNTERS = ("iterations", "func_evals", "grad_evals", "hvps", "restarts")


class ParamVector:
    """View a list of parameters as one flat vector (concatenation in group order)."""

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in self.params])
        self.device = self.params[0].device
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)
        self.uniform = all(p.dtype == self.dtype and p.device == self.device for p in self.params)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        if self.uniform:
            return torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])

    def versions(self) -> list[int]:
        """In-place modification counters of the parameters (change when they are written)."""
        return [p._version for p in self.params]

    def get(self) -> Tensor:
        return self.flatten([p.detach() for p in self.params])

    def set_(self, x: Tensor) -> None:
        with torch.no_grad():
            if len(self.params) == 1:
                self.params[0].copy_(x.view_as(self.params[0]))
                return
            for p, chunk in zip(self.params, x.split(self.numels)):
                p.copy_(chunk.view_as(p))

    def split(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into tensors shaped (and typed, placed) like the parameters."""
        return [
            c.view_as(p).to(device=p.device, dtype=p.dtype)
            for p, c in zip(self.params, v.split(self.numels))
        ]

    def split_block(self, V: Tensor) -> list[Tensor]:
        """Split ``(n, k)`` into tensors ``(k, *p.shape)``."""
        k = V.shape[1]
        return [
            c.T.reshape(k, *p.shape).to(device=p.device, dtype=p.dtype)
            for p, c in zip(self.params, V.split(self.numels))
        ]


class SecondOrderOptimizer(Optimizer):
    """Base class: flat parameter vector, counters, closure evaluation and validation.

    Subclasses set ``_shared`` (hyperparameters that must agree across groups), implement
    ``_iterate(closure, **kwargs)`` (one iteration) and may override ``_validate(group)``.
    """

    _shared: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        check_positive(defaults.get("lr", 1.0), "lr")
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        if not all_params:
            raise ValueError("The optimizer got an empty parameter list.")
        for i, p in enumerate(all_params):
            if not p.requires_grad:
                raise ValueError(
                    f"Parameter {i} (shape {tuple(p.shape)}) has requires_grad=False; pass only "
                    "trainable parameters, e.g. [p for p in model.parameters() if p.requires_grad]."
                )
            if not p.is_floating_point():
                raise TypeError(f"Parameter {i} has dtype {p.dtype}; expected a floating dtype.")
        for g in self.param_groups:
            check_positive(g["lr"], "lr")
            self._validate(g)
        first = self.param_groups[0]
        for g in self.param_groups[1:]:
            for key in self._shared:
                if g[key] != first[key]:
                    raise ValueError(
                        f"Invalid {key}={g[key]!r} in a parameter group (the first group has "
                        f"{first[key]!r}): {type(self).__name__} treats all groups as one vector, "
                        f"so {key} must be the same in every group (only lr may differ)."
                    )
        self._vec = ParamVector(all_params)
        self._anchor = next(p for p in all_params if p.dtype == self._vec.dtype)

    def _validate(self, group: dict[str, Any]) -> None:
        """Check one group's hyperparameters (raise with a message naming the value)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._versions = None  # cached evaluations belong to the state before loading
        self._graph_cache = None
        self._closure_owner = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_vec", None) is not None:
            raise RuntimeError(
                f"{type(self).__name__} does not support adding parameter groups after "
                "construction; build a new optimizer."
            )
        super().add_param_group(param_group)

    # -- state ---------------------------------------------------------------------------
    @property
    def _st(self) -> dict[str, Any]:
        st = self.state[self._anchor]
        if "iterations" not in st:
            for c in COUNTERS:
                st[c] = 0
        return st

    @property
    def counters(self) -> dict[str, int]:
        """Iterations, function/gradient evaluations, HVPs and restarts so far."""
        st = self._st
        return {c: st[c] for c in COUNTERS}

    def _hp(self, key: str) -> Any:
        return self.param_groups[0][key]

    def _scale(self) -> float | Tensor:
        """``lr`` as a scalar, or as a flat vector when groups differ."""
        lrs = [g["lr"] for g in self.param_groups]
        if all(lr == lrs[0] for lr in lrs):
            return float(lrs[0])
        return torch.cat(
            [
                torch.full(
                    (p.numel(),), float(g["lr"]), dtype=self._vec.dtype, device=self._vec.device
                )
                for g in self.param_groups
                for p in g["params"]
            ]
        )

    # -- evaluation ----------------------------------------------------------------------
    def _evaluate(
        self, closure: Callable[[], Any] | None, *, create_graph: bool = False, first: bool = False
    ) -> tuple[Evaluation, Tensor]:
        """Run the closure; count it; return the evaluation and the flat gradient."""
        ev = evaluate(closure, self._vec.params, create_graph=create_graph, require_finite=first)
        st = self._st
        st["func_evals"] += 1
        st["grad_evals"] += 1
        g = self._vec.flatten(ev.grads)
        # at trial points the callers test g through g^T d (NaN propagates), saving a sync
        if not math.isfinite(ev.f) or (first and not bool(torch.isfinite(g).all())):
            if first:
                from .._checks import NonFiniteError

                raise NonFiniteError(
                    "The closure returned a non-finite loss or gradient at the current "
                    "parameters; nothing to restart from."
                )
            ev.f = math.inf
        return ev, g

    def _phi(
        self, closure: Callable[[], Any], x0: Tensor, d: Tensor, *, create_graph: bool = False
    ) -> Callable:
        """Line function ``alpha -> (f, g, dphi)``; sets the parameters to ``x0 + alpha d``.

        The last trial is kept in ``self._last_trial = (alpha, evaluation, g)``: when the line
        search accepts it, the parameters are already there (and, with ``create_graph``, its
        graph can serve the next step).
        """

        def phi(alpha: float) -> tuple[float, Tensor, float]:
            self._vec.set_(torch.add(x0, d, alpha=alpha))
            ev, g = self._evaluate(closure, create_graph=create_graph)
            self._last_trial = (alpha, ev, g)
            dphi = float(g.dot(d)) if math.isfinite(ev.f) else math.nan
            if not math.isfinite(dphi):
                return math.inf, g, math.nan
            return ev.f, g, dphi

        return phi

    def _cached_point(self, closure: Callable[[], Any] | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, loss, g)`` at the current parameters, reusing the last accepted evaluation.

        The previous step stores its accepted point; if the parameters are unchanged and the
        closure is the same object as last step's it is reused (the objective is assumed
        deterministic); otherwise the closure runs. Mini-batch loops that build a new closure
        per batch therefore always get a fresh evaluation.
        """
        st = self._st
        owner = getattr(self, "_closure_owner", None)
        self._closure_owner = closure
        same_fn = owner is None or owner is closure  # a new closure object = new data (batch)
        if same_fn and "x" in st and getattr(self, "_versions", None) == self._vec.versions():
            return st["x"], st["loss"], st["g"]  # untouched since we set them (fast path)
        x = self._vec.get()
        if same_fn and "x" in st and st["x"].shape == x.shape and torch.equal(st["x"], x):
            self._versions = self._vec.versions()
            return st["x"], st["loss"], st["g"]
        ev, g = self._evaluate(closure, first=True)
        st["x"], st["loss"], st["g"] = x, ev.loss.to(x.dtype), g
        self._versions = self._vec.versions()
        return x, st["loss"], g

    def _accept(self, x: Tensor, loss: Tensor | float, g: Tensor) -> None:
        st = self._st
        if not isinstance(loss, Tensor):
            loss = torch.tensor(loss, dtype=x.dtype, device=x.device)
        st["x"], st["loss"], st["g"] = x, loss.to(x.dtype).reshape(()), g
        self._versions = self._vec.versions()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Tensor:  # type: ignore[override]
        """Perform exactly one iteration (one direction and its step).

        Args:
            closure: re-evaluates the model and returns the loss (see :mod:`hesse.optim`).

        Returns:
            The loss at the parameters the iteration started from.
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure: opt.step(closure) with "
                "def closure(): opt.zero_grad(); loss = f(); loss.backward(); return loss"
            )
        out = self._iterate(closure, **kwargs)
        self._st["iterations"] += 1
        return out

    def _iterate(self, closure: Callable[[], Any], **kwargs: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class GradHVPOperator(LinearOperator):
    """The Hessian of the closure's loss as a :class:`~hesse.LinearOperator`, ``H V``.

    Products differentiate the cached ``create_graph`` gradient again (Pearlmutter), one
    batched backward pass for a block of ``k`` columns (``is_grads_batched``).
    """

    def __init__(self, vec: ParamVector, graph_grads: Sequence[Tensor | None], chunk: int = 256):
        super().__init__((vec.n, vec.n), vec.dtype, vec.device, symmetric=True)
        self.vec = vec
        self.live = [i for i, g in enumerate(graph_grads) if g is not None and g.requires_grad]
        self.grads = [graph_grads[i] for i in self.live]
        self.chunk = chunk

    def _matmat(self, V: Tensor) -> Tensor:
        if not self.live:
            return torch.zeros_like(V)
        outs = []
        for V_c in V.split(self.chunk, dim=1):
            k = V_c.shape[1]
            parts = self.vec.split_block(V_c)
            params = [self.vec.params[i] for i in self.live]
            if k == 1:
                res = torch.autograd.grad(
                    self.grads,
                    params,
                    [parts[i][0] for i in self.live],
                    retain_graph=True,
                    allow_unused=True,
                )
                res = [None if r is None else r.unsqueeze(0) for r in res]
            else:
                res = torch.autograd.grad(
                    self.grads,
                    params,
                    [parts[i] for i in self.live],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
            full: list[Tensor] = []
            j = 0
            for i, p in enumerate(self.vec.params):
                r = res[self.live.index(i)] if i in self.live else None
                if r is None:
                    r = torch.zeros((k, p.numel()), dtype=self.dtype, device=self.device)
                full.append(r.reshape(k, -1).to(device=self.device, dtype=self.dtype))
                j += 1
            outs.append(torch.cat(full, dim=1).T)
        return torch.cat(outs, dim=1)


class GGNProductOperator(LinearOperator):
    """The generalised Gauss-Newton ``G = J^T H_L J`` of the closure's ``(loss, outputs)``.

    ``J`` is the Jacobian of ``outputs`` w.r.t. the parameters and ``H_L`` the Hessian of the
    loss w.r.t. ``outputs``, both taken from the closure's retained graph by autograd (no loss
    type is assumed). Cost per block: one double-VJP (``J V``), one output-space Hessian
    product and one VJP (``J^T W``). Loss terms that do not go through ``outputs`` (explicit
    regularisers) are not part of ``G``.
    """

    def __init__(self, vec: ParamVector, loss: Tensor, outputs: Tensor):
        from ..func import OutputGraph

        super().__init__((vec.n, vec.n), vec.dtype, vec.device, symmetric=True, psd=False)
        self.vec = vec
        self.outputs = outputs
        with torch.enable_grad():
            (self.dloss,) = torch.autograd.grad(loss, outputs, create_graph=True)
            self.graph = OutputGraph(outputs, vec.params)
        self._loss_quadratic = self.dloss.requires_grad

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        if not self._loss_quadratic:
            return torch.zeros_like(V)
        with torch.enable_grad():
            if k == 1:  # plain autograd: no vmap overhead for single vectors (CG)
                parts = self._single(self.vec.split(V[:, 0]))
            else:
                JV = self.graph.jmp(self.vec.split_block(V))  # (k, *out)
                (HJV,) = torch.autograd.grad(
                    self.dloss, self.outputs, JV, retain_graph=True, is_grads_batched=True
                )
                parts = self.graph.vjp(HJV)
        return (
            torch.cat([p.reshape(k, -1) for p in parts], dim=1)
            .to(device=self.device, dtype=self.dtype)
            .T
        )

    def _single(self, v: list[Tensor]) -> list[Tensor]:
        g = self.graph
        live = [i for i, ok in enumerate(g._live) if ok]
        if not live:
            return [torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device) for p in g.params]
        (jv,) = torch.autograd.grad(
            [g._vjp_u[i] for i in live], g._u, [v[i] for i in live], retain_graph=True
        )
        (hjv,) = torch.autograd.grad(self.dloss, self.outputs, jv, retain_graph=True)
        res = torch.autograd.grad(self.outputs, g.params, hjv, retain_graph=True, allow_unused=True)
        return [
            (torch.zeros_like(p) if r is None else r).unsqueeze(0) for r, p in zip(res, g.params)
        ]
