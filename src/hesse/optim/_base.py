"""Shared optimizer plumbing: one flat parameter vector over all groups, counters, closures,
the non-finite policy and ``state_dict`` checks used by every optimizer in :mod:`hesse.optim`.

Every method in :mod:`hesse.optim` treats the parameters of all its groups as one vector
``x`` of size ``n`` (in the promoted dtype of the parameters, at least float32, on the device
of the first one). Algorithm hyperparameters must agree across groups; ``lr`` may differ per
group and then scales each group's part of the step (a fixed diagonal scaling of the direction).

All algorithm state lives in ``self.state[anchor]`` (``anchor`` = the first parameter with the
working dtype) as tensors and Python numbers, so ``state_dict``/``load_state_dict`` round-trip
it exactly and a resumed run is bit-identical.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import check_positive
from ..func import GradGraph, OutputGraph, ravel, ravel_block, unravel_block
from ..operators.base import LinearOperator
from ._closure import Evaluation, evaluate

__all__ = [
    "SecondOrderOptimizer",
    "ParamVector",
    "GradHVPOperator",
    "GGNProductOperator",
    "COUNTERS",
    "STATE_TAG",
    "check_optimizer_params",
    "check_state_dict",
    "Rollback",
    "params_and_model",
]

COUNTERS = ("iterations", "func_evals", "grad_evals", "hvps", "restarts")
STATE_TAG = "hesse_optimizer"  # state_dict key naming the class that saved it


def check_optimizer_params(params: Sequence[Tensor], owner: str) -> None:
    """Validate the parameters an optimizer gets (at construction, with a fix in the message)."""
    if not params:
        raise ValueError(f"{owner} got an empty parameter list.")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"Parameter {i} is a {type(p).__name__}; expected a torch.Tensor.")
        if not p.requires_grad:
            raise ValueError(
                f"Parameter {i} (shape {tuple(p.shape)}) has requires_grad=False; pass only "
                "trainable parameters, e.g. [p for p in model.parameters() if p.requires_grad]."
            )
        if not p.is_floating_point():
            raise TypeError(f"Parameter {i} has dtype {p.dtype}; expected a floating dtype.")
        if p.is_meta:
            raise ValueError(
                f"Parameter {i} (shape {tuple(p.shape)}) is on the 'meta' device, which holds no "
                f"values, so {owner} cannot step it. Materialise the model first, e.g. "
                "model.to_empty(device='cpu') and initialise or load its weights."
            )


def params_and_model(params: Any, model: Any, owner: str) -> tuple[Any, nn.Module]:
    """Resolve the params-first signature of optimizers that also need the model.

    ``Opt(params, ..., model=model)`` optimises ``params`` (which must belong to ``model``);
    ``Opt(model, ...)`` is shorthand for all trainable parameters of ``model``.
    """
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError(f"{owner} got a model both as params and as model=; pass it once.")
        model = params
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("The model has no parameters that require grad.")
    elif model is None:
        raise TypeError(
            f"{owner} needs the model: {owner}(model.parameters(), model=model, loss_fn=loss_fn) "
            f"(or {owner}(model, loss_fn) for all its trainable parameters)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    return params, model


def check_state_dict(
    obj: Any, state_dict: Any, required: Iterable[str] = (), defaults: Mapping | None = None
) -> None:
    """Refuse, at load time, a state saved by another class or missing keys.

    ``required`` are top-level keys the state must hold; with ``defaults`` every parameter
    group must hold exactly these hyperparameters (plus ``params``).
    """
    name = type(obj).__name__
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{name}.load_state_dict expects the dict returned by {name}.state_dict(), got a "
            f"{type(state_dict).__name__}."
        )
    tag = state_dict.get(STATE_TAG)
    if tag is not None and tag != name:
        raise ValueError(
            f"This state_dict was saved by {tag}, not {name}; load it into a {tag} (or start "
            f"{name} from scratch)."
        )
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(
            f"Invalid state_dict for {name}: missing keys {missing} (it holds "
            f"{sorted(map(str, state_dict))}). Pass the dict returned by {name}.state_dict()."
        )
    if defaults is None:
        return
    groups = state_dict.get("param_groups")
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"Invalid state_dict for {name}: no 'param_groups' list.")
    want = set(defaults) | {"params"}
    for i, g in enumerate(groups):
        have = set(g) if isinstance(g, Mapping) else set()
        lost, extra = sorted(want - have), sorted(have - want)
        if lost or extra:
            raise ValueError(
                f"Invalid state_dict for {name}: parameter group {i} is missing "
                f"hyperparameters {lost} and has unexpected ones {extra}; it was not saved by "
                f"{name}. Pass the dict returned by {name}.state_dict()."
            )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class Rollback:
    """Undo what a failed step touched: parameters, one state dict level, generator states.

    Use as ``with Rollback(params, states, generators): ...``; on an exception every parameter
    gets its value back, each dict in ``states`` its entries (lists copied one level, so
    appends are undone; tensors mutated in place are not, so mutate only after the checks)
    and each generator its state, then the exception propagates.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        states: Sequence[dict] = (),
        generators: Sequence[torch.Generator | None] = (),
    ):
        self.params = list(params)
        self.states = list(states)
        self.generators = [g for g in generators if g is not None]

    def __enter__(self) -> Rollback:
        self._values = [p.detach().clone() for p in self.params]
        self._states = [
            {k: list(v) if isinstance(v, list) else v for k, v in st.items()} for st in self.states
        ]
        self._gens = [g.get_state() for g in self.generators]
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            with torch.no_grad():
                for p, v in zip(self.params, self._values):
                    p.copy_(v)
            for st, saved in zip(self.states, self._states):
                st.clear()
                st.update(saved)
            for g, s in zip(self.generators, self._gens):
                g.set_state(s)
        return False


class ParamVector:
    """View a list of parameters as one flat vector (concatenation in group order).

    The flat dtype is the promoted dtype of the parameters, at least float32 (dense linear
    algebra has no float16 kernels on CPU), on the device of the first parameter.
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self.dtype = functools.reduce(
            torch.promote_types, [p.dtype for p in self.params], torch.float32
        )
        self.device = self.params[0].device
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.n = sum(self.numels)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return ravel([t.to(device=self.device, dtype=self.dtype) for t in tensors])

    def versions(self) -> list[int]:
        """In-place modification counters of the parameters (change when they are written)."""
        return [p._version for p in self.params]

    def get(self) -> Tensor:
        return self.flatten([p.detach() for p in self.params])

    def set_(self, x: Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self.params, x.split(self.numels)):
                p.copy_(chunk.view_as(p))

    def split_block(self, V: Tensor) -> list[Tensor]:
        """Split ``(n, k)`` into tensors ``(k, *p.shape)`` (typed and placed like ``p``)."""
        return [
            t.to(device=p.device, dtype=p.dtype)
            for t, p in zip(unravel_block(V, self.shapes), self.params)
        ]

    def join_block(self, parts: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split_block`: tensors ``(k, *p.shape)`` to ``(n, k)``."""
        k = parts[0].shape[0]
        return ravel_block([t.to(device=self.device, dtype=self.dtype) for t in parts], k)


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
        check_optimizer_params(all_params, type(self).__name__)
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
        self._anchor = next((p for p in all_params if p.dtype == self._vec.dtype), all_params[0])

    def _validate(self, group: dict[str, Any]) -> None:
        """Check one group's hyperparameters (raise with a message naming the value)."""

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[STATE_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict, ("state", "param_groups"), self.defaults)
        state_dict = {k: v for k, v in state_dict.items() if k != STATE_TAG}
        # all state lives on the anchor; keep its dtypes (torch would cast them to the
        # anchor's dtype, e.g. float32 work vectors of a float16 model)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pos = [i for i, p in enumerate(self._vec.params) if p is self._anchor][0]
        saved = state_dict["state"].get(ids[pos]) if pos < len(ids) else None
        super().load_state_dict(state_dict)
        if saved is not None:
            self.state[self._anchor] = _to_device(saved, self._vec.device)
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
        # ``first``: evaluate raised on NaN/inf. At trial points ev.f is inf for a non-finite
        # loss and callers test g through g^T d (NaN propagates), saving a sync.
        return ev, self._vec.flatten(ev.grads)

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
        owner = getattr(self, "_closure_owner", None)
        rollback = Rollback(self._vec.params, [self._st], [getattr(self, "generator", None)])
        try:
            with rollback:
                out = self._iterate(closure, **kwargs)
        except Exception:
            # the step never happened: parameters, state and probe stream are restored
            self._versions, self._graph_cache, self._closure_owner = None, None, owner
            raise
        self._st["iterations"] += 1
        return out

    def _iterate(self, closure: Callable[[], Any], **kwargs: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class GradHVPOperator(LinearOperator):
    """The Hessian of the closure's loss as a :class:`~hesse.LinearOperator`, ``H V``.

    A flat-vector view of :class:`hesse.func.GradGraph` over the closure's ``create_graph``
    gradient (Pearlmutter): each block is one backward pass through the cached gradient.
    """

    def __init__(self, vec: ParamVector, graph: GradGraph, chunk: int = 256):
        super().__init__((vec.n, vec.n), vec.dtype, vec.device, symmetric=True)
        self.vec, self.graph, self.chunk = vec, graph, chunk

    @classmethod
    def from_evaluation(cls, vec: ParamVector, ev: Evaluation) -> GradHVPOperator:
        grads = ev.graph_grads or [None] * len(vec.params)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, vec.params)]
        return cls(vec, GradGraph(ev.loss, vec.params, grads=grads))

    def _matmat(self, V: Tensor) -> Tensor:
        blocks = [
            self.vec.join_block(self.graph.hmp(self.vec.split_block(V_c)))
            for V_c in V.split(self.chunk, dim=1)
        ]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


class GGNProductOperator(LinearOperator):
    """The generalised Gauss-Newton ``G = J^T H_L J`` of the closure's ``(loss, outputs)``.

    ``J V`` and ``J^T W`` come from :class:`hesse.func.OutputGraph` on the closure's retained
    graph; ``H_L``, the Hessian of the loss w.r.t. ``outputs``, from autograd (no loss type
    is assumed). Loss terms that do not go through ``outputs`` (explicit regularisers) are not
    part of ``G``.
    """

    def __init__(self, vec: ParamVector, loss: Tensor, outputs: Tensor):
        super().__init__((vec.n, vec.n), vec.dtype, vec.device, symmetric=True, psd=False)
        self.vec, self.outputs = vec, outputs
        with torch.enable_grad():
            (self.dloss,) = torch.autograd.grad(loss, outputs, create_graph=True)
            self.graph = OutputGraph(outputs, vec.params)

    def _matmat(self, V: Tensor) -> Tensor:
        if not self.dloss.requires_grad:  # loss linear in the outputs
            return torch.zeros_like(V)
        with torch.enable_grad():
            JV = self.graph.jmp(self.vec.split_block(V))  # (k, *out)
            batched = V.shape[1] > 1
            (HJV,) = torch.autograd.grad(
                self.dloss,
                self.outputs,
                JV if batched else JV[0],
                retain_graph=True,
                is_grads_batched=batched,
            )
            return self.vec.join_block(self.graph.vjp(HJV if batched else HJV.unsqueeze(0)))
