"""Flatness metrics against closed forms (least squares at its minimiser, brute-force corners)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from hesse.analysis import (
    adaptive_sharpness,
    curvature_trace,
    epsilon_sharpness,
    flatness_metrics,
    lambda_max,
)

F64 = torch.float64


def _least_squares(n=4, N=20, seed=0, scales=(3.0, 1.5, 1.0, 0.5)):
    """Linear regression at its exact minimiser: L(w* + d) - L(w*) = d^T X^T X d / N."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=F64) * torch.tensor(scales, dtype=F64)
    y = torch.randn(N, 1, generator=g, dtype=F64)
    model = nn.Linear(n, 1, bias=False).double()
    w = torch.linalg.lstsq(X, y).solution
    with torch.no_grad():
        model.weight.copy_(w.T)
    H = 2 * X.T @ X / N  # Hessian of nn.MSELoss (mean over N outputs)
    return model, nn.MSELoss(), (X, y), H


def test_l2_epsilon_sharpness_closed_form():
    model, loss_fn, data, H = _least_squares()
    eps = 0.1
    r = epsilon_sharpness(
        model, loss_fn, data, epsilon=eps, num_steps=30, generator=torch.Generator().manual_seed(0)
    )
    truth = 0.5 * eps**2 * float(torch.linalg.eigvalsh(H)[-1])
    assert r.sharpness <= truth * (1 + 1e-9)
    assert r.sharpness >= truth * (1 - 1e-3)
    assert abs(float(r.delta.norm()) - eps) < 1e-9  # on the sphere
    assert r.converged and r.num_grads == 31
    # the returned delta attains the reported value
    d = r.delta
    assert abs(0.5 * float(d @ H @ d) - r.sharpness) < 1e-9 * truth
    assert r.history.shape == (31,) and bool((r.history.diff() >= 0).all())


def test_linf_epsilon_sharpness_equals_best_corner():
    model, loss_fn, data, H = _least_squares(n=3, scales=(2.0, 1.0, 0.7))
    eps = 0.05
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=F64) * eps
    truth = float(max(0.5 * c @ H @ c for c in corners))  # max of a convex form on a box
    r = epsilon_sharpness(
        model,
        loss_fn,
        data,
        epsilon=eps,
        norm="linf",
        num_steps=20,
        num_restarts=4,
        generator=torch.Generator().manual_seed(1),
    )
    assert abs(r.sharpness - truth) < 1e-9 * truth
    assert float(r.delta.abs().max()) <= eps + 1e-15


def test_adaptive_sharpness_closed_form():
    model, loss_fn, data, H = _least_squares()
    w = model.weight.detach().reshape(-1)
    C = torch.diag(w.abs())
    rho = 0.1
    r = adaptive_sharpness(
        model, loss_fn, data, rho=rho, num_steps=40, generator=torch.Generator().manual_seed(0)
    )
    truth = 0.5 * rho**2 * float(torch.linalg.eigvalsh(C @ H @ C)[-1])
    assert truth * (1 - 1e-3) <= r.sharpness <= truth * (1 + 1e-9)
    assert float((r.delta / w.abs()).norm()) <= rho * (1 + 1e-12)


def _relu_net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (16,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def test_adaptive_sharpness_is_rescaling_invariant_plain_is_not():
    model, loss_fn, data = _relu_net()
    rescaled, _, _ = _relu_net()
    with torch.no_grad():  # same function: ReLU is positively homogeneous
        rescaled[0].weight.mul_(4.0)
        rescaled[0].bias.mul_(4.0)
        rescaled[2].weight.div_(4.0)
    X, y = data
    torch.testing.assert_close(rescaled(X), model(X))
    kw = dict(num_steps=10, rho=0.05)
    a1 = adaptive_sharpness(model, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw)
    a2 = adaptive_sharpness(
        rescaled, loss_fn, data, generator=torch.Generator().manual_seed(0), **kw
    )
    assert abs(a1.sharpness - a2.sharpness) <= 1e-8 * abs(a1.sharpness)
    e1 = epsilon_sharpness(model, loss_fn, data, epsilon=0.05, num_steps=10)
    e2 = epsilon_sharpness(rescaled, loss_fn, data, epsilon=0.05, num_steps=10)
    assert abs(e1.sharpness - e2.sharpness) > 0.1 * abs(e1.sharpness)


def test_sharpness_restores_parameters():
    model, loss_fn, data = _relu_net()
    before = [p.detach().clone() for p in model.parameters()]
    epsilon_sharpness(model, loss_fn, data, epsilon=0.1, num_steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -1.0}, ValueError, "epsilon"),
        ({"norm": "l1"}, ValueError, "norm"),
        ({"num_steps": -1}, ValueError, "num_steps"),
        ({"num_restarts": 0}, ValueError, "num_restarts"),
        ({"step_size": 0.0}, ValueError, "step_size"),
        ({"eta": -0.1}, ValueError, "eta"),
    ],
)
def test_bad_input(kwargs, exc, match):
    model, loss_fn, data = _relu_net()
    with pytest.raises(exc, match=match):
        epsilon_sharpness(model, loss_fn, data, **kwargs)


def test_lambda_max_and_trace_wrappers():
    pytest.importorskip("hesse.linalg.eigen")
    model, loss_fn, data, H = _least_squares()
    evals = torch.linalg.eigvalsh(H)
    r = lambda_max(model, loss_fn, data, generator=torch.Generator().manual_seed(0))
    assert abs(float(r.eigenvalues[0]) - float(evals[-1])) < 1e-3 * float(evals[-1])
    rd = lambda_max(H)
    assert abs(float(rd.eigenvalues[0]) - float(evals[-1])) < 1e-3 * float(evals[-1])
    t = curvature_trace(model, loss_fn, data, generator=torch.Generator().manual_seed(0))
    assert abs(float(t.estimate) - float(evals.sum())) <= 4 * float(t.stderr) + 1e-9
    m = flatness_metrics(model, loss_fn, data, generator=torch.Generator().manual_seed(0))
    assert abs(m.lambda_max - float(evals[-1])) < 1e-3 * float(evals[-1])
    assert m.epsilon_sharpness.sharpness <= 0.5 * 0.05**2 * float(evals[-1]) * (1 + 1e-9)
    with pytest.raises(ValueError, match="curvature"):
        lambda_max(model, loss_fn, data, curvature="hessain")
    with pytest.raises(TypeError, match="loss_fn and data"):
        lambda_max(model)
