"""Optimizer conformance kit: the checks every ``torch.optim.Optimizer`` in hesse must pass.

:func:`check_optimizer` runs an optimizer class on small float64/float32 problems and checks
that it converges, keeps dtypes and devices, resumes bit-identically from ``state_dict``,
rejects bad hyperparameters with a message naming the value, and rejects bad closures.
It is generic: the method only needs to be constructed as ``cls(params, **kwargs)`` and
stepped as ``opt.step(closure)`` with a torch-style closure.

Example:
    >>> from hesse.optim import BFGS
    >>> report = check_optimizer(BFGS, invalid={"c1": -1.0, "max_evals": 0})
    >>> sorted(report)  # doctest: +NORMALIZE_WHITESPACE
    ['bad_closure', 'converges', 'dtype_device', 'invalid_hyperparameters', 'state_dict']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_optimizer", "QuadraticModule", "make_mlp_problem"]


class QuadraticModule(nn.Module):
    """``f = 1/2 z^T A z - b^T z`` over a mixed-shape parameter set ``z = (w (3,), M (2, 2))``.

    ``A`` is SPD with condition number ``cond``; the minimum ``f*`` is known in closed form.
    """

    def __init__(self, dtype: torch.dtype = torch.float64, cond: float = 50.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n = 7
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        lam = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
        self.register_buffer("A", ((Q * lam) @ Q.T).to(dtype))
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=torch.float64).to(dtype))
        self.w = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64).to(dtype))
        self.M = nn.Parameter(torch.randn(2, 2, generator=gen, dtype=torch.float64).to(dtype))

    def outputs(self) -> Tensor:
        """The "model output" ``z`` (the parameters concatenated): the GGN of ``f`` is ``A``."""
        return torch.cat([self.w.reshape(-1), self.M.reshape(-1)])

    def loss(self, z: Tensor) -> Tensor:
        return 0.5 * z @ (self.A @ z) - self.b @ z

    def forward(self) -> Tensor:
        return self.loss(self.outputs())

    def f_star(self) -> float:
        A, b = self.A.double(), self.b.double()
        return float(-0.5 * b @ torch.linalg.solve(A, b))


def make_mlp_problem(
    dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[nn.Module, Callable[[nn.Module], tuple[Tensor, Tensor]]]:
    """A tiny regression MLP ``4 -> 8 -> 3`` (tanh, MSE) on 32 fixed points.

    Returns ``(model, loss_and_outputs)`` where ``loss_and_outputs(model) -> (loss, outputs)``.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64).to(dtype)
    W = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype)
    Y = torch.tanh(X @ W)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    finally:
        torch.random.set_rng_state(state)

    def loss_and_outputs(m: nn.Module) -> tuple[Tensor, Tensor]:
        out = m(X)
        return nn.functional.mse_loss(out, Y), out

    return model, loss_and_outputs


def _setup(problem: str, dtype: torch.dtype, seed: int):
    if problem == "quadratic":
        model = QuadraticModule(dtype, seed=seed)

        def lo(m: nn.Module) -> tuple[Tensor, Tensor]:
            z = m.outputs()
            return m.loss(z), z

        return model, lo, model.f_star()
    if problem == "mlp":
        model, lo = make_mlp_problem(dtype, seed)
        return model, lo, 0.0
    raise ValueError(f"Invalid problem={problem!r}; expected 'quadratic' or 'mlp'.")


def _run(
    cls: Callable[..., torch.optim.Optimizer],
    kwargs: Mapping[str, Any],
    model: nn.Module,
    lo: Callable,
    steps: int,
    with_outputs: bool,
    opt: torch.optim.Optimizer | None = None,
) -> tuple[torch.optim.Optimizer, list[float]]:
    if opt is None:
        opt = cls(list(model.parameters()), **kwargs)
    hist = []

    def closure():
        opt.zero_grad()
        loss, out = lo(model)
        loss.backward()
        return (loss, out) if with_outputs else loss

    for _ in range(steps):
        out = opt.step(closure)
        if out is not None:
            hist.append(float(out))
    return opt, hist


def check_optimizer(
    cls: Callable[..., torch.optim.Optimizer],
    kwargs: Mapping[str, Any] | None = None,
    *,
    invalid: Mapping[str, Any] | None = None,
    problem: str = "quadratic",
    steps: int = 60,
    rtol: float = 1e-6,
    with_outputs: bool = False,
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
    check_closure_errors: bool = True,
    seed: int = 0,
) -> dict[str, str]:
    """Run the optimizer conformance checks; raise ``AssertionError`` naming the first failure.

    Checks:

    * ``converges``: after ``steps`` steps (float64) the excess loss ``f - f*`` is at most
      ``rtol`` times its initial value (``problem="quadratic"``: a mixed-shape parameter set
      ``(3,)`` + ``(2, 2)`` with closed-form ``f*``; ``"mlp"``: a tiny tanh MLP, ``f* = 0``).
    * ``dtype_device``: for each of ``dtypes``, parameters keep their dtype and device and stay
      finite.
    * ``state_dict``: run ``steps // 3`` steps, save, run ``steps // 3`` more; a fresh model and
      optimizer loaded from the saved parameters and ``state_dict`` reach bit-identical
      parameters after the same number of steps.
    * ``invalid_hyperparameters``: each ``name=value`` of ``invalid`` makes the constructor
      raise ``ValueError``/``TypeError`` whose message contains ``name`` and ``repr(value)``.
    * ``bad_closure`` (``check_closure_errors``): ``step()`` without a closure, a closure
      returning a non-scalar, and one returning NaN each raise.

    Args:
        cls: the optimizer class, constructed as ``cls(params, **kwargs)``.
        kwargs: constructor keyword arguments.
        invalid: ``{name: bad_value}`` to check one at a time.
        problem: ``"quadratic"`` or ``"mlp"``.
        steps: steps of the convergence run.
        rtol: required relative reduction of ``f - f*``.
        with_outputs: the closure returns ``(loss, outputs)`` (e.g. for GGN methods).
        dtypes: dtypes for the dtype/device check.
        check_closure_errors: run the ``bad_closure`` checks.
        seed: problem seed.

    Returns:
        ``{check name: "ok"}``.
    """
    kwargs = dict(kwargs or {})
    report: dict[str, str] = {}
    name = getattr(cls, "__name__", str(cls))

    # converges
    model, lo, f_star = _setup(problem, torch.float64, seed)
    with torch.no_grad():
        f0 = float(lo(model)[0])
    _run(cls, kwargs, model, lo, steps, with_outputs)
    with torch.no_grad():
        f1 = float(lo(model)[0])
    excess0, excess1 = f0 - f_star, f1 - f_star
    if not (math.isfinite(f1) and excess1 <= rtol * excess0 + 1e-12):
        raise AssertionError(
            f"{name} did not converge on the {problem} problem in {steps} steps: "
            f"f - f* went from {excess0:.3e} to {excess1:.3e} (needed <= {rtol:g} x initial)."
        )
    report["converges"] = "ok"

    # dtype / device
    for dt in dtypes:
        model, lo, _ = _setup(problem, dt, seed)
        before = [(p.dtype, p.device) for p in model.parameters()]
        _run(cls, kwargs, model, lo, 5, with_outputs)
        after = [(p.dtype, p.device) for p in model.parameters()]
        if before != after:
            raise AssertionError(f"{name} changed parameter dtype/device: {before} -> {after}.")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise AssertionError(f"{name} produced non-finite parameters in {dt}.")
    report["dtype_device"] = "ok"

    # state_dict round trip
    k = max(steps // 3, 2)
    model, lo, _ = _setup(problem, torch.float64, seed)
    opt, _ = _run(cls, kwargs, model, lo, k, with_outputs)
    saved_sd = copy.deepcopy(opt.state_dict())
    saved_params = copy.deepcopy(model.state_dict())
    _run(cls, kwargs, model, lo, k, with_outputs, opt=opt)
    ref = [p.detach().clone() for p in model.parameters()]
    model2, lo2, _ = _setup(problem, torch.float64, seed)
    model2.load_state_dict(saved_params)
    opt2 = cls(list(model2.parameters()), **kwargs)
    opt2.load_state_dict(saved_sd)
    _run(cls, kwargs, model2, lo2, k, with_outputs, opt=opt2)
    for i, (a, b) in enumerate(zip(ref, model2.parameters())):
        if not torch.equal(a, b.detach()):
            diff = float((a - b.detach()).abs().max())
            raise AssertionError(
                f"{name} did not resume bit-identically from state_dict: parameter {i} differs "
                f"by {diff:.3e} after {k} steps."
            )
    report["state_dict"] = "ok"

    # invalid hyperparameters
    for key, value in (invalid or {}).items():
        model, _, _ = _setup(problem, torch.float64, seed)
        try:
            cls(list(model.parameters()), **{**kwargs, key: value})
        except (ValueError, TypeError) as err:
            msg = str(err)
            if key not in msg or repr(value) not in msg:
                raise AssertionError(
                    f"{name}({key}={value!r}) raised, but the message does not name the value: "
                    f"{msg!r}"
                ) from err
        else:
            raise AssertionError(f"{name}({key}={value!r}) was accepted; expected an error.")
    report["invalid_hyperparameters"] = "ok"

    if check_closure_errors:
        model, lo, _ = _setup(problem, torch.float64, seed)
        params = list(model.parameters())
        opt = cls(params, **kwargs)
        try:
            opt.step()
        except (TypeError, ValueError, RuntimeError):
            pass
        else:
            raise AssertionError(f"{name}.step() without a closure did not raise.")

        def vector_closure():
            opt.zero_grad()
            v = torch.stack([p.sum() for p in params])
            v.sum().backward()
            return v

        def nan_closure():
            opt.zero_grad()
            loss = lo(model)[0] * float("nan")
            loss.backward()
            return loss

        for what, cb in (("a non-scalar loss", vector_closure), ("a NaN loss", nan_closure)):
            before = [p.detach().clone() for p in params]
            try:
                opt.step(cb)
            except (TypeError, ValueError, ArithmeticError):
                pass
            else:
                raise AssertionError(f"{name}.step(closure) with {what} did not raise.")
            if not all(torch.equal(a, p.detach()) for a, p in zip(before, params)):
                raise AssertionError(f"{name}.step(closure) with {what} modified the parameters.")
        report["bad_closure"] = "ok"
    return report
