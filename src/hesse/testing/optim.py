"""Optimizer conformance kit: the checks every ``torch.optim.Optimizer`` in hesse must pass.

:func:`check_optimizer` runs an optimizer class on small float64/float32 problems and checks
that it converges, keeps dtypes and devices, resumes bit-identically from ``state_dict``,
rejects bad hyperparameters with a message naming the value, rejects bad closures,
survives non-finite values (a NaN loss, gradient or curvature raises
:class:`~hesse.NonFiniteError` with parameters and state unchanged, and the next finite step
equals that of a fresh run from the same state) and refuses a foreign or incomplete
``state_dict``. It is generic: the method is constructed as ``cls(params, **kwargs)`` (with
``needs_model=True``: ``cls(params, model=model, loss_fn=loss_fn, **kwargs)``) and stepped
as ``opt.step(closure)`` with a torch-style closure.

Faults are injected at the model output ``z`` by :func:`poison`: ``"loss"`` adds a NaN
constant to the loss (the gradient stays finite), ``"grad"`` passes ``z`` through an identity
whose backward is NaN, ``"curvature"`` through an identity with a finite gradient and NaN
second derivative (Hessian, GGN and Hessian-diagonal products are NaN; first-order
quantities are not).

Example:
    >>> from hesse.optim import BFGS
    >>> report = check_optimizer(BFGS, invalid={"c1": -1.0, "max_evals": 0})
    >>> sorted(report)  # doctest: +NORMALIZE_WHITESPACE
    ['bad_closure', 'converges', 'dtype_device', 'invalid_hyperparameters', 'nan_grad',
     'nan_loss', 'state_dict', 'state_dict_refused']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FAULTS",
    "QuadraticModule",
    "check_optimizer",
    "make_least_squares_problem",
    "make_mlp_problem",
    "poison",
]

FAULTS = ("loss", "grad", "curvature")


class _ZeroWithNaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return torch.full_like(g, math.nan)


class _NaNCurvature(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g + _ZeroWithNaNGrad.apply(x)  # value g; its derivative in x is NaN


def poison(z: Tensor, fault: str | None) -> Tensor:
    """Identity on ``z`` whose gradient (``fault="grad"``) or second derivative
    (``"curvature"``) is NaN; ``None`` and ``"loss"`` return ``z`` itself."""
    if fault == "grad":
        return z + _ZeroWithNaNGrad.apply(z)
    if fault == "curvature":
        return _NaNCurvature.apply(z)
    return z


def _faulty(loss: Tensor, fault: str | None) -> Tensor:
    return loss + math.nan if fault == "loss" else loss


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

    Returns ``(model, loss_and_outputs)`` where ``loss_and_outputs(model, fault=None) ->
    (loss, outputs)`` (``fault`` as in :func:`poison`).
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

    def loss_and_outputs(m: nn.Module, fault: str | None = None) -> tuple[Tensor, Tensor]:
        out = m(X)
        return _faulty(nn.functional.mse_loss(poison(out, fault), Y), fault), out

    return model, loss_and_outputs


def make_least_squares_problem(
    dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[nn.Module, nn.Module, Tensor, Tensor, float]:
    """Linear least squares: ``nn.Linear(4, 2)`` (weight and bias) and ``nn.MSELoss``.

    A quadratic with a closed-form minimum ``f*`` (``lstsq``), and a model with a likelihood
    loss, so K-FAC and natural-gradient methods run on it too. Returns
    ``(model, loss_fn, X, Y, f_star)``.
    """
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    X = torch.randn(40, 4, generator=gen, dtype=torch.float64) * scale
    W = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    Y = X @ W + 0.3 * torch.randn(40, 2, generator=gen, dtype=torch.float64)
    X1 = torch.cat([X, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    f_star = float(((X1 @ torch.linalg.lstsq(X1, Y).solution - Y) ** 2).mean())
    model = nn.Linear(4, 2).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 4, generator=gen, dtype=torch.float64))
        model.bias.copy_(torch.randn(2, generator=gen, dtype=torch.float64))
    return model.to(dtype), nn.MSELoss(), X.to(dtype), Y.to(dtype), f_star


def _setup(problem: str, dtype: torch.dtype, seed: int):
    """``(model, lo, f_star, loss_fn)`` with ``lo(model, fault=None) -> (loss, outputs)``."""
    if problem == "quadratic":
        model = QuadraticModule(dtype, seed=seed)

        def lo(m: nn.Module, fault: str | None = None) -> tuple[Tensor, Tensor]:
            z = m.outputs()
            return _faulty(m.loss(poison(z, fault)), fault), z

        return model, lo, model.f_star(), None
    if problem == "mlp":
        model, lo = make_mlp_problem(dtype, seed)
        return model, lo, 0.0, None
    if problem == "least_squares":
        model, loss_fn, X, Y, f_star = make_least_squares_problem(dtype, seed)

        def lo_ls(m: nn.Module, fault: str | None = None) -> tuple[Tensor, Tensor]:
            out = m(X)
            return _faulty(loss_fn(poison(out, fault), Y), fault), out

        return model, lo_ls, f_star, loss_fn
    raise ValueError(
        f"Invalid problem={problem!r}; expected 'quadratic', 'mlp' or 'least_squares'."
    )


def _same(a: Any, b: Any) -> bool:
    """Bit-identical nested state: dicts, lists, tensors (dtype included), numbers, bytes."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


class _Case:
    """One optimizer on one problem: build, step, fresh copies."""

    def __init__(self, cls, kwargs, problem, seed, with_outputs, needs_model):
        self.cls, self.kwargs, self.problem, self.seed = cls, dict(kwargs), problem, seed
        self.with_outputs, self.needs_model = with_outputs, needs_model
        self.name = getattr(cls, "__name__", str(cls))

    def setup(self, dtype: torch.dtype = torch.float64):
        model, lo, f_star, loss_fn = _setup(self.problem, dtype, self.seed)
        return model, lo, f_star, loss_fn

    def build(self, model: nn.Module, loss_fn: Any, **override: Any) -> torch.optim.Optimizer:
        kw = {**self.kwargs, **override}
        params = list(model.parameters())
        if self.needs_model:
            return self.cls(params, model=model, loss_fn=loss_fn, **kw)
        return self.cls(params, **kw)

    def closure(self, opt, model, lo, fault: str | None = None) -> Callable[[], Any]:
        def closure():
            opt.zero_grad()
            loss, out = lo(model, fault)
            loss.backward()
            return (loss, out) if self.with_outputs else loss

        return closure

    def run(self, opt, model, lo, steps: int) -> None:
        closure = self.closure(opt, model, lo)
        for _ in range(steps):
            opt.step(closure)

    def started(self, steps: int):
        """A model and optimizer after ``steps`` steps, with ``lo`` and ``loss_fn``."""
        model, lo, _, loss_fn = self.setup()
        opt = self.build(model, loss_fn)
        self.run(opt, model, lo, steps)
        return model, opt, lo, loss_fn


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal_params(a: list[Tensor], model: nn.Module) -> bool:
    return all(torch.equal(x, p.detach()) for x, p in zip(a, model.parameters()))


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
    faults: tuple[str, ...] = ("loss", "grad"),
    needs_model: bool = False,
    seed: int = 0,
) -> dict[str, str]:
    """Run the optimizer conformance checks; raise ``AssertionError`` naming the first failure.

    Checks:

    * ``converges``: after ``steps`` steps (float64) the excess loss ``f - f*`` is at most
      ``rtol`` times its initial value (``problem="quadratic"``: a mixed-shape parameter set
      ``(3,)`` + ``(2, 2)`` with closed-form ``f*``; ``"least_squares"``: ``nn.Linear(4, 2)``
      with ``nn.MSELoss``, closed-form ``f*``; ``"mlp"``: a tiny tanh MLP, ``f* = 0``).
    * ``dtype_device``: for each of ``dtypes``, parameters keep their dtype and device and stay
      finite.
    * ``state_dict``: run ``steps // 3`` steps, save, run ``steps // 3`` more; a fresh model and
      optimizer loaded from the saved parameters and ``state_dict`` reach bit-identical
      parameters after the same number of steps.
    * ``invalid_hyperparameters``: each ``name=value`` of ``invalid`` makes the constructor
      raise ``ValueError``/``TypeError`` whose message contains ``name`` and ``repr(value)``.
    * ``bad_closure`` (``check_closure_errors``): ``step()`` without a closure and a closure
      returning a non-scalar each raise, leaving the parameters unchanged.
    * ``nan_<fault>`` for each of ``faults`` (see :func:`poison`): after a few steps, a step
      whose closure has that fault raises :class:`~hesse.NonFiniteError`; parameters and
      ``state_dict()`` are bit-identical to before it; the next finite step gives the same
      parameters as a fresh model and optimizer loaded from that state taking the same step.
    * ``state_dict_refused``: ``load_state_dict`` refuses (``ValueError``/``TypeError``, at
      load time, state unchanged) the state of ``torch.optim.SGD``, this state tagged as
      another class, and this state with a hyperparameter removed.

    Args:
        cls: the optimizer class.
        kwargs: constructor keyword arguments.
        invalid: ``{name: bad_value}`` to check one at a time.
        problem: ``"quadratic"``, ``"least_squares"`` or ``"mlp"``.
        steps: steps of the convergence run.
        rtol: required relative reduction of ``f - f*``.
        with_outputs: the closure returns ``(loss, outputs)`` (e.g. for GGN methods).
        dtypes: dtypes for the dtype/device check.
        check_closure_errors: run the ``bad_closure`` checks (off for optimizers whose
            closure is optional, as in ``torch.optim``).
        faults: which of ``"loss"``, ``"grad"``, ``"curvature"`` to inject.
        needs_model: construct as ``cls(params, model=model, loss_fn=loss_fn, **kwargs)``
            (``problem`` must then have a model and a loss module: ``"least_squares"``).
        seed: problem seed.

    Returns:
        ``{check name: "ok"}``.
    """
    from .._checks import NonFiniteError
    from ..optim._base import STATE_TAG

    case = _Case(cls, kwargs or {}, problem, seed, with_outputs, needs_model)
    name = case.name
    report: dict[str, str] = {}

    # converges
    model, lo, f_star, loss_fn = case.setup()
    with torch.no_grad():
        f0 = float(lo(model)[0])
    case.run(case.build(model, loss_fn), model, lo, steps)
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
        model, lo, _, loss_fn = case.setup(dt)
        before = [(p.dtype, p.device) for p in model.parameters()]
        case.run(case.build(model, loss_fn), model, lo, 5)
        after = [(p.dtype, p.device) for p in model.parameters()]
        if before != after:
            raise AssertionError(f"{name} changed parameter dtype/device: {before} -> {after}.")
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise AssertionError(f"{name} produced non-finite parameters in {dt}.")
    report["dtype_device"] = "ok"

    # state_dict round trip
    k = max(steps // 3, 2)
    model, opt, lo, loss_fn = case.started(k)
    saved_sd = copy.deepcopy(opt.state_dict())
    saved_params = copy.deepcopy(model.state_dict())
    case.run(opt, model, lo, k)
    ref = _params(model)
    model2, lo2, _, loss_fn2 = case.setup()
    model2.load_state_dict(saved_params)
    opt2 = case.build(model2, loss_fn2)
    opt2.load_state_dict(saved_sd)
    case.run(opt2, model2, lo2, k)
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
        model, _, _, loss_fn = case.setup()
        try:
            case.build(model, loss_fn, **{key: value})
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
        model, lo, _, loss_fn = case.setup()
        params = list(model.parameters())
        opt = case.build(model, loss_fn)
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

        before = _params(model)
        try:
            opt.step(vector_closure)
        except (TypeError, ValueError):
            pass
        else:
            raise AssertionError(f"{name}.step(closure) with a non-scalar loss did not raise.")
        if not _equal_params(before, model):
            raise AssertionError(f"{name}.step(closure) with a non-scalar loss changed parameters.")
        report["bad_closure"] = "ok"

    # non-finite loss / gradient / curvature
    for fault in faults:
        if fault not in FAULTS:
            raise ValueError(f"Invalid fault={fault!r}; expected one of {FAULTS}.")
        model, opt, lo, loss_fn = case.started(3)
        sd0 = copy.deepcopy(opt.state_dict())
        p0 = _params(model)
        try:
            opt.step(case.closure(opt, model, lo, fault))
        except NonFiniteError:
            pass
        else:
            raise AssertionError(f"{name}: a step with a NaN {fault} did not raise NonFiniteError.")
        if not _equal_params(p0, model):
            raise AssertionError(f"{name}: the failed step (NaN {fault}) changed the parameters.")
        if not _same(opt.state_dict(), sd0):
            raise AssertionError(f"{name}: the failed step (NaN {fault}) changed the state.")
        opt.step(case.closure(opt, model, lo))
        model2, lo2, _, loss_fn2 = case.setup()
        with torch.no_grad():
            for p, q in zip(model2.parameters(), p0):
                p.copy_(q)
        opt2 = case.build(model2, loss_fn2)
        opt2.load_state_dict(copy.deepcopy(sd0))
        opt2.step(case.closure(opt2, model2, lo2))
        if not _equal_params(_params(model2), model):
            raise AssertionError(
                f"{name}: the finite step after a failed one (NaN {fault}) differs from the "
                "same step of a fresh run from the same state."
            )
        report[f"nan_{fault}"] = "ok"

    # foreign / incomplete state_dict
    model, opt, lo, loss_fn = case.started(2)
    own = opt.state_dict()
    sgd = torch.optim.SGD(list(model.parameters()), lr=0.1).state_dict()
    tagged = {**copy.deepcopy(own), STATE_TAG: "SomeOtherOptimizer"}
    missing = copy.deepcopy(own)
    hp = next(k for k in missing["param_groups"][0] if k not in ("params", "lr"))
    del missing["param_groups"][0][hp]
    for what, bad in (("torch.optim.SGD's", sgd), ("another class's", tagged),
                      (f"a state without {hp!r}", missing)):  # fmt: skip
        before = copy.deepcopy(opt.state_dict())
        try:
            opt.load_state_dict(bad)
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError(f"{name}.load_state_dict accepted {what} state.")
        if not _same(opt.state_dict(), before):
            raise AssertionError(f"{name}.load_state_dict({what} state) changed the state.")
    report["state_dict_refused"] = "ok"
    return report
