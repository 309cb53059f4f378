"""CG (with Steihaug-Toint truncation) and MINRES against dense float64 solves."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse
from hesse import GGNOperator, HessianOperator, LinearOperator, NonFiniteError
from hesse.linalg import CGResult, CGState, CGStatus, cg_solve, exact_diagonal, minres_solve
from hesse.testing import dense_ggn, dense_hessian

from .cases import mlp_ce_mean, mlp_mse_mean

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sym(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n = eigenvalues.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    A = (Q * eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


def rhs(n: int, k: int | None = None, seed: int = 1) -> torch.Tensor:
    shape = (n,) if k is None else (n, k)
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def a_norm(A, e):
    return math.sqrt(float(e @ (A @ e)))


class FlakyOperator(LinearOperator):
    def __init__(self, A: torch.Tensor, bad_call: int):
        super().__init__(A.shape, A.dtype, A.device, symmetric=True)
        self.A, self.bad_call, self.calls = A, bad_call, 0

    def _matmat(self, V):
        self.calls += 1
        out = self.A @ V
        if self.calls >= self.bad_call:
            out = out.clone()
            out[0] = float("inf")
        return out


# -- CG on chosen spectra --------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [cg_solve, minres_solve])
def test_three_distinct_eigenvalues_converge_in_three_iterations(solver):
    ev = torch.tensor([1.0, 4.0, 9.0], dtype=F64).repeat_interleave(torch.tensor([15, 10, 15]))
    A, b = sym(ev), rhs(40)
    r = solver(A, b, tol=1e-10)
    assert isinstance(r, CGResult)
    assert r.status == "converged" and r.converged and r.num_iters == 3 and r.num_matvecs == 3
    torch.testing.assert_close(r.solution, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert r.residual_norms.shape == (4,)


def test_cg_error_obeys_chebyshev_bound():
    ev = torch.linspace(1.0, 100.0, 60, dtype=F64)
    A, b = sym(ev, seed=3), rhs(60)
    x_star = torch.linalg.solve(A, b)
    r = cg_solve(A, b, tol=1e-12, return_iterates=True)
    assert r.converged
    kappa = 100.0
    rho = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    e0 = a_norm(A, x_star)
    for i, x in r.iterates.items():
        assert a_norm(A, x - x_star) <= 2 * rho**i * e0 * (1 + 1e-8) + 1e-12
        # the recorded residual is the true residual of the iterate
        assert float(r.residual_norms[i]) == pytest.approx(float((b - A @ x).norm()), rel=1e-6)
    # A-norm error decreases monotonically
    errs = [a_norm(A, x - x_star) for _, x in sorted(r.iterates.items())]
    assert all(e1 <= e0_ * (1 + 1e-10) for e0_, e1 in zip(errs, errs[1:]))


def test_relative_residual_tolerance_is_met():
    A, b = sym(torch.logspace(-2, 2, 50, dtype=F64), seed=4), rhs(50)
    for tol in (1e-3, 1e-6, 1e-9):
        r = cg_solve(A, b, tol=tol)
        assert r.converged
        assert float((b - A @ r.solution).norm()) <= tol * float(b.norm()) * 1.01


def test_preconditioned_cg_with_exact_diagonal():
    # Badly scaled, diagonally dominant: Jacobi preconditioning removes the scaling.
    n = 80
    scales = torch.logspace(0, 4, n, dtype=F64)
    C = torch.randn(n, n, generator=gen(5), dtype=F64) * 0.1
    A = (C + C.T) / 2
    A = A + torch.diag(A.abs().sum(1) + 1.0)
    A = scales.sqrt().unsqueeze(1) * A * scales.sqrt().unsqueeze(0)
    b = rhs(n)
    d = exact_diagonal(A).estimate
    plain = cg_solve(A, b, tol=1e-10, max_iters=2000)
    pre = cg_solve(A, b, tol=1e-10, preconditioner=d)
    pre_op = cg_solve(A, b, tol=1e-10, preconditioner=hesse.DiagonalOperator(1 / d))
    pre_fn = cg_solve(A, b, tol=1e-10, preconditioner=lambda R: R / d.unsqueeze(1))
    x_star = torch.linalg.solve(A, b)
    for r in (pre, pre_op, pre_fn):
        assert r.converged
        torch.testing.assert_close(r.solution, x_star, rtol=1e-6, atol=1e-9)
    # the same preconditioner three ways (r / d, r * (1 / d)): rounding may move a count by one
    counts = [r.num_iters for r in (pre, pre_op, pre_fn)]
    assert max(counts) - min(counts) <= 1
    assert pre.num_iters < 30 < plain.num_iters, (pre.num_iters, plain.num_iters)


@pytest.mark.parametrize("damping", [0.0, 0.1, 3.0])
def test_damped_solve(damping):
    A, b = sym(torch.linspace(0.0, 5.0, 30, dtype=F64), seed=6), rhs(30)  # singular at 0
    if damping == 0.0:
        A = A + 0.5 * torch.eye(30, dtype=F64)
    r = cg_solve(A, b, damping=damping, tol=1e-12)
    x = torch.linalg.solve(A + damping * torch.eye(30, dtype=F64), b)
    torch.testing.assert_close(r.solution, x, rtol=1e-8, atol=1e-10)
    rm = minres_solve(A, b, damping=damping, tol=1e-12)
    torch.testing.assert_close(rm.solution, x, rtol=1e-7, atol=1e-9)


def test_damping_turns_indefinite_into_definite():
    A, b = sym(torch.linspace(-1.0, 4.0, 25, dtype=F64), seed=7), rhs(25)
    with pytest.raises(ValueError, match="indefinite"):
        cg_solve(A, b)
    r = cg_solve(A, b, damping=1.5, tol=1e-12)
    torch.testing.assert_close(
        r.solution, torch.linalg.solve(A + 1.5 * torch.eye(25, dtype=F64), b), rtol=1e-8, atol=1e-9
    )


def test_truncation_is_a_status_and_warm_start():
    A, b = sym(torch.logspace(-3, 0, 40, dtype=F64), seed=8), rhs(40)
    r = cg_solve(A, b, max_iters=5)
    assert r.status == "max_iters" and not r.converged and r.num_iters == 5
    assert r.residual_norms.shape == (6,)
    r0 = cg_solve(A, b, max_iters=0)
    assert r0.status == "max_iters" and bool((r0.solution == 0).all())
    full = cg_solve(A, b, tol=1e-8)
    warm = cg_solve(A, b, x0=full.solution, tol=1e-6)
    assert warm.num_iters == 0 and warm.converged and warm.num_matvecs == 1


def test_block_rhs_matches_columnwise_solves():
    A, B = sym(torch.logspace(-1, 1, 35, dtype=F64), seed=9), rhs(35, 4)
    B[:, 2] = 0.0  # a zero column converges at once
    r = cg_solve(A, B, tol=1e-10)
    assert r.solution.shape == (35, 4) and r.residual_norm.shape == (4,)
    assert r.statuses == ("converged",) * 4
    torch.testing.assert_close(r.solution, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-9)
    per_column = [cg_solve(A, B[:, j], tol=1e-10) for j in range(4)]
    # A block product rounds differently from a single one, so a column may stop an iteration
    # or two earlier or later than alone (seen: 141 vs 139 matvecs on another CPU): the block
    # does the work of the separate solves up to 2 iterations per column, never more columns.
    assert abs(r.num_matvecs - sum(c.num_matvecs for c in per_column)) <= 2 * B.shape[1]
    assert abs(r.num_iters - max(c.num_iters for c in per_column)) <= 2
    assert r.num_matvecs <= (B.shape[1] - 1) * r.num_iters  # the zero column never multiplies
    rm = minres_solve(A, B, tol=1e-10)
    torch.testing.assert_close(rm.solution, torch.linalg.solve(A, B), rtol=1e-6, atol=1e-8)


# -- negative curvature and trust region -----------------------------------------------------------


def test_negative_curvature_stop_returns_direction():
    A, b = sym(torch.linspace(-2.0, 6.0, 30, dtype=F64), seed=10), rhs(30)
    with pytest.raises(ValueError, match="minres_solve"):
        cg_solve(A, b)
    r = cg_solve(A, b, on_negative_curvature="stop")
    assert r.status == "negative_curvature" and not r.converged
    p = r.direction
    assert float(p @ (A @ p)) <= 0
    assert float(r.curvature) == pytest.approx(float(p @ (A @ p) / (p @ p)), rel=1e-10)
    assert float(r.curvature) >= -2.0 - 1e-10  # a Rayleigh quotient of A


def test_steihaug_stops_at_the_boundary():
    A, b = sym(torch.logspace(-2, 1, 40, dtype=F64), seed=11), rhs(40)
    x_star = torch.linalg.solve(A, b)
    radius = 0.3 * float(x_star.norm())
    r = cg_solve(A, b, radius=radius, return_iterates=True)
    assert r.status == "boundary"
    assert float(r.solution.norm()) == pytest.approx(radius, rel=1e-10)
    # Iterate norms increase and the model decreases monotonically (Steihaug's theorem).
    xs = [x for _, x in sorted(r.iterates.items())] + [r.solution]

    def phi(x):
        return float(0.5 * x @ (A @ x) - b @ x)

    assert all(float(u.norm()) <= float(v.norm()) + 1e-12 for u, v in zip(xs, xs[1:]))
    assert all(phi(v) <= phi(u) + 1e-12 for u, v in zip(xs, xs[1:]))
    assert float(r.residual_norm) == pytest.approx(float((b - A @ r.solution).norm()), rel=1e-8)
    # A radius beyond the solution changes nothing.
    big = cg_solve(A, b, radius=10 * float(x_star.norm()), tol=1e-10)
    assert big.status == "converged"
    torch.testing.assert_close(big.solution, x_star, rtol=1e-7, atol=1e-9)


def test_steihaug_negative_curvature_goes_to_the_boundary():
    ev = torch.linspace(-3.0, 5.0, 30, dtype=F64)
    A, b = sym(ev, seed=12), rhs(30)
    r = cg_solve(A, b, radius=100.0)  # never raises with a radius
    assert r.status == "negative_curvature"
    assert float(r.solution.norm()) == pytest.approx(100.0, rel=1e-10)
    assert float(r.direction @ (A @ r.direction)) <= 0
    phi = float(0.5 * r.solution @ (A @ r.solution) - b @ r.solution)
    assert phi < 0  # moved downhill along the negative curvature


def test_callback_and_model_value():
    A, b = sym(torch.linspace(1.0, 50.0, 30, dtype=F64), seed=13), rhs(30)
    seen: list[CGState] = []

    def cb(state):
        seen.append(state)
        x = state.solution
        assert float(state.model_value) == pytest.approx(
            float(0.5 * x @ (A @ x) - b @ x), rel=1e-9, abs=1e-12
        )
        return state.iteration >= 4

    r = cg_solve(A, b, callback=cb, tol=1e-12)
    assert r.status == CGStatus.CALLBACK.value == "callback" and r.num_iters == 4
    assert [s.iteration for s in seen] == [1, 2, 3, 4]
    keep = cg_solve(A, b, tol=1e-12, return_iterates=[1, 3])
    assert sorted(keep.iterates) == [1, 3]
    torch.testing.assert_close(keep.iterates[3], seen[2].solution)


# -- MINRES ----------------------------------------------------------------------------------------


def test_minres_indefinite_matches_dense_solve():
    ev = torch.cat([torch.linspace(-5.0, -0.5, 20), torch.linspace(0.5, 10.0, 30)]).to(F64)
    A, b = sym(ev, seed=14), rhs(50)
    r = minres_solve(A, b, tol=1e-10)
    assert r.converged and r.method == "minres"
    torch.testing.assert_close(r.solution, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert float((b - A @ r.solution).norm()) <= 1e-10 * float(b.norm()) * 10
    # The residual norms are non-increasing (MINRES minimises them).
    h = r.residual_norms
    assert bool((h[1:] <= h[:-1] * (1 + 1e-10)).all())
    # Preconditioned with |diag| still solves the indefinite system.
    rp = minres_solve(A, b, tol=1e-10, preconditioner=torch.diagonal(A).abs() + 0.1)
    torch.testing.assert_close(rp.solution, r.solution, rtol=1e-6, atol=1e-7)
    rt = minres_solve(A, b, max_iters=3)
    assert rt.status == "max_iters" and rt.num_iters == 3


# -- end to end ------------------------------------------------------------------------------------


def test_cg_on_curvature_operators_matches_dense():
    model, loss_fn, data = mlp_ce_mean()
    H = dense_hessian(model, loss_fn, data)
    n = H.shape[0]
    b = rhs(n, seed=15)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = max(0.0, -lam_min) + 0.1
    op = HessianOperator(model, loss_fn, data)
    r = cg_solve(op, b, damping=damping, tol=1e-10)
    x = torch.linalg.solve(H + damping * torch.eye(n, dtype=F64), b)
    torch.testing.assert_close(r.solution, x, rtol=1e-7, atol=1e-8)
    m = minres_solve(op, b, damping=0.05, tol=1e-10, max_iters=2000)
    x = torch.linalg.solve(H + 0.05 * torch.eye(n, dtype=F64), b)
    torch.testing.assert_close(m.solution, x, rtol=1e-6, atol=1e-6)

    model, loss_fn, data = mlp_mse_mean()
    G = dense_ggn(model, loss_fn, data)
    gop = GGNOperator(model, loss_fn, data)
    b = rhs(G.shape[0], 3, seed=16)
    r = cg_solve(gop, b, damping=1e-2, tol=1e-10)
    x = torch.linalg.solve(G + 1e-2 * torch.eye(G.shape[0], dtype=F64), b)
    torch.testing.assert_close(r.solution, x, rtol=1e-6, atol=1e-7)


# -- properties ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 40),
    log_cond=st.floats(0.0, 4.0),
    damping=st.floats(0.0, 10.0),
    seed=st.integers(0, 10_000),
)
def test_property_random_spd_spectra(n, log_cond, damping, seed):
    ev = torch.logspace(0.0, log_cond, n, dtype=F64) * torch.rand(n, generator=gen(seed)).to(
        F64
    ).add(0.5)
    A, b = sym(ev, seed=seed), rhs(n, seed=seed + 1)
    tol = 1e-8
    r = cg_solve(A, b, damping=damping, tol=tol)
    Ad = A + damping * torch.eye(n, dtype=F64)
    assert r.converged
    # the true residual meets the tolerance (recurrence drift allowed for)
    assert float((b - Ad @ r.solution).norm()) <= 10 * tol * float(b.norm())
    # forward error bounded by the residual / lambda_min
    err = float((r.solution - torch.linalg.solve(Ad, b)).norm())
    assert err <= 10 * tol * float(b.norm()) / float(ev.min() + damping)
    m = minres_solve(A, b, damping=damping, tol=tol)
    assert float((b - Ad @ m.solution).norm()) <= 10 * tol * float(b.norm())


@settings(max_examples=15, deadline=None)
@given(n=st.integers(4, 30), radius=st.floats(0.01, 5.0), seed=st.integers(0, 10_000))
def test_property_steihaug_stays_in_region(n, radius, seed):
    ev = torch.linspace(-1.0, 3.0, n, dtype=F64)
    A, b = sym(ev, seed=seed), rhs(n, seed=seed + 1)
    r = cg_solve(A, b, radius=radius, tol=1e-10)
    norm = float(r.solution.norm())
    assert norm <= radius * (1 + 1e-9)
    if r.status in ("boundary", "negative_curvature"):
        assert norm == pytest.approx(radius, rel=1e-8)
    phi = float(0.5 * r.solution @ (A @ r.solution) - b @ r.solution)
    assert phi <= 1e-12  # never worse than x = 0


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", [cg_solve, minres_solve])
def test_bad_input(solver):
    A, b = torch.eye(5, dtype=F64), torch.ones(5, dtype=F64)
    with pytest.raises(ValueError, match="tol"):
        solver(A, b, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        solver(A, b, tol=-1e-3)
    with pytest.raises(ValueError, match="damping"):
        solver(A, b, damping=-1.0)
    with pytest.raises(ValueError, match="Shape mismatch"):
        solver(A, torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="Shape mismatch"):
        solver(A, torch.ones(5, 2, 1, dtype=F64))
    with pytest.raises(TypeError, match="Dtype mismatch"):
        solver(A, torch.ones(5, dtype=torch.float32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        solver(A, [1.0] * 5)
    with pytest.raises(ValueError, match="square"):
        solver(torch.ones(5, 4, dtype=F64), b)
    with pytest.raises(ValueError, match="symmetric"):
        solver(torch.triu(torch.ones(5, 5, dtype=F64)), b)
    with pytest.raises(ValueError, match="x0"):
        solver(A, b, x0=torch.ones(5, 1, dtype=F64))
    with pytest.raises(ValueError, match="max_iters"):
        solver(A, b, max_iters=-1)
    with pytest.raises(TypeError, match="preconditioner"):
        solver(A, b, preconditioner=torch.eye(5, dtype=F64))
    with pytest.raises(ValueError, match="preconditioner"):
        solver(A, b, preconditioner=torch.zeros(5, dtype=F64))
    with pytest.raises(TypeError, match="preconditioner"):
        solver(A, b, preconditioner="jacobi")
    with pytest.raises(TypeError, match="callback"):
        solver(A, b, callback=3)
    with pytest.raises(TypeError, match="return_iterates"):
        solver(A, b, return_iterates="all")


def test_cg_specific_bad_input():
    A, b = torch.eye(5, dtype=F64), torch.ones(5, dtype=F64)
    with pytest.raises(ValueError, match="radius"):
        cg_solve(A, b, radius=0.0)
    with pytest.raises(ValueError, match="on_negative_curvature"):
        cg_solve(A, b, on_negative_curvature="ignore")
    with pytest.raises(ValueError, match="x0"):
        cg_solve(A, b, radius=1.0, x0=2 * b)


@pytest.mark.parametrize("solver", [cg_solve, minres_solve])
def test_non_finite_product_raises_with_partial_result(solver):
    A, b = sym(torch.linspace(1.0, 10.0, 20, dtype=F64)), rhs(20)
    with pytest.raises(NonFiniteError, match="Non-finite") as info:
        solver(FlakyOperator(A, bad_call=4), b, tol=1e-12)
    part = info.value.partial
    assert isinstance(part, CGResult) and part.status == "breakdown"
    assert part.num_iters == 3 and part.num_matvecs == 4
    assert bool(torch.isfinite(part.solution).all())
    # the partial solution is the third iterate
    ref = solver(A, b, max_iters=3)
    torch.testing.assert_close(part.solution, ref.solution)
