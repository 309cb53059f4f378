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

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from ..linalg._probes import rademacher
from ..linalg.eigen import top_eigenpairs
from ..operators.curvature import GGNOperator, HessianOperator
from ._closure import evaluate

__all__ = ["CurvatureLR", "AdaHessian", "SophiaH", "hutchinson_diagonal_of_graph"]


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}={value!r}; must lie in [0, 1).")
    return float(value)


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
        curvature: ``"hessian"`` (default) or ``"ggn"``.
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
        self.curvature = check_choice(curvature, "curvature", ("hessian", "ggn"))
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
        cls = HessianOperator if self.curvature == "hessian" else GGNOperator
        kw = dict(check_determinism=False, **self.objective_kwargs)
        if self.per_layer:
            return [
                cls(self.model, self.loss_fn, self.data, params=names, **kw)
                for names in self._group_names
            ]
        all_names = [n for names in self._group_names for n in names]
        return [cls(self.model, self.loss_fn, self.data, params=all_names, **kw)]

    def measure(self) -> list[float]:
        """Measure ``lambda_max`` now and set the learning rates; returns the eigenvalues."""
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
            lams.append(lam)
        self.last_results = results
        lrs = []
        for gi, group in enumerate(self.optimizer.param_groups):
            lam = lams[gi] if self.per_layer else lams[0]
            if lam > 0 and math.isfinite(lam):
                lr = self.c * 2.0 / lam
                if self.max_lr is not None:
                    lr = min(lr, self.max_lr)
                group["lr"] = lr
            elif self.max_lr is not None:
                group["lr"] = self.max_lr
            lrs.append(float(group["lr"]))
        self.history.append((self.steps, lams, lrs))
        return lams

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
    """Shared plumbing: closure in graph mode, Hutchinson probes, generator state."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        num_probes: int,
        generator: torch.Generator | None,
    ):
        super().__init__(params, defaults)
        self.num_probes = check_int(num_probes, "num_probes")
        first = self.param_groups[0]["params"][0]
        self.generator = _make_generator(generator, first.device)
        self.steps = 0

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _evaluate(self, closure: Callable[[], Any], need_hessian: bool):
        params = self._params()
        if closure is None:
            raise TypeError(
                f"{type(self).__name__} needs a closure: opt.step(closure) with "
                "def closure(): opt.zero_grad(); loss = f(); loss.backward(); return loss"
            )
        ev = evaluate(closure, params, create_graph=need_hessian, require_finite=True)
        diag = None
        if need_hessian:
            with torch.enable_grad():
                diag = hutchinson_diagonal_of_graph(
                    ev.graph_grads, params, self.num_probes, self.generator
                )
        return ev, diag

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["generator"] = self.generator.get_state()
        sd["steps"] = self.steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator", None)
        self.steps = int(state_dict.pop("steps", 0))
        super().load_state_dict(state_dict)
        if gen is not None:
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
        check_positive(lr, "lr")
        betas = _check_betas(betas)
        check_positive(eps, "eps")
        check_nonnegative(weight_decay, "weight_decay")
        check_positive(hessian_power, "hessian_power")
        if hessian_power > 1:
            raise ValueError(f"Invalid hessian_power={hessian_power!r}; must lie in (0, 1].")
        check_int(update_interval, "update_interval")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            update_interval=update_interval,
        )
        super().__init__(params, defaults, num_probes, generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:  # type: ignore[override]
        interval = self.param_groups[0]["update_interval"]
        need = self.steps % interval == 0
        ev, diag = self._evaluate(closure, need)
        params = self._params()
        k = 0
        for group in self.param_groups:
            check_positive(group["lr"], "lr")
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = ev.grads[k]
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_hessian_diag_sq"] = torch.zeros_like(p)
                    st["hessian_diag"] = torch.zeros_like(p)
                if diag is not None:
                    st["hessian_diag"] = _spatial_average(diag[k], p)
                k += 1
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
        del params
        self.steps += 1
        return ev.loss


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
        check_positive(lr, "lr")
        betas = _check_betas(betas)
        check_positive(rho, "rho")
        check_positive(eps, "eps")
        check_nonnegative(weight_decay, "weight_decay")
        check_int(update_interval, "update_interval")
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            update_interval=update_interval,
        )
        super().__init__(params, defaults, num_probes, generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Tensor:  # type: ignore[override]
        interval = self.param_groups[0]["update_interval"]
        need = self.steps % interval == 0
        ev, diag = self._evaluate(closure, need)
        k = 0
        for group in self.param_groups:
            check_positive(group["lr"], "lr")
            b1, b2 = group["betas"]
            for p in group["params"]:
                g = ev.grads[k]
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["hessian"] = torch.zeros_like(p)
                if diag is not None:
                    st["hessian"].mul_(b2).add_(diag[k], alpha=1 - b2)
                k += 1
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (group["rho"] * st["hessian"]).clamp_min(group["eps"])
                p.add_((st["exp_avg"] / denom).clamp_(-1.0, 1.0), alpha=-group["lr"])
        self.steps += 1
        return ev.loss
