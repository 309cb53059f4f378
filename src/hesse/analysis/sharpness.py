"""Flatness and sharpness metrics: lambda_max, trace, epsilon-sharpness, adaptive sharpness.

* ``lambda_max``: the top eigenvalue of the Hessian (or GGN/Fisher), by
  :func:`hesse.top_eigenpairs` (Lanczos, warm-startable).
* ``curvature_trace``: ``tr(H)`` with a standard error, by :func:`hesse.linalg.trace`.
* ``epsilon_sharpness``: the largest loss increase in a ball around the parameters
  (Keskar et al., 2017), by projected gradient ascent; ``adaptive=True`` measures the ball
  relative to ``|theta|`` so the value is invariant to rescalings that leave the network
  function unchanged (Kwon et al., 2021; Andriushchenko et al., 2023).

All functions take ``(model, loss_fn, data)`` like the curvature operators; the first two also
accept an operator or a dense matrix directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from ..objective import Objective
from ..operators.base import LinearOperator, aslinearoperator
from ..operators.curvature import FisherOperator, GGNOperator, HessianOperator
from .landscape import perturbed_parameters

__all__ = [
    "SharpnessResult",
    "FlatnessMetrics",
    "curvature_operator",
    "lambda_max",
    "curvature_trace",
    "epsilon_sharpness",
    "adaptive_sharpness",
    "flatness_metrics",
]

_CURVATURES = ("hessian", "ggn", "fisher")


def curvature_operator(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    curvature: str = "hessian",
    **kwargs: Any,
) -> LinearOperator:
    """Build the curvature operator named by ``curvature`` (``"hessian"``, ``"ggn"``,
    ``"fisher"`` = exact Fisher) for ``(model, loss_fn, data)``; ``kwargs`` go to the
    operator (``params``, ``weight_decay``, ...)."""
    kind = check_choice(curvature, "curvature", _CURVATURES)
    cls = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}[kind]
    return cls(model, loss_fn, data, **kwargs)


def _operator(model_or_op: Any, loss_fn: Any, data: Any, curvature: str, kwargs) -> LinearOperator:
    if isinstance(model_or_op, nn.Module):
        if loss_fn is None or data is None:
            raise TypeError("Given a model, loss_fn and data are required as well.")
        return curvature_operator(model_or_op, loss_fn, data, curvature, **kwargs)
    if kwargs:
        raise TypeError(
            f"Options {sorted(kwargs)} apply to a model; got an operator/tensor instead."
        )
    return aslinearoperator(model_or_op)


def lambda_max(
    model_or_op: Any,
    loss_fn: Callable | None = None,
    data: Any = None,
    *,
    curvature: str = "hessian",
    tol: float = 1e-3,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
):
    """Largest eigenvalue of the curvature, ``lambda_max = max_{||v||=1} v^T H v``.

    The sharpness of Cohen et al. (2021): gradient descent with step ``eta`` is stable on the
    local quadratic model only if ``eta * lambda_max < 2``.

    Cost: a Lanczos run, typically 10-30 products from a random start and a handful from a
    good warm start ``v0`` (e.g. the previous eigenvector during training).

    Args:
        model_or_op: a model (then ``loss_fn`` and ``data`` are required) or a symmetric
            :class:`hesse.LinearOperator` / dense tensor.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (model input only).
        tol: relative residual tolerance of the eigenpair.
        v0: warm-start vector ``(n,)``.
        generator: randomness of the Lanczos start.
        **kwargs: operator options for a model (``params``, ``weight_decay``, ...).

    Returns:
        The :class:`hesse.linalg.EigenResult` of :func:`hesse.top_eigenpairs` (``k=1``):
        ``float(result.eigenvalues[0])`` is ``lambda_max``.

    Example:
        >>> float(lambda_max(torch.diag(torch.tensor([3.0, 1.0, -2.0]))).eigenvalues[0])
        3.0...
    """
    from ..linalg.eigen import top_eigenpairs

    op = _operator(model_or_op, loss_fn, data, curvature, kwargs)
    return top_eigenpairs(op, k=1, which="largest", tol=tol, v0=v0, generator=generator)


def curvature_trace(
    model_or_op: Any,
    loss_fn: Callable | None = None,
    data: Any = None,
    *,
    curvature: str = "hessian",
    method: str = "hutchpp",
    num_matvecs: int = 60,
    generator: torch.Generator | None = None,
    **kwargs: Any,
):
    """``tr(H)`` (sum of eigenvalues, a flatness measure) with a standard error.

    Args:
        model_or_op, loss_fn, data, curvature, generator, **kwargs: as in :func:`lambda_max`.
        method: ``"hutchinson"``, ``"hutchpp"`` or ``"xtrace"`` (see :func:`hesse.linalg.trace`).
        num_matvecs: product budget.

    Returns:
        :class:`hesse.linalg.TraceResult` (``.estimate``, ``.stderr``, ``.num_matvecs``).
    """
    from ..linalg import trace

    op = _operator(model_or_op, loss_fn, data, curvature, kwargs)
    return trace(op, method=method, num_matvecs=num_matvecs, generator=generator)


@dataclass(frozen=True)
class SharpnessResult:
    """Worst-case loss increase in a ball, found by projected gradient ascent.

    Attributes:
        sharpness: ``max L(theta + delta) - L(theta)`` found (a lower bound of the true max).
        loss0: ``L(theta)``.
        perturbed_loss: ``L(theta + delta)`` at the best ``delta``.
        delta: ``(n,)`` the best perturbation.
        epsilon: radius of the ball (in ``u`` units for ``adaptive=True``).
        norm: ``"l2"`` or ``"linf"``.
        adaptive: whether the ball is scaled by ``|theta| + eta``.
        num_grads: gradient evaluations used.
        converged: the best value changed by less than ``tol`` (relative) over the last step.
        history: ``(num_steps + 1,)`` sharpness after each ascent step (best so far), per
            restart concatenated.
    """

    sharpness: float
    loss0: float
    perturbed_loss: float
    delta: Tensor
    epsilon: float
    norm: str
    adaptive: bool
    num_grads: int
    converged: bool
    history: Tensor


def _project(u: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return u.clamp(-eps, eps)
    nu = u.norm()
    return u * (eps / nu) if nu > eps else u


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    epsilon: float = 0.05,
    norm: str = "l2",
    num_steps: int = 20,
    step_size: float | None = None,
    num_restarts: int = 1,
    adaptive: bool = False,
    eta: float = 0.0,
    tol: float = 1e-3,
    params: Any = None,
    generator: torch.Generator | None = None,
    **objective_kwargs: Any,
) -> SharpnessResult:
    """Epsilon-sharpness: the largest loss increase within distance ``epsilon``.

    .. math::
        S_\\epsilon(\\theta) = \\max_{\\|T^{-1}\\delta\\|_p \\le \\epsilon}
            L(\\theta + \\delta) - L(\\theta),
        \\qquad T = I \\;\\text{(plain)} \\quad\\text{or}\\quad
        T = \\operatorname{diag}(|\\theta| + \\eta) \\;\\text{(adaptive)}.

    Solved by projected gradient ascent in ``u = T^{-1} delta`` from a random start in the
    ball: normalised-gradient steps for ``p = 2``, sign steps for ``p = inf``; the best value
    over all steps and restarts is returned (a lower bound on the true maximum). Near a
    minimum ``S_eps ~ eps^2 / 2 * lambda_max(T H T)`` for ``p = 2``.

    The adaptive variant is invariant to per-neuron rescalings that leave a ReLU network's
    function unchanged (with ``eta = 0``); the plain one is not (Dinh et al., 2017).

    Cost: ``num_restarts * (num_steps + 1)`` gradient evaluations on all of ``data``.
    Parameters are restored exactly afterwards.

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`.
        epsilon: radius of the ball (> 0).
        norm: ``"l2"`` or ``"linf"``.
        num_steps: ascent steps per restart.
        step_size: ascent step in ``u`` units (default ``epsilon`` for ``l2``,
            ``2.5 * epsilon / num_steps`` for ``linf``).
        num_restarts: independent random starts.
        adaptive: scale the ball by ``|theta| + eta`` (Kwon et al., 2021).
        eta: offset of the adaptive scale (>= 0; ASAM uses 0.01).
        tol: relative change of the best value regarded as converged.
        params: parameter subset.
        generator: randomness of the starts.
        **objective_kwargs: passed to :class:`hesse.Objective`.

    Returns:
        :class:`SharpnessResult`.

    Example:
        On ``L(w) = ||X w - y||^2 / N`` at its minimiser ``S_eps = eps^2 / 2 * lambda_max(H)``.

    References:
        Keskar et al., On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
        Minima, ICLR 2017. Kwon et al., ASAM, ICML 2021. Andriushchenko et al., A Modern Look
        at the Relationship between Sharpness and Generalization, ICML 2023.
    """
    eps = check_positive(epsilon, "epsilon")
    norm = check_choice(norm, "norm", ("l2", "linf"))
    num_steps = check_int(num_steps, "num_steps", minimum=0)
    num_restarts = check_int(num_restarts, "num_restarts")
    eta = check_nonnegative(eta, "eta")
    if step_size is None:
        step = eps if norm == "l2" else 2.5 * eps / max(num_steps, 1)
    else:
        step = check_positive(step_size, "step_size")
    objective = Objective(model, loss_fn, data, params=params, **objective_kwargs)
    theta0 = torch.cat([p.detach().reshape(-1) for p in objective.params.values()])
    T = theta0.abs() + eta if adaptive else torch.ones_like(theta0)
    if adaptive and not bool((T > 0).any()):
        raise ValueError("adaptive sharpness with all-zero parameters needs eta > 0.")
    loss0 = objective.loss()
    best_val = torch.tensor(float("-inf"), dtype=torch.float64)
    best_delta = torch.zeros_like(theta0)
    history: list[Tensor] = []
    num_grads = 0
    converged = False
    with perturbed_parameters(objective.params) as set_delta:
        for _ in range(num_restarts):
            z = torch.randn(theta0.shape, generator=generator, dtype=theta0.dtype, device="cpu")
            z = z.to(theta0.device)
            if norm == "l2":
                u = 0.5 * eps * z / z.norm().clamp_min(1e-30)
            else:
                r = torch.rand(theta0.shape, generator=generator, dtype=theta0.dtype)
                u = 0.5 * eps * (2 * r.to(theta0.device) - 1)
            u = u * (T > 0)
            prev = None
            for it in range(num_steps + 1):
                set_delta(T * u)
                val, g = objective.value_and_grad()
                num_grads += 1
                gain = (val - loss0).double()
                if gain > best_val:
                    improvement = float(gain - best_val) if best_val.isfinite() else float("inf")
                    best_val, best_delta = gain, (T * u).clone()
                else:
                    improvement = 0.0
                history.append(best_val.clone())
                prev = improvement
                if it == num_steps:
                    break
                gu = T * g
                if norm == "l2":
                    gn = gu.norm()
                    if gn == 0:
                        break
                    u = _project(u + step * gu / gn, eps, norm)
                else:
                    u = _project(u + step * torch.sign(gu), eps, norm)
            converged = prev is not None and prev <= tol * max(abs(float(best_val)), 1e-12)
    s = float(best_val)
    return SharpnessResult(
        sharpness=s,
        loss0=float(loss0),
        perturbed_loss=float(loss0) + s,
        delta=best_delta,
        epsilon=eps,
        norm=norm,
        adaptive=bool(adaptive),
        num_grads=num_grads,
        converged=bool(converged),
        history=torch.stack(history),
    )


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    rho: float = 0.05,
    norm: str = "l2",
    eta: float = 0.0,
    **kwargs: Any,
) -> SharpnessResult:
    """Adaptive (scale-invariant) sharpness: :func:`epsilon_sharpness` with
    ``adaptive=True`` and radius ``rho``.

    .. math::
        S^\\text{adapt}_\\rho(\\theta) = \\max_{\\|\\delta / (|\\theta| + \\eta)\\|_p \\le \\rho}
            L(\\theta + \\delta) - L(\\theta).
    """
    return epsilon_sharpness(
        model, loss_fn, data, epsilon=rho, norm=norm, adaptive=True, eta=eta, **kwargs
    )


@dataclass(frozen=True)
class FlatnessMetrics:
    """The flatness measures side by side (see :func:`flatness_metrics`).

    ``lambda_max`` and ``trace`` are of the curvature; ``trace_stderr`` is the trace's standard
    error; ``epsilon_sharpness`` and ``adaptive_sharpness`` are :class:`SharpnessResult`;
    ``num_matvecs`` counts curvature products, ``num_grads`` gradient evaluations.
    """

    lambda_max: float
    lambda_max_converged: bool
    trace: float
    trace_stderr: float
    epsilon_sharpness: SharpnessResult | None
    adaptive_sharpness: SharpnessResult | None
    num_matvecs: int
    num_grads: int
    loss: float


def flatness_metrics(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "hessian",
    epsilon: float | None = 0.05,
    rho: float | None = 0.05,
    num_steps: int = 10,
    trace_matvecs: int = 60,
    params: Any = None,
    generator: torch.Generator | None = None,
    **objective_kwargs: Any,
) -> FlatnessMetrics:
    """``lambda_max``, trace, epsilon- and adaptive sharpness of the model in one call.

    Set ``epsilon=None`` or ``rho=None`` to skip the (gradient-ascent) sharpness measures.
    """
    op = curvature_operator(model, loss_fn, data, curvature, params=params, **objective_kwargs)
    top = lambda_max(op, generator=generator)
    tr = curvature_trace(op, num_matvecs=trace_matvecs, generator=generator)
    eps_res = ada_res = None
    num_grads = 0
    if epsilon is not None:
        eps_res = epsilon_sharpness(
            model,
            loss_fn,
            data,
            epsilon=epsilon,
            num_steps=num_steps,
            params=params,
            generator=generator,
            **objective_kwargs,
        )
        num_grads += eps_res.num_grads
    if rho is not None:
        ada_res = adaptive_sharpness(
            model,
            loss_fn,
            data,
            rho=rho,
            num_steps=num_steps,
            params=params,
            generator=generator,
            **objective_kwargs,
        )
        num_grads += ada_res.num_grads
    return FlatnessMetrics(
        lambda_max=float(top.eigenvalues[0]),
        lambda_max_converged=bool(top.converged),
        trace=float(tr.estimate),
        trace_stderr=float(tr.stderr),
        epsilon_sharpness=eps_res,
        adaptive_sharpness=ada_res,
        num_matvecs=op.num_matvecs,
        num_grads=num_grads,
        loss=float(op.loss()),
    )
