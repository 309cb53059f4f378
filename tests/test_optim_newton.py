"""Newton (exact / CG; line search, trust region, LM, saddle-free) and HessianFree."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hesse.optim import HessianFree, Newton
from hesse.optim._base import GGNProductOperator, GradHVPOperator, ParamVector
from hesse.optim._closure import evaluate
from hesse.testing import dense_ggn, dense_hessian, minimize, rosenbrock

D = torch.float64


def _spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    lam = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (Q * lam) @ Q.T


def _tiny_mlp(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 3, generator=gen, dtype=D)
    y = torch.randint(0, 3, (12,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("mode", ["exact", "cg"])
def test_newton_one_step_on_quadratic(mode):
    n = 6
    A = _spd(n, 1e3, seed=1)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    x = torch.zeros(n, dtype=D, requires_grad=True)
    opt = Newton([x], mode=mode, cg_tol=1e-12)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ (A @ x) - b @ x
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert opt.counters["iterations"] == 1
    assert opt.counters["hvps"] == (n if mode == "exact" else opt.counters["hvps"])


def test_newton_rosenbrock_nocedal_wright():
    """N&W (2006) section 6.1: Newton with line search from (-1.2, 1) takes 21 iterations."""
    r = minimize(rosenbrock(2), Newton, gtol=1e-5, norm=2)
    assert r.converged
    assert 19 <= r.iterations <= 23, r.iterations
    torch.testing.assert_close(r.x, torch.ones(2, dtype=D), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "cg"},
        {"step_rule": "trust_region"},
        {"step_rule": "trust_region", "mode": "cg"},
        {"step_rule": "levenberg_marquardt"},
        {"saddle_free": True},
    ],
)
def test_newton_variants_rosenbrock(kwargs):
    r = minimize(rosenbrock(2), Newton, gtol=1e-6, max_iters=300, **kwargs)
    assert r.converged, (kwargs, r.iterations, r.f)
    torch.testing.assert_close(r.x, torch.ones(2, dtype=D), atol=1e-5, rtol=0)


def _saddle(x):  # saddle at (0, 0), minima at (0, +-sqrt(2)); f = x^2 - y^2 + y^4 / 4
    return x[0] ** 2 - x[1] ** 2 + 0.25 * x[1] ** 4


@pytest.mark.parametrize("mode", ["exact", "cg"])
def test_saddle_free_escapes_saddle(mode):
    """Pure Newton (x -= H^-1 g) converges to the saddle; saddle-free Newton goes downhill."""
    x0 = torch.tensor([0.5, 0.1], dtype=D)
    z = x0.clone()
    for _ in range(20):
        g = torch.func.grad(_saddle)(z)
        z = z - torch.linalg.solve(torch.func.hessian(_saddle)(z), g)
    torch.testing.assert_close(z, torch.zeros(2, dtype=D), atol=1e-8, rtol=0)
    free = minimize(_saddle, Newton, x0, max_iters=100, gtol=1e-9, saddle_free=True, mode=mode)
    assert free.converged
    torch.testing.assert_close(free.x.abs(), torch.tensor([0.0, math.sqrt(2)], dtype=D))
    assert free.f == pytest.approx(-1.0)


def test_graph_hvp_operator_matches_dense_hessian():
    model, loss_fn, X, y = _tiny_mlp()
    params = list(model.parameters())

    def closure():
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    ev = evaluate(closure, params, create_graph=True)
    op = GradHVPOperator.from_evaluation(ParamVector(params), ev)
    n = op.shape[0]
    H = op.matmat(torch.eye(n, dtype=D))
    cols = torch.stack([op.matvec(e) for e in torch.eye(n, dtype=D)], dim=1)
    torch.testing.assert_close(cols, H, rtol=1e-10, atol=1e-12)
    ref = dense_hessian(model, loss_fn, (X, y))
    torch.testing.assert_close(H, ref, rtol=1e-8, atol=1e-10)
    assert torch.autograd.backward.__name__ == "backward"  # the patch was undone
    assert all(p.grad is not None and p.grad.grad_fn is None for p in params)


def test_ggn_operator_matches_dense_ggn():
    model, loss_fn, X, y = _tiny_mlp(1)
    params = list(model.parameters())

    def closure():
        out = model(X)
        loss = loss_fn(out, y)
        loss.backward()
        return loss, out

    ev = evaluate(closure, params, retain_graph=True)
    op = GGNProductOperator(ParamVector(params), ev.graph_loss, ev.outputs)
    G = op.matmat(torch.eye(op.shape[0], dtype=D))
    torch.testing.assert_close(op.matvec(G[:, 0] * 0 + 1), G.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, dense_ggn(model, loss_fn, (X, y)), rtol=1e-8, atol=1e-10)


def test_graph_mode_undone_after_error():
    x = torch.zeros(2, dtype=D, requires_grad=True)
    opt = Newton([x])
    original = torch.autograd.backward

    def bad():
        loss = (x**2).sum()
        loss.backward()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(bad)
    assert torch.autograd.backward is original


def _mlp_data(seed=0, N=64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 5, generator=gen, dtype=D)
    y = (X[:, :3] @ torch.randn(3, 4, generator=gen, dtype=D)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)).to(D)
    return model, X, y


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"curvature": "hessian", "preconditioner": "diagonal", "backtrack": False}],
)
def test_hessian_free_trains_mlp(kwargs):
    model, X, y = _mlp_data()
    loss_fn = nn.CrossEntropyLoss()
    opt = HessianFree(
        model.parameters(), cg_max_iters=25, generator=torch.Generator().manual_seed(0), **kwargs
    )

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = loss_fn(out, y)
        loss.backward()
        return loss, out

    losses = [float(opt.step(closure)) for _ in range(8)]
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))  # Armijo: monotone
    c = opt.counters
    assert c["iterations"] == 8 and c["hvps"] > 8


def test_hessian_free_minibatch_curvature_and_errors():
    model, X, y = _mlp_data(1)
    loss_fn = nn.CrossEntropyLoss()
    opt = HessianFree(model.parameters(), cg_max_iters=20)

    def closure():
        opt.zero_grad()
        out = model(X)
        loss = loss_fn(out, y)
        loss.backward()
        return loss, out

    def curvature_closure():  # a quarter of the batch for the curvature products
        opt.zero_grad()
        out = model(X[:16])
        loss = loss_fn(out, y[:16])
        loss.backward()
        return loss, out

    first = float(opt.step(closure, curvature_closure=curvature_closure))
    for _ in range(5):
        last = float(opt.step(closure, curvature_closure=curvature_closure))
    assert last < 0.6 * first

    def loss_only():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="outputs"):
        opt.step(loss_only)
