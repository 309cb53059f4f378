"""Trace and diagonal estimators against exact float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse
from hesse import HessianOperator, LinearOperator, NonFiniteError
from hesse.linalg import (
    DiagonalResult,
    TraceResult,
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xdiag,
    xtrace,
)
from hesse.linalg._probes import gaussian, probes, rademacher
from hesse.testing import dense_hessian

from .cases import mlp_ce_mean

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=F64))
    return (Q * eigenvalues) @ Q.T


def low_rank_plus_noise(n: int = 200, r: int = 10, seed: int = 0) -> torch.Tensor:
    ev = torch.cat([torch.logspace(3, 1, r, dtype=F64), 0.05 * torch.ones(n - r, dtype=F64)])
    return spd(n, ev, seed)


class FlakyOperator(LinearOperator):
    """Returns NaN from the ``bad_call``-th product on."""

    def __init__(self, A: torch.Tensor, bad_call: int):
        super().__init__(A.shape, A.dtype, A.device, symmetric=True)
        self.A, self.bad_call, self.calls = A, bad_call, 0

    def _matmat(self, V):
        self.calls += 1
        out = self.A @ V
        if self.calls >= self.bad_call:
            out = out.clone()
            out[0, 0] = float("nan")
        return out


# -- probes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_probes_are_exactly_plus_minus_one(dtype):
    Z = rademacher(500, 40, dtype, "cpu", gen(0))
    assert Z.shape == (500, 40) and Z.dtype == dtype
    assert bool(((Z == 1) | (Z == -1)).all())
    assert bool((Z.abs() == 1).all())
    # Balanced signs: the mean of 20000 signs is within 4 standard deviations of zero.
    assert abs(float(Z.double().mean())) < 4 / math.sqrt(Z.numel())
    # Columns are (nearly) uncorrelated: E[Z^T Z / n] = I.
    C = Z.double().T @ Z.double() / 500
    assert float((C - torch.eye(40, dtype=F64)).abs().max()) < 5 / math.sqrt(500)


def test_probes_use_the_generator_not_the_global_rng():
    state = torch.random.get_rng_state()
    a = rademacher(30, 4, F64, "cpu", gen(3))
    b = rademacher(30, 4, F64, "cpu", gen(3))
    c = gaussian(30, 4, F64, "cpu", gen(3))
    d = probes("gaussian", 30, 4, F64, "cpu", gen(3))
    probes("rademacher", 30, 4, F64, "cpu", None)  # a fresh stream, not the global one
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, rademacher(30, 4, F64, "cpu", gen(4)))


def test_probe_bad_input():
    with pytest.raises(ValueError, match="probe"):
        probes("uniform", 3, 2)
    with pytest.raises(ValueError, match="k"):
        rademacher(3, 0)
    with pytest.raises(TypeError, match="generator"):
        rademacher(3, 2, generator=0)


# -- trace estimators ------------------------------------------------------------------------------


def test_hutchinson_rademacher_is_exact_on_a_diagonal():
    A = torch.diag(torch.linspace(-1.0, 3.0, 20, dtype=F64))
    r = hutchinson_trace(A, 10, generator=gen(0))
    assert isinstance(r, TraceResult)
    assert float(r.estimate) == pytest.approx(float(A.trace()), abs=1e-12)
    assert float(r.stderr) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.montecarlo
@pytest.mark.parametrize(
    "fn,kw",
    [
        (hutchinson_trace, {"probe": "rademacher"}),
        (hutchinson_trace, {"probe": "gaussian"}),
        (hutchpp_trace, {"probe": "rademacher"}),
        (hutchpp_trace, {"probe": "gaussian"}),
        (xtrace, {"probe": "sphere"}),
        (xtrace, {"probe": "rademacher"}),
        (xtrace, {"probe": "gaussian"}),
    ],
)
def test_estimates_within_four_stderr(fn, kw):
    n = 120
    ev = torch.cat([torch.linspace(50.0, 5.0, 8, dtype=F64), torch.rand(n - 8, generator=gen(1))])
    A = spd(n, ev.to(F64), seed=2)
    op = hesse.aslinearoperator(A)
    for seed in range(3):
        r = fn(op, 48, generator=gen(seed), block_size=7, **kw)
        assert r.num_matvecs <= 48
        assert float(r.stderr) > 0
        assert abs(float(r.estimate) - float(A.trace())) <= 4 * float(r.stderr)
    assert op.num_matvecs == sum(fn(A, 48, generator=gen(s), **kw).num_matvecs for s in range(3))


def test_hutchinson_stderr_matches_closed_form_variance():
    # Rademacher: Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2).
    A = spd(40, torch.linspace(0.5, 4.0, 40, dtype=F64), seed=5)
    r = hutchinson_trace(A, 4000, generator=gen(0), block_size=500)
    var = 2 * (float((A * A).sum()) - float((torch.diagonal(A) ** 2).sum()))
    assert float(r.stderr) == pytest.approx(math.sqrt(var / 4000), rel=0.1)
    assert r.samples.shape == (4000,)


@pytest.mark.montecarlo
def test_hutchpp_and_xtrace_beat_hutchinson_on_low_rank_plus_noise():
    A = low_rank_plus_noise()
    exact = float(A.trace())

    def rms(fn):
        errs = [float(fn(A, 60, generator=gen(s)).estimate) - exact for s in range(12)]
        return math.sqrt(sum(e * e for e in errs) / len(errs))

    e_h, e_pp, e_x = rms(hutchinson_trace), rms(hutchpp_trace), rms(xtrace)
    assert e_pp < 0.2 * e_h
    assert e_x < 0.2 * e_h
    assert e_x <= e_pp * 1.5  # XTrace is at least as good as Hutch++ here


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(15, 40),
    r=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    signs=st.booleans(),
)
def test_low_rank_matrices_are_recovered_exactly(n, r, seed, signs):
    """Hutch++ (k >= r sketch vectors) and XTrace (m - 1 >= r) are exact on rank-r matrices."""
    g = gen(seed)
    U = torch.randn(n, r, generator=g, dtype=F64)
    s = torch.rand(r, generator=g, dtype=F64) + 0.5
    if signs:
        s[0] = -s[0]  # symmetric indefinite
    A = (U * s) @ U.T
    exact = float(A.trace())
    tol = 1e-8 * float(torch.linalg.matrix_norm(A))
    assert float(hutchpp_trace(A, 3 * r + 6, generator=gen(seed + 1)).estimate) == pytest.approx(
        exact, abs=tol
    )
    rx = xtrace(A, 2 * (r + 2), generator=gen(seed + 2))
    assert float(rx.estimate) == pytest.approx(exact, abs=tol)
    assert float(rx.stderr) <= tol


def test_budget_covering_n_gives_the_exact_trace():
    A = spd(10, torch.arange(1.0, 11.0, dtype=F64))
    for fn, budget in ((hutchpp_trace, 30), (xtrace, 20)):
        r = fn(A, budget)
        assert r.exact and r.method == "exact" and r.num_matvecs == 10
        assert float(r.estimate) == pytest.approx(55.0, rel=1e-12)
        assert float(r.stderr) == 0.0


def test_xtrace_nonsymmetric_matrix():
    A = torch.randn(60, 60, generator=gen(0), dtype=F64) + torch.diag(
        torch.linspace(1, 10, 60, dtype=F64)
    )
    r = xtrace(A, 40, generator=gen(1))
    assert abs(float(r.estimate) - float(A.trace())) <= 4 * float(r.stderr)


def test_trace_dispatch_and_reproducibility():
    A = low_rank_plus_noise(80, 5)
    for m in ("hutchinson", "hutchpp", "xtrace", hesse.linalg.TraceMethod.XTRACE):
        r1 = trace(A, m, 30, generator=gen(0))
        r2 = trace(A, method=m, num_matvecs=30, generator=gen(0))
        assert torch.equal(r1.estimate, r2.estimate)
        assert r1.method == getattr(m, "value", m)
    assert trace(A, num_matvecs=30, generator=gen(0)).method == "xtrace"
    assert float(hesse.trace(A, generator=gen(0))) == pytest.approx(float(A.trace()), rel=1e-3)


def test_trace_of_hessian_operator_matches_dense():
    model, loss_fn, data = mlp_ce_mean()
    H = dense_hessian(model, loss_fn, data)
    op = HessianOperator(model, loss_fn, data)
    n = op.shape[0]
    r = xtrace(op, 2 * n)  # budget >= n: exact through identity blocks
    assert float(r.estimate) == pytest.approx(float(H.trace()), rel=1e-10)
    r = hutchinson_trace(op, 200, generator=gen(0), block_size=50)
    assert abs(float(r.estimate) - float(H.trace())) <= 4 * float(r.stderr)
    d = exact_diagonal(op, block_size=16)
    torch.testing.assert_close(d.estimate, torch.diagonal(H), rtol=1e-10, atol=1e-12)


# -- diagonal --------------------------------------------------------------------------------------


def test_exact_diagonal_dense_and_counts():
    A = spd(37, torch.linspace(-2.0, 5.0, 37, dtype=F64))
    op = hesse.aslinearoperator(A)
    d = exact_diagonal(op, block_size=8)
    assert isinstance(d, DiagonalResult) and d.exact
    torch.testing.assert_close(d.estimate, torch.diagonal(A), rtol=1e-12, atol=1e-12)
    assert d.num_matvecs == 37 == op.num_matvecs
    assert bool((d.stderr == 0).all())


@pytest.mark.montecarlo
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_diagonal_within_four_stderr(probe):
    A = spd(30, torch.linspace(0.5, 6.0, 30, dtype=F64), seed=3)
    r = hutchinson_diagonal(A, 600, generator=gen(7), probe=probe, block_size=128)
    assert r.estimate.shape == (30,) and r.stderr.shape == (30,) and r.num_matvecs == 600
    z = (r.estimate - torch.diagonal(A)).abs() / r.stderr
    assert float(z.max()) <= 4.0
    if probe == "rademacher":  # per-entry variance sum_{l != j} A_jl^2 / m
        off = (A * A).sum(1) - torch.diagonal(A) ** 2
        torch.testing.assert_close(r.stderr, torch.sqrt(off / 600), rtol=0.25, atol=0.0)


def test_hutchinson_diagonal_exact_on_diagonal_matrix():
    d = torch.linspace(1.0, 2.0, 9, dtype=F64)
    r = hutchinson_diagonal(torch.diag(d), 5, generator=gen(0))
    torch.testing.assert_close(r.estimate, d, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("symmetric", [True, False])
def test_xdiag_exact_on_low_rank(symmetric):
    g = gen(11)
    U = torch.randn(80, 4, generator=g, dtype=F64)
    W = U if symmetric else torch.randn(80, 4, generator=g, dtype=F64)
    A = (U * torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=F64)) @ W.T
    r = xdiag(A, 14, generator=gen(0))
    assert r.method == "xdiag" and r.num_matvecs == 14
    torch.testing.assert_close(r.estimate, torch.diagonal(A), rtol=0, atol=1e-10)


@pytest.mark.montecarlo
def test_xdiag_beats_hutchinson_and_stderr_is_calibrated():
    A = low_rank_plus_noise(150, 8, seed=4)
    d = torch.diagonal(A)
    rx = xdiag(A, 60, generator=gen(1))
    rh = hutchinson_diagonal(A, 60, generator=gen(1))
    ex, eh = (rx.estimate - d).norm(), (rh.estimate - d).norm()
    assert float(ex) < 0.05 * float(eh)
    z = (rx.estimate - d).abs() / rx.stderr
    assert float((z <= 4).double().mean()) >= 0.97
    # exact path when the budget covers n
    re = xdiag(A[:20, :20], 40)
    assert re.exact and torch.allclose(re.estimate, torch.diagonal(A[:20, :20]))


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [hutchinson_trace, hutchpp_trace, xtrace, hutchinson_diagonal, xdiag]
)
def test_bad_input(fn):
    A = torch.eye(20, dtype=F64)
    with pytest.raises(ValueError, match="num_matvecs"):
        fn(A, 1)
    with pytest.raises(TypeError, match="num_matvecs"):
        fn(A, 10.5)
    with pytest.raises(ValueError, match="probe"):
        fn(A, 12, probe="cauchy")
    with pytest.raises(ValueError, match="square"):
        fn(torch.ones(3, 4, dtype=F64), 12)
    with pytest.raises(TypeError):
        fn([[1.0]], 12)
    with pytest.raises(ValueError, match="block_size"):
        fn(A, 12, block_size=0)


def test_trace_bad_method():
    with pytest.raises(ValueError, match="method"):
        trace(torch.eye(3), method="exact")


@pytest.mark.parametrize(
    "fn", [hutchinson_trace, hutchpp_trace, xtrace, hutchinson_diagonal, xdiag]
)
def test_non_finite_product_raises_with_partial(fn):
    A = spd(30, torch.linspace(1.0, 2.0, 30, dtype=F64))
    op = FlakyOperator(A, bad_call=2)
    with pytest.raises(NonFiniteError, match="Non-finite") as info:
        fn(op, 12, generator=gen(0), block_size=4)
    if fn in (hutchinson_trace, hutchinson_diagonal):
        assert info.value.partial is not None and info.value.partial.num_matvecs == 4


def test_exact_diagonal_non_finite_partial():
    op = FlakyOperator(torch.eye(10, dtype=F64), bad_call=2)
    with pytest.raises(NonFiniteError) as info:
        exact_diagonal(op, block_size=4)
    torch.testing.assert_close(info.value.partial, torch.ones(4, dtype=F64))


@pytest.mark.parametrize("decay", [1.0, 2.0])
def test_xtrace_error_bars_cover(decay):
    """Over 50 seeds, |estimate - trace| <= 2 stderr in at least 90% of them (decaying PSD
    spectrum, 100 products); a Gaussian error with an honest stderr covers 95%."""
    n = 400
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(0), dtype=torch.float64))
    lam = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** decay
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    truth = float(lam.sum())
    covered = 0
    for seed in range(50):
        r = xtrace(A, 100, generator=gen(100 + seed))
        covered += abs(float(r.estimate) - truth) <= 2 * float(r.stderr)
    assert covered >= 45, covered
