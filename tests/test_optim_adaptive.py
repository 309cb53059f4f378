"""Curvature-adaptive lr (CurvatureLR), Hutchinson-diagonal optimizers, natural gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hesse import KFACOperator
from hesse.optim import AdaHessian, CurvatureLR, NaturalGradient, SophiaH
from hesse.optim.adaptive import hutchinson_diagonal_of_graph
from hesse.testing import dense_ggn, dense_hessian

DT = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _regression(seed=0, n=40):
    g = _gen(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    X = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.sin(X[:, :2])
    return model, nn.MSELoss(), X, y


def _closure(opt, model, loss_fn, X, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure


# -- Hutchinson diagonal ----------------------------------------------------------------
def test_hutchinson_probes_are_exact_signs_and_exact_for_diagonal_hessian():
    d = torch.tensor([3.0, -1.0, 0.5, 7.0], dtype=DT)
    x = torch.randn(4, dtype=DT, requires_grad=True)
    f = 0.5 * (d * x**2).sum() + x.sum() ** 1  # Hessian = diag(d)
    (gr,) = torch.autograd.grad(f, [x], create_graph=True)
    est = hutchinson_diagonal_of_graph([gr], [x], 1, _gen(0))
    assert torch.equal(est[0], d)  # z * (D z) = d exactly iff z is +-1


@pytest.mark.montecarlo
def test_hutchinson_diagonal_unbiased_within_4_stderr():
    g = _gen(1)
    B = torch.randn(6, 6, generator=g, dtype=DT)
    H = B @ B.T
    x = torch.randn(6, dtype=DT, requires_grad=True)
    f = 0.5 * x @ H @ x
    (gr,) = torch.autograd.grad(f, [x], create_graph=True)
    gen = _gen(2)
    samples = torch.stack(
        [hutchinson_diagonal_of_graph([gr], [x], 1, gen, retain_graph=True)[0] for _ in range(400)]
    )
    mean, se = samples.mean(0), samples.std(0) / 400**0.5
    assert bool(((mean - torch.diagonal(H)).abs() <= 4 * se + 1e-12).all())
    # variance of z*(Hz) per coordinate is sum_{j != i} H_ij^2 (Rademacher), check the scale
    var = (H**2).sum(1) - torch.diagonal(H) ** 2
    assert rel(samples.var(0), var) < 0.3


# -- AdaHessian / SophiaH ---------------------------------------------------------------
def _least_squares():
    g = _gen(3)
    A = torch.randn(30, 5, generator=g, dtype=DT) * torch.tensor([1, 3, 0.3, 2, 1], dtype=DT)
    b = torch.randn(30, generator=g, dtype=DT)
    x_star = torch.linalg.lstsq(A, b).solution
    return A, b, x_star


@pytest.mark.parametrize(
    "cls, kw",
    [
        (AdaHessian, dict(lr=0.1)),
        (SophiaH, dict(lr=0.05, rho=0.5, update_interval=1, betas=(0.9, 0.99))),
    ],
)
def test_diagonal_methods_converge_on_quadratic(cls, kw):
    A, b, x_star = _least_squares()
    x = nn.Parameter(torch.zeros(5, dtype=DT))
    opt = cls([x], generator=_gen(0), **kw)

    def closure():
        opt.zero_grad()
        loss = ((A @ x - b) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(150):
        opt.step(closure)
    assert float((x.detach() - x_star).norm()) < 1e-3


@pytest.mark.parametrize(
    "cls, kw",
    [
        (AdaHessian, dict(lr=0.1, hessian_power=0.5)),
        (SophiaH, dict(lr=0.05, rho=0.05, update_interval=1)),
    ],
)
def test_diagonal_methods_converge_on_rosenbrock(cls, kw):
    x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=DT))
    opt = cls([x], generator=_gen(0), **kw)

    def closure():
        opt.zero_grad()
        loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        loss.backward()
        return loss

    for _ in range(600):
        loss = opt.step(closure)
    assert float(loss) < 2e-2  # from 24.2


@pytest.mark.parametrize("cls", [AdaHessian, SophiaH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_methods_keep_dtype_and_resume(cls, dtype):
    model, loss_fn, X, y = _regression()
    model = model.to(dtype)
    X, y = X.to(dtype), y.to(dtype)
    opt = cls(model.parameters(), lr=0.01, generator=_gen(0))
    for _ in range(3):
        opt.step(_closure(opt, model, loss_fn, X, y))
    assert all(p.dtype == dtype for p in model.parameters())
    model2 = copy.deepcopy(model)
    opt2 = cls(model2.parameters(), lr=0.01, generator=_gen(7))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(4):
        opt.step(_closure(opt, model, loss_fn, X, y))
        opt2.step(_closure(opt2, model2, loss_fn, X, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (AdaHessian, dict(lr=-1.0), "lr"),
        (AdaHessian, dict(betas=(1.0, 0.9)), "betas"),
        (AdaHessian, dict(hessian_power=1.5), "hessian_power"),
        (AdaHessian, dict(eps=0.0), "eps"),
        (AdaHessian, dict(num_probes=0), "num_probes"),
        (SophiaH, dict(rho=0.0), "rho"),
        (SophiaH, dict(update_interval=0), "update_interval"),
        (SophiaH, dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_diagonal_methods_reject_bad_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(2))], **kwargs)


def test_diagonal_methods_need_a_closure():
    opt = AdaHessian([nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)


# -- CurvatureLR ------------------------------------------------------------------------
def test_curvature_lr_sets_c_times_2_over_lambda_max_global_and_per_layer():
    model, loss_fn, X, y = _regression()
    H = dense_hessian(model, loss_fn, (X, y))
    lam = float(torch.linalg.eigvalsh(H)[-1])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = CurvatureLR(
        opt, model, loss_fn, (X, y), c=0.8, tol=1e-8, num_matvecs=200, generator=_gen(0)
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 2 / lam, rel=1e-6)
    # per layer: one group per layer, each gets its own diagonal block's lambda_max
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = torch.optim.SGD(groups, lr=1.0)
    CurvatureLR(
        opt,
        model,
        loss_fn,
        (X, y),
        c=0.5,
        per_layer=True,
        tol=1e-8,
        num_matvecs=200,
        generator=_gen(0),
    )
    n0 = sum(p.numel() for p in model[0].parameters())
    for gi, sl in enumerate([slice(0, n0), slice(n0, H.shape[0])]):
        lam_b = float(torch.linalg.eigvalsh(H[sl, sl])[-1])
        assert opt.param_groups[gi]["lr"] == pytest.approx(2 * 0.5 / lam_b, rel=1e-6)
    del sched


def test_curvature_lr_ggn_and_warm_start_is_cheap():
    model, loss_fn, X, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = CurvatureLR(
        opt,
        model,
        loss_fn,
        (X, y),
        curvature="ggn",
        interval=2,
        tol=1e-6,
        num_matvecs=200,
        generator=_gen(0),
    )
    G = dense_ggn(model, loss_fn, (X, y))
    assert sched.history[0][1][0] == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-5)
    cold = sched.last_results[0].num_matvecs
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        sched.step()
    assert len(sched.history) == 2  # re-measured after `interval` steps
    assert sched.history[1][0] == 2
    sched.measure()  # parameters unchanged: the warm start is the top eigenvector already
    assert sched.last_results[0].num_matvecs <= 3 < cold


def test_curvature_lr_keeps_gradient_descent_stable_on_least_squares():
    # linear least squares: H = 2 X^T X / (N d) constant; c < 1 converges, lr > 2/lam diverges
    g = _gen(4)
    X = torch.randn(50, 3, generator=g, dtype=DT) * torch.tensor([1.0, 5.0, 0.2], dtype=DT)
    y = torch.randn(50, 1, generator=g, dtype=DT)
    for c, converges in [(0.9, True), (1.05, False)]:
        model = nn.Linear(3, 1).to(DT)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        CurvatureLR(
            opt, model, nn.MSELoss(), (X, y), c=c, tol=1e-10, num_matvecs=100, generator=_gen(0)
        )
        losses = []
        for _ in range(300):
            opt.zero_grad()
            loss = nn.MSELoss()(model(X), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert (losses[-1] < losses[0]) == converges


def test_curvature_lr_bad_input():
    model, loss_fn, X, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="c"):
        CurvatureLR(opt, model, loss_fn, (X, y), c=0.0)
    with pytest.raises(ValueError, match="interval"):
        CurvatureLR(opt, model, loss_fn, (X, y), interval=0)
    with pytest.raises(ValueError, match="curvature"):
        CurvatureLR(opt, model, loss_fn, (X, y), curvature="fisher")
    with pytest.raises(TypeError, match="Optimizer"):
        CurvatureLR(object(), model, loss_fn, (X, y))
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=DT))], lr=1.0)
    with pytest.raises(ValueError, match="belong"):
        CurvatureLR(other, model, loss_fn, (X, y))


# -- natural gradient -------------------------------------------------------------------
def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss()], ids=["mse", "ce"])
def test_natural_gradient_cg_step_equals_dense_fisher_solve(loss_fn):
    g = _gen(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(12, 4, generator=g, dtype=DT)
    y = (
        torch.randint(0, 3, (12,), generator=g)
        if isinstance(loss_fn, nn.CrossEntropyLoss)
        else torch.randn(12, 3, generator=g, dtype=DT)
    )
    F = dense_ggn(model, loss_fn, (X, y))  # == exact Fisher for these losses
    model.zero_grad()
    loss_fn(model(X), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = torch.linalg.solve(F + 0.01 * torch.eye(F.shape[0], dtype=DT), grad)
    before = _flat(model)
    opt = NaturalGradient(model, loss_fn, lr=0.5, damping=0.01, tol=1e-12, max_iters=200)
    opt.step(_closure(opt, model, loss_fn, X, y))
    assert opt.last_solve.converged
    assert rel((before - _flat(model)) / 0.5, want) < 1e-8


def test_natural_gradient_kfac_step_equals_dense_kfac_solve():
    model, loss_fn, X, y = _regression()
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    model.zero_grad()
    loss_fn(model(X), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = torch.linalg.solve(K + 0.01 * torch.eye(K.shape[0], dtype=DT), grad)
    before = _flat(model)
    opt = NaturalGradient(model, loss_fn, lr=1.0, damping=0.01, method="kfac")
    opt.step(_closure(opt, model, loss_fn, X, y))
    assert rel(before - _flat(model), want) < 1e-10


@pytest.mark.parametrize("method", ["cg", "kfac"])
def test_natural_gradient_converges(method):
    model, loss_fn, X, y = _regression()
    opt = NaturalGradient(model, loss_fn, lr=0.5, damping=1e-2, method=method, max_iters=10)
    first = float(loss_fn(model(X), y).detach())
    for _ in range(20):
        loss = opt.step(_closure(opt, model, loss_fn, X, y))
    assert float(loss) < 0.05 * first


def test_natural_gradient_resume_and_bad_input():
    model, loss_fn, X, y = _regression()
    opt = NaturalGradient(model, loss_fn, lr=0.3, momentum=0.5, fisher="mc", generator=_gen(0))
    for _ in range(2):
        opt.step(_closure(opt, model, loss_fn, X, y))
    model2 = copy.deepcopy(model)
    opt2 = NaturalGradient(model2, loss_fn, lr=0.3, momentum=0.5, fisher="mc", generator=_gen(9))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        opt.step(_closure(opt, model, loss_fn, X, y))
        opt2.step(_closure(opt2, model2, loss_fn, X, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for kwargs, match in [
        (dict(lr=0.0), "lr"),
        (dict(damping=-1.0), "damping"),
        (dict(method="lbfgs"), "method"),
        (dict(fisher="true"), "fisher"),
        (dict(momentum=1.0), "momentum"),
        (dict(max_iters=0), "max_iters"),
    ]:
        with pytest.raises(ValueError, match=match):
            NaturalGradient(model, loss_fn, **kwargs)
    opt = NaturalGradient(model, loss_fn)

    def bad_closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), y)  # not the loss_fn object given
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="loss_fn"):
        opt.step(bad_closure)
