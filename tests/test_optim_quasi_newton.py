"""BFGS, L-BFGS, DFP, SR1: conformance, quadratic termination, Rosenbrock, safeguards."""

from __future__ import annotations

import math

import pytest
import torch

from hesse import NonFiniteError
from hesse.optim import BFGS, DFP, LBFGS, SR1
from hesse.optim._line_search import strong_wolfe
from hesse.testing import minimize, rosenbrock

D = torch.float64


def _spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    lam = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (Q * lam) @ Q.T


def _quadratic(A, b):
    return lambda x: 0.5 * x @ (A @ x) - b @ x


@pytest.mark.parametrize("cls", [BFGS, DFP])
def test_exact_line_search_recovers_inverse_hessian(cls):
    """Quadratic termination (N&W Thm 6.? / Broyden class): H_n = A^-1 after n exact steps."""
    n = 5
    A = _spd(n, 20.0)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=D)
    f = _quadratic(A, b)
    x = torch.zeros(n, dtype=D, requires_grad=True)
    # tiny c2: the strong Wolfe zoom's cubic fit is exact on a quadratic -> exact line search
    opt = cls([x], c1=1e-12, c2=1e-10, scale_initial=False)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)
    H = opt.inverse_hessian_approximation()
    torch.testing.assert_close(H, torch.linalg.inv(A), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)


def test_sr1_recovers_hessian():
    """SR1 with n linearly independent steps on a quadratic: B_n = A (N&W Theorem 6.1)."""
    n = 4
    A = _spd(n, 10.0, seed=3)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    f = _quadratic(A, b)
    x = torch.zeros(n, dtype=D, requires_grad=True)
    opt = SR1([x], lr=0.3, init_scale=1.0)  # small radius: steps stay independent

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)
    torch.testing.assert_close(opt.hessian_approximation(), A, rtol=1e-6, atol=1e-8)
    for _ in range(10):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


def test_bfgs_rosenbrock_nocedal_wright():
    """N&W (2006) section 6.1: BFGS from (-1.2, 1) with ||g|| <= 1e-5 takes 34 iterations."""
    r = minimize(rosenbrock(2), BFGS, gtol=1e-5, norm=2)
    assert r.converged
    assert 26 <= r.iterations <= 42, r.iterations
    torch.testing.assert_close(r.x, torch.ones(2, dtype=D), atol=1e-5, rtol=0)
    # the accepted point's gradient is reused: one evaluation per iteration plus extra trials
    assert r.counters["func_evals"] < 1.5 * r.iterations


@pytest.mark.parametrize("cls", [LBFGS, SR1, DFP])
def test_rosenbrock(cls):
    r = minimize(rosenbrock(2), cls, gtol=1e-5, max_iters=3000)
    assert r.converged, (cls.__name__, r.iterations, r.f)
    torch.testing.assert_close(r.x, torch.ones(2, dtype=D), atol=1e-4, rtol=0)


def test_lbfgs_two_loop_equals_explicit_bfgs_updates():
    """Two-loop direction == -H g with H from m explicit BFGS updates of gamma I (N&W 7.19)."""
    A = _spd(6, 30.0, seed=4)
    b = torch.ones(6, dtype=D)
    f = _quadratic(A, b)
    x = torch.zeros(6, dtype=D, requires_grad=True)
    opt = LBFGS([x], history_size=3)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    st = opt.state[x]
    S, Y = st["old_s"], st["old_y"]
    assert len(S) == 3
    H = float(S[-1] @ Y[-1] / (Y[-1] @ Y[-1])) * torch.eye(6, dtype=D)
    eye = torch.eye(6, dtype=D)
    for s, y in zip(S, Y):
        rho = 1.0 / (s @ y)
        H = (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s))
        H = H + rho * torch.outer(s, s)
    g = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=D)
    torch.testing.assert_close(opt._direction(g), -H @ g, rtol=1e-10, atol=1e-12)


def test_param_groups_and_mixed_shapes():
    """Two groups, different lr, mixed shapes: treated as one vector, converges."""
    A = _spd(7, 10.0, seed=5)
    b = torch.randn(7, generator=torch.Generator().manual_seed(6), dtype=D)
    w = torch.zeros(3, dtype=D, requires_grad=True)
    M = torch.zeros(2, 2, dtype=D, requires_grad=True)
    opt = BFGS([{"params": [w]}, {"params": [M], "lr": 0.5}])

    def closure():
        opt.zero_grad()
        z = torch.cat([w, M.reshape(-1)])
        loss = 0.5 * z @ (A @ z) - b @ z
        loss.backward()
        return loss

    for _ in range(40):
        opt.step(closure)
    z = torch.cat([w, M.reshape(-1)]).detach()
    torch.testing.assert_close(z, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="c1"):
        BFGS([{"params": [w]}, {"params": [M], "c1": 1e-3}])


def test_mixed_dtypes_kept():
    a = torch.tensor([1.0, -2.0], dtype=torch.float32, requires_grad=True)
    c = torch.tensor([0.5], dtype=D, requires_grad=True)
    opt = LBFGS([a, c])

    def closure():
        opt.zero_grad()
        loss = (a.double() - 3.0).pow(2).sum() + (c - 1.0).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
    assert a.dtype == torch.float32 and c.dtype == D
    torch.testing.assert_close(a.detach(), torch.full((2,), 3.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [BFGS, LBFGS, SR1])
def test_nan_region_restarts_instead_of_nan_params(cls):
    """A trial point in a region where f is NaN never ends up in the parameters."""
    x = torch.tensor([3.0], dtype=D, requires_grad=True)
    opt = cls([x], **({"lr": 100.0, "max_radius": 1000.0} if cls is SR1 else {"lr": 50.0}))

    def closure():
        opt.zero_grad()
        # log barrier: NaN for x <= 0, minimum at x = 1
        loss = x.sum() - torch.log(x).sum()
        loss.backward()
        return loss

    for _ in range(60):
        opt.step(closure)
        assert bool(torch.isfinite(x).all())
    torch.testing.assert_close(x.detach(), torch.ones(1, dtype=D), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["skip", "damp"])
def test_curvature_safeguard_damp_and_skip(mode):
    """Non-convex 1-D function with fixed steps: s^T y < 0 happens; H stays positive."""
    x = torch.tensor([0.2], dtype=D, requires_grad=True)
    opt = BFGS([x], line_search_fn=None, lr=0.5, curvature_safeguard=mode)

    def closure():
        opt.zero_grad()
        loss = (x**4 - 2 * x**2 + 0.5 * x).sum()
        loss.backward()
        return loss

    for _ in range(30):
        opt.step(closure)
    H = opt.inverse_hessian_approximation()
    assert float(torch.linalg.eigvalsh(H).min()) > 0
    assert bool(torch.isfinite(x).all())


def test_closure_contract_errors():
    x = torch.zeros(2, dtype=D, requires_grad=True)
    opt = BFGS([x])
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="torch.Tensor"):
        opt.step(lambda: 1.0)

    def no_backward():
        opt.zero_grad()
        return (x**2).sum()

    with pytest.raises(ValueError, match="backward"):
        opt.step(no_backward)

    def nan_loss():
        opt.zero_grad()
        loss = (x**2).sum() * float("nan")
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError):
        opt.step(nan_loss)
    frozen = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="requires_grad=False"):
        BFGS([frozen])

    def with_outputs():  # (loss, outputs) is accepted by every method
        opt.zero_grad()
        out = x * 2
        loss = ((out - 1) ** 2).sum()
        loss.backward()
        return loss, out

    for _ in range(10):
        opt.step(with_outputs)
    torch.testing.assert_close(x.detach(), torch.full((2,), 0.5, dtype=D))


def test_strong_wolfe_conditions_hold():
    """The returned step satisfies both strong Wolfe conditions on a 1-D quartic."""

    def phi(a):
        t = torch.tensor(a, dtype=D, requires_grad=True)
        f = (t - 3.0) ** 4 - 5 * (t - 3.0) ** 2 + t
        (g,) = torch.autograd.grad(f, t)
        return float(f.detach()), g, float(g)

    f0, _, d0 = phi(0.0)
    c1, c2 = 1e-4, 0.1
    r = strong_wolfe(phi, f0, d0, 1.0, c1=c1, c2=c2)
    assert r.converged and r.alpha > 0
    assert r.f <= f0 + c1 * r.alpha * d0
    assert abs(r.dphi) <= c2 * abs(d0)


def test_counters_and_one_iteration_per_step():
    r = minimize(rosenbrock(2), LBFGS, gtol=1e-5, max_iters=200)
    c = r.counters
    assert c["iterations"] == r.iterations
    assert c["func_evals"] == c["grad_evals"] >= c["iterations"]
    assert c["hvps"] == 0


def test_reuse_only_for_the_same_closure():
    """Full batch (same closure object): the accepted point's gradient is reused. A new
    closure object (a new mini-batch) is evaluated afresh, so no stale gradient is used."""
    x = torch.tensor([1.0, -1.0], dtype=D, requires_grad=True)
    opt = LBFGS([x])

    def make(c):
        def closure():
            opt.zero_grad()
            loss = ((x - c) ** 2).sum()
            loss.backward()
            return loss

        return closure

    full = make(0.5)
    opt.step(full)
    n = opt.counters["func_evals"]
    opt.step(full)
    reused = opt.counters["func_evals"] - n  # only line-search trials
    n = opt.counters["func_evals"]
    start_loss = opt.step(make(2.0))  # another batch at the same point
    assert opt.counters["func_evals"] - n >= reused + 1
    assert float(start_loss) > 1.0  # the new batch's loss, not the cached 0.5-batch value
