"""One conformance table for every optimizer and preconditioner in hesse.optim.

Each row goes through the same :func:`hesse.testing.check_optimizer` checks (optax's single
``_OPTIMIZERS_UNDER_TEST`` is the model): converges on a quadratic (linear least squares with
weight and bias, closed-form minimum), keeps dtype/device, bit-identical ``state_dict``
resume, bad hyperparameters rejected by name, bad closures rejected, a NaN loss / gradient /
curvature raises ``NonFiniteError`` with parameters and state unchanged and the next finite
step equals that of a fresh run, and foreign or incomplete states are refused at load time.

A fault a method cannot see is left out of its row, for the stated reason:
* quasi-Newton, Shampoo: curvature is built from gradients only (covered by "grad");
* KFAC, NaturalGradient: their statistics (layer inputs, output-gradient samples,
  ``J^T H_L J`` of a likelihood) never differentiate the model twice, so they are finite
  whenever loss and gradient are; K-FAC's own statistics are poisoned directly in
  ``test_kfac_nan_statistic_discarded``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import hesse
from hesse.optim import (
    BFGS,
    DFP,
    KFAC,
    LBFGS,
    SR1,
    AdaHessian,
    CurvatureLR,
    HessianFree,
    KFACPreconditioner,
    NaturalGradient,
    Newton,
    Shampoo,
    SophiaH,
)
from hesse.optim._base import STATE_TAG, check_state_dict
from hesse.testing import check_optimizer
from hesse.testing.optim import make_least_squares_problem

D = torch.float64
ALL = ("loss", "grad", "curvature")
FIRST_ORDER = ("loss", "grad")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class KFACPreconditionedSGD(torch.optim.SGD):
    """The preconditioner under a plain torch optimizer, as users run it."""

    def __init__(self, params, *, model, loss_fn, lr=1.0, **kwargs):
        super().__init__(params, lr=lr)
        self.pre = KFACPreconditioner(model, loss_fn, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.pre.step()
        super().step()
        return loss

    def state_dict(self):
        sd = super().state_dict()
        return {**sd, "pre": self.pre.state_dict(), STATE_TAG: type(self).__name__}

    def load_state_dict(self, state_dict):
        check_state_dict(self, state_dict, ("state", "param_groups", "pre"), self.defaults)
        state_dict = {k: v for k, v in state_dict.items() if k != STATE_TAG}
        self.pre.load_state_dict(state_dict.pop("pre"))
        super().load_state_dict(state_dict)


@dataclass(frozen=True)
class Row:
    cls: Any
    kwargs: dict = field(default_factory=dict)
    invalid: dict = field(default_factory=dict)
    steps: int = 30
    rtol: float = 1e-6
    faults: tuple = ALL
    with_outputs: bool = False
    needs_model: bool = False
    closure_required: bool = True
    id: str = ""


EXACT = dict(fisher="exact", factor_decay=0.0, inverse_update_interval=1)
_OPTIMIZERS_UNDER_TEST = [
    Row(Newton, invalid={"damping": -1.0, "mode": "dense", "step_rule": "wolfe", "max_evals": 0},
        steps=5, id="Newton"),
    Row(Newton, {"mode": "cg"}, {"cg_tol": 0.0}, steps=10, id="Newton-cg"),
    Row(Newton, {"step_rule": "trust_region"}, {"eta": 0.5}, steps=15, id="Newton-tr"),
    Row(Newton, {"step_rule": "levenberg_marquardt"}, {"damping": 0.0}, steps=15, id="Newton-lm"),
    Row(HessianFree, {"damping": 1e-3}, {"damping": 0.0, "curvature": "fisher",
        "warm_start_decay": 1.5}, steps=10, with_outputs=True, id="HessianFree-ggn"),
    Row(HessianFree, {"damping": 1e-3, "curvature": "hessian", "preconditioner": "diagonal"},
        {"num_probes": 0}, steps=10, id="HessianFree-hessian"),
    Row(BFGS, invalid={"lr": -1.0, "c1": 0.95, "max_evals": 0, "curvature_safeguard": "maybe"},
        faults=FIRST_ORDER, id="BFGS"),
    Row(DFP, invalid={"c2": 1.5, "lr": 0.0}, steps=40, faults=FIRST_ORDER, id="DFP"),
    Row(LBFGS, invalid={"history_size": 0, "line_search_fn": "armijo", "tolerance_grad": -1.0},
        faults=FIRST_ORDER, id="LBFGS"),
    Row(SR1, invalid={"eta": 0.5, "max_radius": -2.0, "subproblem": "lanczos",
        "init_scale": -1.0}, steps=40, faults=FIRST_ORDER, id="SR1"),
    Row(AdaHessian, {"lr": 0.3, "generator": _gen()}, {"lr": -1.0, "eps": 0.0,
        "betas": (0.9, 1.0), "hessian_power": 1.5}, steps=300, rtol=1e-3, id="AdaHessian"),
    Row(SophiaH, {"lr": 0.05, "rho": 1.0, "betas": (0.5, 0.99), "update_interval": 1,
        "generator": _gen()}, {"rho": 0.0, "update_interval": 0, "weight_decay": -0.1},
        steps=300, rtol=1e-3, id="SophiaH"),
    Row(Shampoo, {"lr": 0.3, "momentum": 0.5, "grafting": "none", "epsilon": 1e-12,
        "update_interval": 1, "statistics_interval": 1},
        {"lr": -1.0, "epsilon": 0.0, "grafting": "rmsprop", "graft_betas": (0.9, 1.0)},
        steps=300, rtol=1e-3, faults=FIRST_ORDER, closure_required=False, id="Shampoo"),
    Row(KFAC, {**EXACT, "lr": 1.0, "momentum": 0.0, "damping": 1e-10, "kl_clip": None},
        {"lr": -1.0, "damping": 0.0, "momentum": 1.0, "fisher": "true"}, steps=5,
        faults=FIRST_ORDER, needs_model=True, closure_required=False, id="KFAC"),
    Row(KFAC, {"generator": _gen(), "lr": 0.3, "momentum": 0.5, "damping": 1e-3},
        steps=150, rtol=1e-3, faults=FIRST_ORDER, needs_model=True, closure_required=False,
        id="KFAC-mc"),
    Row(KFAC, {"generator": _gen(), "lr": 0.3, "momentum": 0.5, "damping": 1e-3,
        "adapt_damping": 1}, {"adapt_damping": 0}, steps=150, rtol=1e-3, faults=FIRST_ORDER,
        needs_model=True, closure_required=False, id="KFAC-adaptive-damping"),
    Row(KFACPreconditionedSGD, {**EXACT, "damping": 1e-10}, {"damping": 0.0},
        steps=5, faults=("grad",), needs_model=True, closure_required=False,
        id="KFACPreconditioner"),
    Row(NaturalGradient, {"damping": 1e-10, "tol": 1e-12, "max_iters": 100},
        {"damping": 0.0, "method": "newton", "momentum": 1.0}, steps=3, faults=FIRST_ORDER,
        needs_model=True, id="NaturalGradient-cg"),
    Row(NaturalGradient, {"method": "kfac", "damping": 1e-10}, {"fisher": "true"}, steps=3,
        faults=FIRST_ORDER, needs_model=True, id="NaturalGradient-kfac"),
]  # fmt: skip


@pytest.mark.parametrize("row", _OPTIMIZERS_UNDER_TEST, ids=lambda r: r.id)
def test_conformance_table(row: Row):
    report = check_optimizer(
        row.cls,
        row.kwargs,
        invalid=row.invalid,
        problem="least_squares",
        steps=row.steps,
        rtol=row.rtol,
        with_outputs=row.with_outputs,
        dtypes=(D, torch.float32),
        check_closure_errors=row.closure_required,
        faults=row.faults,
        needs_model=row.needs_model,
    )
    expected = {"converges", "dtype_device", "state_dict", "invalid_hyperparameters",
                "state_dict_refused"} | {f"nan_{f}" for f in row.faults}  # fmt: skip
    if row.closure_required:
        expected.add("bad_closure")
    assert set(report) == expected


def test_every_optimizer_is_in_the_table():
    covered = {r.cls for r in _OPTIMIZERS_UNDER_TEST} | {KFACPreconditioner}
    public = {getattr(hesse.optim, n) for n in hesse.optim.__all__}
    assert public - covered == {CurvatureLR}  # a scheduler: tested below


def test_kfac_nan_statistic_discarded():
    """A NaN recorded K-FAC statistic raises; factors, generator and parameters unchanged;
    the next finite step equals that of a fresh run from the saved state."""
    model, loss_fn, X, Y, _ = make_least_squares_problem()
    opt = KFAC(
        model, loss_fn, generator=_gen(), inverse_update_interval=1, factor_update_interval=1
    )

    def step(o, m, poison=False):
        o.zero_grad()
        loss_fn(m(X), Y).backward()
        if poison:
            o.preconditioner._A_sum[0][0, 0] = math.nan
        o.step()

    for _ in range(3):
        step(opt, model)
    sd, p0 = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    with pytest.raises(hesse.NonFiniteError, match="K-FAC statistic"):
        step(opt, model, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(p0.values(), model.state_dict().values()))
    st = opt.state_dict()["kfac"]
    assert torch.equal(st["generator"], sd["kfac"]["generator"])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(st["factors"], sd["kfac"]["factors"]))
    step(opt, model)
    model2 = copy.deepcopy(model)
    model2.load_state_dict(p0)
    opt2 = KFAC(
        model2, loss_fn, generator=_gen(5), inverse_update_interval=1, factor_update_interval=1
    )
    opt2.load_state_dict(sd)
    step(opt2, model2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_curvature_lr_non_finite_and_foreign_state():
    model, loss_fn, X, Y, _ = make_least_squares_problem()
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = CurvatureLR(sgd, model, loss_fn, (X, Y), generator=_gen(), tol=1e-6)
    lr, hist, rng = sgd.param_groups[0]["lr"], list(sched.history), sched.generator.get_state()
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(hesse.NonFiniteError):
        sched.measure()
    assert sgd.param_groups[0]["lr"] == lr and sched.history == hist
    assert torch.equal(sched.generator.get_state(), rng)
    with pytest.raises(ValueError, match="saved by KFAC"):
        sched.load_state_dict({**sched.state_dict(), "hesse_optimizer": "KFAC"})
    with pytest.raises(ValueError, match="missing keys"):
        sched.load_state_dict({"steps": 0})


def test_load_state_dict_of_another_class_refused_with_its_name():
    x = torch.zeros(3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="saved by LBFGS, not BFGS"):
        BFGS([x]).load_state_dict(LBFGS([x]).state_dict())
    with pytest.raises(ValueError, match="saved by BFGS, not DFP"):
        DFP([x]).load_state_dict(BFGS([x]).state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        AdaHessian([x]).load_state_dict({"state": {}, "param_groups": []})


@pytest.mark.parametrize("cls", [Newton, HessianFree, BFGS, SR1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_work(cls, dtype):
    """Work vectors and dense linear algebra run in float32; parameters stay in dtype."""
    model, loss_fn, X, Y, f_star = make_least_squares_problem(dtype)
    opt = cls(model.parameters())

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = loss_fn(out, Y)
        loss.backward()
        return loss, out

    f0 = float(opt.step(closure))
    for _ in range(10):
        f = float(opt.step(closure))
    assert all(p.dtype == dtype for p in model.parameters())
    assert f - f_star < 0.1 * (f0 - f_star)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, lf: Newton(m.parameters()),
        lambda m, lf: LBFGS(m.parameters()),
        lambda m, lf: AdaHessian(m.parameters()),
        lambda m, lf: Shampoo(m.parameters()),
        lambda m, lf: KFAC(m.parameters(), model=m, loss_fn=lf),
        lambda m, lf: NaturalGradient(m.parameters(), model=m, loss_fn=lf),
    ],
)
def test_meta_device_refused(make):
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="'meta' device"):
        make(model, nn.MSELoss())


def test_model_first_shorthand_equals_params_first():
    model, loss_fn, X, Y, _ = make_least_squares_problem()
    model2 = copy.deepcopy(model)
    a = NaturalGradient(model, loss_fn)
    b = NaturalGradient(model2.parameters(), model=model2, loss_fn=loss_fn)
    for o, m in ((a, model), (b, model2)):
        o.zero_grad()

        def closure(o=o, m=m):
            o.zero_grad()
            loss = loss_fn(m(X), Y)
            loss.backward()
            return loss

        o.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    with pytest.raises(TypeError, match="needs the model"):
        KFAC(model.parameters(), loss_fn=loss_fn)
