"""Stochastic Lanczos quadrature: quadrature invariants, trace, smoothing, W1, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

import hesse
from hesse.linalg import spectral_density
from hesse.operators.base import DenseOperator
from hesse.testing import dense_hessian
from tests.cases import CASES
from tests.test_linalg_eigen import CountingNaN, gen, with_spectrum


def hessian_like(n: int = 300, seed: int = 0) -> torch.Tensor:
    """A bulk near zero (both signs) and a few positive outliers, like a network Hessian."""
    g = gen(seed)
    bulk = torch.randn(n - 6, generator=g, dtype=torch.float64) * 0.05
    out = torch.tensor([8.0, 5.0, 3.0, 2.0, 1.5, 1.0], dtype=torch.float64)
    return torch.cat([out, bulk])


@pytest.mark.parametrize("deflate", [0, 4])
def test_quadrature_invariants_and_trace(deflate):
    lam = hessian_like()
    A = with_spectrum(lam)
    calls = []

    class Spy(DenseOperator):
        def _matmat(self, V):
            calls.append(V.shape[1])
            return super()._matmat(V)

    p, m = 6, 30
    d = spectral_density(
        Spy(A, symmetric=True), num_probes=p, num_steps=m, deflate=deflate, generator=gen(1)
    )
    assert d.nodes.shape == d.weights.shape == (p, deflate + m)
    torch.testing.assert_close(d.weights.sum(1), torch.ones(p, dtype=torch.float64))
    assert bool((d.weights >= 0).all())
    assert float(d.nodes.min()) >= float(lam.min()) - 1e-9
    assert float(d.nodes.max()) <= float(lam.max()) + 1e-9
    # all probes advance together: m batched passes of p columns (after the deflation solve)
    assert calls[-m:] == [p] * m and d.num_matvecs == sum(calls)
    exact = float(lam.sum())
    assert abs(float(d.trace) - exact) <= 4 * float(d.trace_stderr)
    if deflate:
        top = torch.tensor([8.0, 5.0, 3.0, 2.0], dtype=torch.float64)
        torch.testing.assert_close(d.nodes[0, :deflate], top, rtol=1e-6, atol=0)
        torch.testing.assert_close(d.weights[:, :deflate], torch.full((p, 4), 1 / 300.0).double())
    # the density is a probability density: integrates to ~1 on the default grid
    integral = float(torch.trapezoid(d.density, d.grid))
    assert abs(integral - 1.0) < 1e-2
    assert d.density_stderr.shape == d.grid.shape and bool((d.density_stderr >= 0).all())


def test_implied_trace_equals_hutchinson_with_same_probes():
    """Without deflation, sum_j w_pj theta_pj is exactly z^T A z / ||z||^2."""
    A = with_spectrum(hessian_like(200, seed=2), seed=2)
    d = spectral_density(A, num_probes=5, num_steps=12, deflate=0, generator=gen(7))
    g = gen(7)
    Z = (2 * torch.randint(0, 2, (200, 5), generator=g, dtype=torch.int8) - 1).double()
    hutch = ((Z * (A @ Z)).sum(0)).mean()
    torch.testing.assert_close(d.trace, hutch, rtol=1e-10, atol=1e-12)


def test_implied_trace_agrees_with_trace_estimator():
    A = with_spectrum(hessian_like(200, seed=3), seed=3)
    d = spectral_density(A, num_probes=20, num_steps=20, generator=gen(3))
    t = hesse.linalg.hutchinson_trace(A, num_matvecs=200, generator=gen(4))
    both = math.sqrt(float(d.trace_stderr) ** 2 + float(t.stderr) ** 2)
    assert abs(float(d.trace) - float(t.estimate)) <= 4 * both


def test_full_krylov_recovers_spectrum_and_w1_matches_scipy():
    lam = torch.linspace(-1.0, 2.0, 40, dtype=torch.float64)
    A = with_spectrum(lam, seed=4)
    d = spectral_density(A, num_probes=3, num_steps=40, deflate=0, generator=gen(5))
    for p in range(3):  # 40 steps on n = 40: every node is an exact eigenvalue
        live = d.weights[p] > 1e-10
        dist = (d.nodes[p, live].unsqueeze(1) - lam.unsqueeze(0)).abs().min(1).values
        assert float(dist.max()) < 1e-8
    ref = wasserstein_distance(
        lam.numpy(), d.nodes.reshape(-1).numpy(), v_weights=d.weights.reshape(-1).numpy()
    )
    assert abs(d.wasserstein_distance(lam) - ref) < 1e-12
    # quadrature CDF at the top is 1, below the spectrum 0
    assert float(d.cdf(torch.tensor(5.0))) == pytest.approx(1.0)
    assert float(d.cdf(torch.tensor(-5.0))) == pytest.approx(0.0)


def test_log_scale_and_resmoothing():
    lam = torch.cat(
        [torch.logspace(-4, 1, 150, dtype=torch.float64), -torch.rand(50, generator=gen(0))]
    ).double()
    A = with_spectrum(lam, seed=6)
    d = spectral_density(
        A, num_probes=8, num_steps=60, log_scale=True, log_floor=1e-6, generator=gen(1)
    )
    assert d.log_scale and d.grid.min() > -7
    frac = float(torch.trapezoid(d.density, d.grid))
    assert abs(frac - 150 / 200) < 0.1  # mass of the positive part
    g, dens, err = d.smooth(torch.linspace(-1.5, 10.5, 1200, dtype=torch.float64), sigma=0.1)
    assert abs(float(torch.trapezoid(dens, g)) - 1.0) < 2e-2
    assert err.shape == g.shape


def test_end_to_end_tiny_model_wasserstein():
    model, loss_fn, data = CASES[0].build()
    H = dense_hessian(model, loss_fn, data)
    ref = np.linalg.eigvalsh(0.5 * (H + H.T).numpy())
    op = hesse.HessianOperator(model, loss_fn, data)
    n = op.shape[0]
    d = spectral_density(op, num_probes=8, num_steps=n, deflate=2, generator=gen(0))
    rng = ref.max() - ref.min()
    w1 = d.wasserstein_distance(torch.tensor(ref)) / rng
    assert w1 < 0.05  # only probe noise is left (n = 39 eigenvalues, 8 probes)
    np.testing.assert_allclose(d.nodes[0, :2].numpy(), ref[::-1][:2], rtol=1e-6)
    assert abs(float(d.trace) - ref.sum()) <= 4 * float(d.trace_stderr)


def test_bad_input():
    A = with_spectrum(hessian_like(60), seed=1)
    with pytest.raises(ValueError, match="symmetric"):
        spectral_density(DenseOperator(A, symmetric=False))
    with pytest.raises(ValueError, match="square"):
        spectral_density(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(A, sigma=-1.0)
    with pytest.raises(ValueError, match="probe"):
        spectral_density(A, probe="sobol")
    with pytest.raises(hesse.NonFiniteError) as info:
        spectral_density(CountingNaN(A, good=4 * 5), num_probes=4, deflate=0, generator=gen(0))
    part = info.value.partial
    assert isinstance(part, hesse.SpectralDensity) and not part.converged
    assert part.nodes.shape == (4, 5)
    torch.testing.assert_close(part.weights.sum(1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("deflate", [0, 5])
def test_checkpoint_resume_is_bit_identical(tmp_path, deflate):
    from tests.test_linalg_eigen import InterruptAt

    A = with_spectrum(hessian_like(200, 1), 1)
    kw = dict(num_probes=4, num_steps=30, deflate=deflate)
    ref = spectral_density(A, generator=gen(3), **kw)
    path = tmp_path / "slq.pt"
    with pytest.raises(KeyboardInterrupt, match="checkpoint="):
        spectral_density(
            InterruptAt(A, 60), generator=gen(3), checkpoint=path, checkpoint_every=16, **kw
        )
    assert path.exists()
    with pytest.raises(ValueError, match="does not match"):
        spectral_density(A, num_probes=5, num_steps=30, deflate=deflate, checkpoint=path)
    res = spectral_density(A, generator=gen(99), checkpoint=path, **kw)
    assert not path.exists() and res.num_matvecs == ref.num_matvecs
    torch.testing.assert_close(res.nodes, ref.nodes, rtol=0, atol=0)
    torch.testing.assert_close(res.weights, ref.weights, rtol=0, atol=0)
