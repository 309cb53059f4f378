"""Natural gradient descent with the Fisher information (exact by CG, or K-FAC)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import check_choice, check_finite, check_int, check_positive
from ..func import output_loss
from ..linalg.solve import CGResult, cg_solve
from ..operators.factory import curvature_operator
from ..operators.kfac import KFACOperator
from ._base import STATE_TAG, Rollback, check_optimizer_params, check_state_dict, params_and_model
from ._closure import evaluate

__all__ = ["NaturalGradient"]

METHODS = ("cg", "kfac")


class NaturalGradient(Optimizer):
    """Natural gradient descent (Amari 1998) on the current mini-batch.

    Per step, with ``F`` the Fisher of the batch the closure evaluated (same normalisation
    as its loss)::

        g <- grad L(theta)                               # closure: loss.backward()
        method="cg":   d <- cg_solve(F, g, damping)      # F = FisherOperator(kind=fisher)
                       (warm-started from the previous d; max_iters CG iterations)
        method="kfac": d <- (A (x) G + damping I)^{-1} g # KFACOperator of the batch, exact
        buf <- momentum * buf + d
        theta <- theta - lr * buf

    ``"cg"`` is exact up to the CG tolerance and costs ``~2 * iterations`` backward passes
    (for small models); ``"kfac"`` costs one extra forward/backward per batch plus small
    eigendecompositions (for large ones; :class:`~hesse.optim.KFAC` adds running averages).

    The batch is taken from the closure itself: a forward hook records the model's input and
    a forward pre-hook on ``loss_fn`` records the targets, so the closure must call the very
    ``loss_fn`` object given here on the model's output.

    Args:
        params: the parameters to optimise (a subset of ``model``'s), or the model itself
            as shorthand for all its trainable parameters.
        model: the network (keyword; may be omitted when ``params`` is the model).
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        lr: step size ``> 0`` (1 is the damped natural-gradient / Gauss-Newton step).
        damping: Tikhonov damping ``> 0``.
        method: ``"cg"`` (default) or ``"kfac"``.
        fisher: ``"exact"`` (default), ``"mc"`` or ``"empirical"``.
        momentum: heavy-ball momentum in ``[0, 1)``.
        max_iters: CG iteration budget per step (truncation is a status, not an error).
        tol: CG relative residual tolerance.
        num_samples: sampled targets per input for ``fisher="mc"``.
        generator: randomness for ``fisher="mc"`` (default: a private fresh generator).

    Attributes:
        last_solve: the :class:`~hesse.linalg.solve.CGResult` of the last CG step.

    Example:
        >>> model = nn.Linear(3, 1).double()
        >>> X = torch.randn(20, 3, dtype=torch.float64)
        >>> y = X @ torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> opt = NaturalGradient(
        ...     model.parameters(), nn.MSELoss(), lr=1.0, damping=1e-12, tol=1e-12, model=model
        ... )
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = opt.loss_fn(model(X), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)  # linear least squares: one Gauss-Newton step solves it
        >>> torch.allclose(model.weight, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
        True

    References:
        Amari, "Natural gradient works efficiently in learning", Neural Computation 1998.
        Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.
    """

    def __init__(
        self,
        params: Any,
        loss_fn: nn.Module | None = None,
        lr: float = 1.0,
        damping: float = 1e-3,
        method: str = "cg",
        fisher: str = "exact",
        momentum: float = 0.0,
        max_iters: int = 50,
        tol: float = 1e-6,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        model: nn.Module | None = None,
    ):
        params, model = params_and_model(params, model, "NaturalGradient")
        if loss_fn is None:
            raise TypeError(
                "NaturalGradient needs loss_fn= (the likelihood loss the closure calls)."
            )
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(
                "loss_fn must be an nn.Module (nn.MSELoss, nn.CrossEntropyLoss, "
                f"nn.BCEWithLogitsLoss); got {type(loss_fn).__name__}."
            )
        output_loss(loss_fn)  # a likelihood loss (NotImplementedError otherwise)
        check_positive(lr, "lr")
        check_positive(damping, "damping")
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not (0.0 <= momentum < 1.0)
        ):
            raise ValueError(f"Invalid momentum={momentum!r}; must lie in [0, 1).")
        self.method = check_choice(method, "method", METHODS)
        self.fisher = check_choice(fisher, "fisher", ("exact", "mc", "empirical"))
        self.max_iters = check_int(max_iters, "max_iters")
        self.tol = check_positive(tol, "tol")
        self.num_samples = check_int(num_samples, "num_samples")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        super().__init__(params, dict(lr=lr, damping=damping, momentum=momentum))
        params = [p for g in self.param_groups for p in g["params"]]
        check_optimizer_params(params, "NaturalGradient")
        if generator is None:
            generator = torch.Generator(device=params[0].device)
            generator.seed()
        self.generator = generator
        self.model = model
        self.loss_fn = loss_fn
        self.last_solve: CGResult | None = None
        self._batch: dict[str, Any] = {}
        self._names(params)

    def _record(self):
        batch = self._batch = {}

        def model_hook(module: nn.Module, args: tuple) -> None:
            batch["X"] = args[0] if len(args) == 1 else tuple(args)

        def loss_hook(module: nn.Module, args: tuple) -> None:
            if len(args) >= 2:
                batch["y"] = args[1]

        return [
            self.model.register_forward_pre_hook(model_hook),
            self.loss_fn.register_forward_pre_hook(loss_hook),
        ]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:  # type: ignore[override]
        """One natural-gradient step; ``closure`` as in :mod:`hesse.optim`. Returns the loss."""
        params = [p for g in self.param_groups for p in g["params"]]
        handles = self._record()
        try:
            ev = evaluate(closure, params, require_finite=True)
        finally:
            for h in handles:
                h.remove()
        if "X" not in self._batch or "y" not in self._batch:
            raise ValueError(
                "NaturalGradient needs the batch: the closure must call the model and the "
                "loss_fn passed to NaturalGradient (loss = loss_fn(model(X), y))."
            )
        data = (self._batch["X"], self._batch["y"])
        self._batch = {}
        g = torch.cat([t.reshape(-1) for t in ev.grads])
        group0 = self.param_groups[0]
        damping = check_positive(group0["damping"], "damping")
        for group in self.param_groups:
            check_positive(group["lr"], "lr")
        names = self._names(params)
        with Rollback((), (), [self.generator]):
            d, res = self._direction(data, names, g, damping, params)
            check_finite(d, "the natural-gradient direction (Fisher solve)")
        if res is not None:
            self.last_solve = res
            self.state[params[0]]["direction"] = d.clone()
        offset = 0
        for group in self.param_groups:
            lr, mom = check_positive(group["lr"], "lr"), group["momentum"]
            for p in group["params"]:
                n = p.numel()
                dp = d[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
                if mom:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = dp.clone()
                    else:
                        buf.mul_(mom).add_(dp)
                    dp = buf
                p.add_(dp, alpha=-lr)
        return ev.loss

    def _direction(self, data, names, g, damping, params):
        if self.method == "cg":
            mc = dict(num_samples=self.num_samples, generator=self.generator)
            F = curvature_operator(
                f"fisher_{self.fisher}",
                self.model,
                self.loss_fn,
                data,
                params=names,
                check_determinism=False,
                **(mc if self.fisher == "mc" else {}),
            )
            x0 = self.state[params[0]].get("direction") if params[0] in self.state else None
            with torch.enable_grad():
                res = cg_solve(F, g, damping=damping, x0=x0, tol=self.tol, max_iters=self.max_iters)
            return res.solution, res
        K = KFACOperator(
            self.model,
            self.loss_fn,
            data,
            params=names,
            fisher=self.fisher,
            num_samples=self.num_samples,
            generator=self.generator,
        )
        with torch.enable_grad():
            return K.inverse(damping) @ g, None

    def _names(self, params: list[Tensor]) -> list[str]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"NaturalGradient's parameters {missing} do not belong to model; pass "
                "model.parameters() (or a subset of them)."
            )
        return [by_id[id(p)] for p in params]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()
        sd[STATE_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict, ("state", "param_groups", "generator"), self.defaults)
        state_dict = {k: v for k, v in state_dict.items() if k != STATE_TAG}
        gen = state_dict.pop("generator")
        super().load_state_dict(state_dict)
        self.generator.set_state(gen)
