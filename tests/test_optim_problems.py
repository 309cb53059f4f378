"""The test-problem set (Rosenbrock, Himmelblau, More-Garbow-Hillstrom) and the MGH sweep."""

from __future__ import annotations

import math

import pytest
import torch

from hesse.optim import BFGS, DFP, LBFGS, SR1, Newton
from hesse.testing import get_problem, himmelblau, mgh_problems, minimize, rosenbrock

D = torch.float64

# known minimisers (MGH 1981 and the problems' definitions) -> f there must equal f*
MINIMISERS = {
    "rosenbrock": (1.0, 1.0),
    "freudenstein_roth": (5.0, 4.0),
    "brown_badly_scaled": (1e6, 2e-6),
    "beale": (3.0, 0.5),
    "helical_valley": (1.0, 0.0, 0.0),
    "box3d": (1.0, 10.0, 1.0),
    "powell_singular": (0.0, 0.0, 0.0, 0.0),
    "wood": (1.0, 1.0, 1.0, 1.0),
    "extended_rosenbrock10": (1.0,) * 10,
    "extended_powell8": (0.0,) * 8,
    "variably_dimensioned8": (1.0,) * 8,
    "brown_almost_linear5": (1.0,) * 5,
    "linear_full_rank5_10": (-1.0,) * 5,
    "biggs_exp6": (1.0, 10.0, 1.0, 5.0, 4.0, 3.0),
}


def test_problem_set_is_complete_and_standard():
    probs = mgh_problems()
    names = [p.name for p in probs]
    assert len(names) == len(set(names)) >= 25
    for p in probs:
        x0 = p.start()
        assert x0.shape == (p.n,) and len(p.x0) == p.n
        f0 = p(x0).detach()
        assert f0.ndim == 0 and math.isfinite(float(f0))
        assert float(f0) >= p.f_star - 1e-12  # the start is not below the minimum
    # a few published starting values (MGH 1981): f(x0)
    for name, f0 in [("rosenbrock", 24.2), ("wood", 19192.0), ("powell_singular", 215.0)]:
        p = get_problem(name)
        assert float(p(p.start().detach())) == pytest.approx(f0)


@pytest.mark.parametrize("name", sorted(MINIMISERS))
def test_known_minimisers(name):
    p = get_problem(name)
    x = torch.tensor(MINIMISERS[name], dtype=D, requires_grad=True)
    f = p(x)
    f.backward()
    targets = (p.f_star, *p.other_minima)
    assert min(abs(float(f.detach()) - t) for t in targets) <= 1e-12
    assert float(x.grad.abs().max()) <= 1e-6 * max(1.0, float(x.detach().abs().max()))


def test_himmelblau_minima_and_rosenbrock_nd():
    h = himmelblau()
    for m in [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)]:
        assert float(h(torch.tensor(m, dtype=D))) == pytest.approx(0.0, abs=1e-9)
    r = rosenbrock(5)
    assert r.x0 == (-1.2, 1.0, -1.2, 1.0, -1.2) and float(r(torch.ones(5, dtype=D))) == 0.0
    assert get_problem("rosenbrock7d").n == 7
    with pytest.raises(ValueError, match="'nope'"):
        get_problem("nope")
    with pytest.raises(ValueError, match="n=1"):
        rosenbrock(1)


def test_solved_uses_published_precision():
    p = get_problem("kowalik_osborne")
    assert p.solved(3.0750560e-4) and not p.solved(3.0760e-4)
    fr = get_problem("freudenstein_roth")
    assert fr.solved(48.98425368) and fr.solved(1e-12) and not fr.solved(49.0)


def test_minimize_reports_counters():
    r = minimize(get_problem("beale"), BFGS, gtol=1e-8)
    assert r.converged and get_problem("beale").solved(r.f)
    assert r.iterations == r.counters["iterations"]
    # minimize's first gradient test runs the closure once; later tests reuse the optimizer's
    assert r.func_evals == r.counters["func_evals"] + 1


# Problems where a method legitimately stops elsewhere within 150 iterations (documented with
# the full MGH table in benchmarks/README.md): SR1's spherical trust region crawls on the badly
# scaled Powell problem (x* = (1.1e-5, 9.1)), and SR1 ends in another stationary region on
# Osborne 1.
KNOWN_FAILURES = {
    ("SR1", "powell_badly_scaled"),
    ("SR1", "osborne1"),
}
SWEEP = [
    "rosenbrock",
    "freudenstein_roth",
    "brown_badly_scaled",
    "beale",
    "helical_valley",
    "bard",
    "gaussian",
    "box3d",
    "powell_singular",
    "wood",
    "kowalik_osborne",
    "osborne1",
    "biggs_exp6",
    "watson6",
    "extended_rosenbrock10",
    "extended_powell8",
    "penalty1_4",
    "variably_dimensioned8",
    "trigonometric5",
    "brown_almost_linear5",
    "broyden_tridiagonal6",
    "linear_full_rank5_10",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, cls, kwargs",
    [
        ("BFGS", BFGS, {}),
        ("LBFGS", LBFGS, {}),
        ("DFP", DFP, {}),
        ("SR1", SR1, {}),
        ("Newton", Newton, {}),
    ],
)
def test_mgh_sweep(method, cls, kwargs):
    """Every method reaches the published f* (or a published local minimum) on the MGH set."""
    failed = []
    for name in SWEEP:
        p = get_problem(name)
        r = minimize(p, cls, gtol=1e-8, max_iters=150, until=p.solved, **kwargs)
        if not p.solved(r.f) and (method, name) not in KNOWN_FAILURES:
            failed.append((name, r.f, r.iterations))
    assert not failed, f"{method} missed f* on {failed}"
