"""Curvature-adaptive learning rates and diagonal-curvature optimizers.

* :class:`CurvatureLR` measures ``lambda_max`` of the loss Hessian (or GGN) every few steps
  with warm-started Lanczos and sets ``lr = c * 2 / lambda_max`` (per parameter group or
  for all of them): the classical stability bound of gradient descent on a quadratic
  (gradient descent diverges along the top eigenvector once ``lr > 2 / lambda_max``).
* :class:`AdaHessian` and :class:`SophiaH` precondition with a Hutchinson estimate of the
  Hessian diagonal, ``diag(H) ~ z * (H z)`` with exact Rademacher ``+-1`` probes ``z``
  (unbiased; exact for a diagonal ``H``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import (
    NonFiniteError,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
)
from ..linalg._probes import rademacher
from ..linalg.eigen import top_eigenpairs
from ..operators.factory import CURVATURES, curvature_operator
from ._base import STATE_TAG, check_optimizer_params, check_state_dict
from ._closure import evaluate

__all__ = ["CurvatureLR", "AdaHessian", "SophiaH", "hutchinson_diagonal_of_graph"]


def _check_betas(betas: Any) -> tuple[float, float]:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas={betas!r}; must be a pair (beta1, beta2).")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas={betas!r}; betas[{i}] must lie in [0, 1).")
    return float(betas[0]), float(betas[1])


def _make_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        return generator
    g = torch.Generator(device=device)
    g.seed()
    return g


# -- curvature-adaptive learning rate -----------------------------------------------------------
class CurvatureLR:
    """Set each group's learning rate to ``c * 2 / lambda_max`` of the curvature, periodically.

    Use it like a scheduler, after ``opt.step()``::

        sched = CurvatureLR(opt, model, loss_fn, (X_probe, y_probe), c=0.5, interval=20)
        for X, y in loader:
            opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()
            sched.step()

    At construction and then every ``interval`` calls to :meth:`step` it computes
    ``lambda_max`` by :func:`hesse.top_eigenpairs` (Lanczos, warm-started from the previous
    top eigenvector, so a re-measurement usually costs a handful of products) of the
    ``curvature`` operator of the loss on ``data``, and sets

    .. math:: \\mathrm{lr}_g = \\min\\big(\\mathrm{max\\_lr},\\ c \\cdot 2 / \\lambda_{\\max}\\big)

    for every group ``g``: with ``per_layer=False`` one ``lambda_max`` of all the optimizer's
    parameters; with ``per_layer=True`` the ``lambda_max`` of each group's own diagonal block
    (put one layer per group). If ``lambda_max <= 0`` (no positive curvature) the lr is left
    unchanged (or set to ``max_lr`` if given).

    Cost per measurement: ``num_matvecs`` Hessian-vector products at most (about 2 backward
    passes each) per operator.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose parameters belong to ``model``.
        model, loss_fn: define the objective (see :class:`hesse.Objective`).
        data: a fixed ``(X, y)`` batch or list of batches used for the measurements.
        c: safety fraction in ``(0, 1]``... or larger to probe the edge of stability (``> 0``).
        interval: calls to :meth:`step` between measurements.
        per_layer: one ``lambda_max`` per parameter group instead of one global value.
        curvature: a name of :func:`hesse.curvature_operator` (``"hessian"``, default;
            ``"ggn"``, ``"fisher_exact"``, ``"fisher_mc"``, ``"fisher_empirical"``).
        num_matvecs: Lanczos budget per measurement.
        tol: Lanczos relative eigenvalue tolerance.
        max_lr: optional upper bound on the learning rate.
        generator: randomness of the first Lanczos start vector.

    Attributes:
        history: list of ``(step, [lambda_max per group], [lr per group])``.

    Example:
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> X = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> sched = CurvatureLR(opt, model, nn.MSELoss(), (X, y), c=0.5, tol=1e-8)
        >>> round(opt.param_groups[0]["lr"], 6)  # H = X^T X = diag(9, 1): lr = 1 / 9
        0.111111
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        c: float = 0.5,
        interval: int = 10,
        per_layer: bool = False,
        curvature: str = "hessian",
        num_matvecs: int = 30,
        tol: float = 1e-2,
        max_lr: float | None = None,
        generator: torch.Generator | None = None,
        **objective_kwargs: Any,
    ):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        self.optimizer = optimizer
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.c = check_positive(c, "c")
        self.interval = check_int(interval, "interval")
        self.per_layer = bool(per_layer)
        self.curvature = check_choice(curvature, "curvature", CURVATURES)
        self.num_matvecs = check_int(num_matvecs, "num_matvecs")
        self.tol = check_positive(tol, "tol")
        self.max_lr = None if max_lr is None else check_positive(max_lr, "max_lr")
        by_id = {id(p): n for n, p in model.named_parameters()}
        self._group_names: list[list[str]] = []
        for group in optimizer.param_groups:
            names = []
            for p in group["params"]:
                if id(p) not in by_id:
                    raise ValueError(
                        "CurvatureLR: the optimizer's parameters must belong to model."
                    )
                names.append(by_id[id(p)])
            self._group_names.append(names)
        first = next(iter(model.parameters()))
        self.generator = _make_generator(generator, first.device)
        self.objective_kwargs = objective_kwargs
        self.steps = 0
        self._v0: list[Tensor | None] = [None] * (len(self._group_names) if per_layer else 1)
        self.history: list[tuple[int, list[float], list[float]]] = []
        self.last_results: list[Any] = []
        self.measure()

    def _operators(self) -> list[Any]:
        kw = dict(check_determinism=False, **self.objective_kwargs)
        if self.curvature == "fisher_mc":
            kw.setdefault("generator", self.generator)
        groups = self._group_names if self.per_layer else [sum(self._group_names, [])]
        return [
            curvature_operator(
                self.curvature, self.model, self.loss_fn, self.data, params=names, **kw
            )
            for names in groups
        ]

    def measure(self) -> list[float]:
        """Measure ``lambda_max`` now and set the learning rates; returns the eigenvalues.

        Raises:
            NonFiniteError: a curvature product or ``lambda_max`` is not finite; learning
                rates, warm starts and the generator are left as they were.
        """
        v0, rng = list(self._v0), self.generator.get_state()
        try:
            lams, results = self._measure()
        except Exception:
            self._v0 = v0
            self.generator.set_state(rng)
            raise
        self.last_results = results
        lrs = []
        for gi, group in enumerate(self.optimizer.param_groups):
            lam = lams[gi] if self.per_layer else lams[0]
            if lam > 0:
                lr = self.c * 2.0 / lam
                if self.max_lr is not None:
                    lr = min(lr, self.max_lr)
                group["lr"] = lr
            elif self.max_lr is not None:
                group["lr"] = self.max_lr
            lrs.append(float(group["lr"]))
        self.history.append((self.steps, lams, lrs))
        return lams

    def _measure(self) -> tuple[list[float], list[Any]]:
        lams, results = [], []
        for i, op in enumerate(self._operators()):
            n = op.shape[0]
            if n == 1:
                lam = float(op.to_dense()[0, 0])
                results.append(None)
            else:
                with torch.enable_grad():
                    res = top_eigenpairs(
                        op,
                        k=1,
                        tol=self.tol,
                        num_matvecs=self.num_matvecs,
                        v0=self._v0[i],
                        generator=self.generator,
                    )
                self._v0[i] = res.eigenvectors[:, 0].detach().clone()
                lam = float(res.eigenvalues[0])
                results.append(res)
            if not math.isfinite(lam):
                raise NonFiniteError(
                    f"CurvatureLR measured a non-finite lambda_max ({lam}); learning rates are "
                    "unchanged."
                )
            lams.append(lam)
        return lams, results

    def step(self) -> None:
        """Count one optimizer step; re-measure every ``interval`` steps."""
        self.steps += 1
        if self.steps % self.interval == 0:
            self.measure()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "v0": [None if v is None else v.clone() for v in self._v0],
            "generator": self.generator.get_state(),
            "history": list(self.history),
            STATE_TAG: type(self).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_dict(self, state, ("steps", "v0", "generator", "history"))
        if len(state["v0"]) != len(self._v0):
            raise ValueError(
                f"Invalid state_dict for CurvatureLR: {len(state['v0'])} warm starts, this "
                f"scheduler measures {len(self._v0)} operators (per_layer={self.per_layer})."
            )
        self.steps = int(state["steps"])
        self._v0 = [None if v is None else v.clone() for v in state["v0"]]
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])


# -- Hutchinson diagonal from a differentiable gradient -----------------------------------------
def hutchinson_diagonal_of_graph(
    graph_grads: list[Tensor | None],
    params: list[Tensor],
    num_probes: int,
    generator: torch.Generator,
    *,
    retain_graph: bool = False,
) -> list[Tensor]:
    """``mean_j z_j * (H z_j)`` per parameter, ``z_j`` exact Rademacher ``+-1`` vectors.

    ``graph_grads`` are gradients built with ``create_graph=True``; each probe costs one
    backward pass through them. Unbiased: ``E[z * Hz] = diag(H)``. The graph is freed after
    the last probe unless ``retain_graph``.
    """
    live = [i for i, g in enumerate(graph_grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if not live:
        return out
    n = sum(params[i].numel() for i in live)
    dtype, device = params[live[0]].dtype, params[live[0]].device
    for j in range(num_probes):
        z = rademacher(n, 1, dtype=dtype, device=device, generator=generator)[:, 0]
        zs = list(z.split([params[i].numel() for i in live]))
        zs = [zz.view_as(params[i]) for zz, i in zip(zs, live)]
        hz = torch.autograd.grad(
            [graph_grads[i] for i in live],
            [params[i] for i in live],
            zs,
            retain_graph=retain_graph or j < num_probes - 1,
            allow_unused=True,
        )
        for i, zz, h in zip(live, zs, hz):
            if h is not None:
                out[i].add_(zz * h.detach())
    if num_probes > 1:
        for t in out:
            t.div_(num_probes)
    return out


class _DiagonalCurvatureOptimizer(Optimizer):
    """Shared skeleton of AdaHessian and SophiaH.

    ``step(closure)`` runs the closure (keeping the gradient's graph, attention on the math
    backend) every step, estimates ``diag(H)`` by Hutchinson every ``update_interval`` steps,
    checks that loss, gradient and estimate are finite (else :class:`~hesse.NonFiniteError`
    with nothing changed, the probe generator included), then calls ``_update`` per
    parameter. Subclasses implement ``_check(group)``, ``_init_state(p)`` and
    ``_update(p, group, state, grad, diag_or_None)``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        num_probes: int,
        generator: torch.Generator | None,
    ):
        self._check(defaults)
        super().__init__(params, defaults)
        check_optimizer_params(self._params(), type(self).__name__)
        for group in self.param_groups:
            self._check(group)
        self.num_probes = check_int(num_probes, "num_probes")
        first = self.param_groups[0]["params"][0]
        self.generator = _make_generator(generator, first.device)
        self.steps = 0

    def _check(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, p: Tensor) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, p: Tensor, group: dict, st: dict, g: Tensor, D: Tensor | None) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:  # type: ignore[override]
        """One step; ``closure`` as in :mod:`hesse.optim`. Returns the loss."""
        if closure is None:
            raise TypeError(
                f"{type(self).__name__} needs a closure: opt.step(closure) with "
                "def closure(): opt.zero_grad(); loss = f(); loss.backward(); return loss"
            )
        for group in self.param_groups:  # hyperparameters may have been changed (schedulers)
            self._check(group)
        params = self._params()
        need = self.steps % self.param_groups[0]["update_interval"] == 0
        ev = evaluate(closure, params, create_graph=need, require_finite=True)
        diag = None
        if need:
            rng = self.generator.get_state()
            with torch.enable_grad():
                diag = hutchinson_diagonal_of_graph(
                    ev.graph_grads, params, self.num_probes, self.generator
                )
            bad = [i for i, d in enumerate(diag) if not bool(torch.isfinite(d).all())]
            if bad:
                self.generator.set_state(rng)  # the failed step never happened
                raise NonFiniteError(
                    f"Non-finite Hessian-diagonal estimate (NaN/inf in Hessian-vector products) "
                    f"for parameters {bad}; parameters and optimizer state are unchanged. "
                    "Likely causes: a non-twice-differentiable operation in the model or loss, "
                    "or float16 overflow."
                )
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                self._update(p, group, st, ev.grads[k], None if diag is None else diag[k])
                k += 1
        self.steps += 1
        return ev.loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()
        sd["steps"] = self.steps
        sd[STATE_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(
            self, state_dict, ("state", "param_groups", "generator", "steps"), self.defaults
        )
        state_dict = {k: v for k, v in state_dict.items() if k != STATE_TAG}
        gen = state_dict.pop("generator")
        steps = int(state_dict.pop("steps"))
        super().load_state_dict(state_dict)
        self.steps = steps
        self.generator.set_state(gen)


def _spatial_average(d: Tensor, p: Tensor) -> Tensor:
    """AdaHessian's spatial averaging: mean of ``|D|`` over the kernel of a conv weight."""
    if p.ndim >= 3:
        dims = tuple(range(2, p.ndim))
        return d.abs().mean(dim=dims, keepdim=True).expand_as(d)
    return d


class AdaHessian(_DiagonalCurvatureOptimizer):
    """AdaHessian (Yao et al. 2021): Adam with the Hutchinson Hessian diagonal as second moment.

    Per step (``closure`` as in :mod:`hesse.optim`; the optimizer re-runs it keeping the
    gradient's graph)::

        D <- mean_j z_j * (H z_j)  (z_j Rademacher +-1; conv kernels: spatial mean of |D|)
             every update_interval steps, else the previous D
        m <- b1 m + (1 - b1) g;     v <- b2 v + (1 - b2) D^2
        p <- p - lr * (m / (1 - b1^t)) / ((v / (1 - b2^t))^(k/2) + eps) - lr * wd * p

    Args:
        params: parameters or groups.
        lr: learning rate ``> 0`` (paper default 0.15).
        betas: ``(b1, b2)`` in ``[0, 1)``.
        eps: ``> 0``.
        weight_decay: decoupled weight decay ``>= 0``.
        hessian_power: ``k`` in ``(0, 1]``.
        update_interval: steps between Hessian-diagonal estimates.
        num_probes: Rademacher probes per estimate.
        generator: randomness of the probes (default: a private fresh generator).

    References:
        Yao et al., "ADAHESSIAN: An adaptive second order optimizer for machine learning",
        AAAI 2021.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_interval: int = 1,
        num_probes: int = 1,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            update_interval=update_interval,
        )
        super().__init__(params, defaults, num_probes, generator)

    def _check(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")
        group["betas"] = _check_betas(group["betas"])
        check_positive(group["eps"], "eps")
        check_nonnegative(group["weight_decay"], "weight_decay")
        check_positive(group["hessian_power"], "hessian_power")
        if group["hessian_power"] > 1:
            raise ValueError(
                f"Invalid hessian_power={group['hessian_power']!r}; must lie in (0, 1]."
            )
        check_int(group["update_interval"], "update_interval")

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        z = torch.zeros_like
        return dict(step=0, exp_avg=z(p), exp_hessian_diag_sq=z(p), hessian_diag=z(p))

    def _update(self, p: Tensor, group: dict, st: dict, g: Tensor, D: Tensor | None) -> None:
        b1, b2 = group["betas"]
        if D is not None:
            st["hessian_diag"] = _spatial_average(D, p)
        st["step"] += 1
        t = st["step"]
        D = st["hessian_diag"]
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        st["exp_hessian_diag_sq"].mul_(b2).addcmul_(D, D, value=1 - b2)
        mhat = st["exp_avg"] / (1 - b1**t)
        vhat = st["exp_hessian_diag_sq"] / (1 - b2**t)
        denom = vhat.pow(group["hessian_power"] / 2).add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(mhat, denom, value=-group["lr"])


class SophiaH(_DiagonalCurvatureOptimizer):
    """Sophia with the Hutchinson estimator (Liu et al. 2023): clipped diagonal Newton.

    Per step::

        m <- b1 m + (1 - b1) g
        every update_interval steps:  h <- b2 h + (1 - b2) z * (H z)      (z Rademacher +-1)
        p <- p * (1 - lr * wd)
        p <- p - lr * clip(m / max(rho * h, eps), -1, 1)

    The clip bounds every coordinate's step by ``lr`` (a safeguard against negative or tiny
    curvature estimates).

    Args:
        params: parameters or groups.
        lr: learning rate ``> 0``.
        betas: ``(b1, b2)`` in ``[0, 1)``.
        rho: scale ``> 0`` of the curvature in the denominator.
        eps: floor ``> 0`` of the denominator.
        weight_decay: decoupled weight decay ``>= 0``.
        update_interval: steps between Hessian-diagonal estimates (paper: 10).
        num_probes: Rademacher probes per estimate.
        generator: randomness of the probes.

    References:
        Liu et al., "Sophia: A scalable stochastic second-order optimizer for language model
        pre-training", ICLR 2024.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        update_interval: int = 10,
        num_probes: int = 1,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            update_interval=update_interval,
        )
        super().__init__(params, defaults, num_probes, generator)

    def _check(self, group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")
        group["betas"] = _check_betas(group["betas"])
        check_positive(group["rho"], "rho")
        check_positive(group["eps"], "eps")
        check_nonnegative(group["weight_decay"], "weight_decay")
        check_int(group["update_interval"], "update_interval")

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        return dict(exp_avg=torch.zeros_like(p), hessian=torch.zeros_like(p))

    def _update(self, p: Tensor, group: dict, st: dict, g: Tensor, D: Tensor | None) -> None:
        b1, b2 = group["betas"]
        if D is not None:
            st["hessian"].mul_(b2).add_(D, alpha=1 - b2)
        st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (group["rho"] * st["hessian"]).clamp_min(group["eps"])
        p.add_((st["exp_avg"] / denom).clamp_(-1.0, 1.0), alpha=-group["lr"])
