"""Saddles: f = w1^2 - w2^2 + w2^4/4 (saddle at 0, minima -1 at w2 = +-sqrt 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis import detect_negative_curvature, escape_step
from hesse.testing import dense_hessian

F64 = torch.float64


def f(w):
    return w[0] ** 2 - w[1] ** 2 + w[1] ** 4 / 4


def grad_f(w):  # closed form
    return torch.stack([2 * w[0], -2 * w[1] + w[1] ** 3])


def gd(w, steps, lr=0.1):
    for _ in range(steps):
        w = w - lr * grad_f(w)
    return w


def test_gradient_descent_stalls_but_escape_step_leaves_the_saddle():
    w0 = torch.tensor([0.3, 1e-8], dtype=F64)
    w = gd(w0, 50)
    # plain GD: w1 converged, but still stuck at the saddle value f ~ 0
    assert abs(float(f(w))) < 1e-6 and float(grad_f(w).norm()) < 1e-3
    H = hesse.hessian_of(f, w)
    det = detect_negative_curvature(H)
    assert det.is_negative
    assert abs(det.lambda_min - (-2 + 3 * float(w[1]) ** 2)) < 1e-6
    assert abs(det.lambda_max - 2.0) < 1e-6
    assert abs(abs(float(det.eigenvector[1])) - 1) < 1e-6
    step = escape_step(H)
    assert step.accepted and not step.applied  # a plain function: the caller moves x
    w_esc = w + step.delta
    assert float(f(w_esc)) < -0.5
    assert abs(step.loss_after - float(f(w_esc))) < 1e-12
    assert step.loss_after - step.loss_before <= 0.5 * step.predicted_change < 0
    w_end = gd(w_esc, 50)
    assert abs(float(f(w_end)) + 1.0) < 1e-6
    assert abs(abs(float(w_end[1])) - math.sqrt(2)) < 1e-4
    # the same 50 more GD steps without the escape are still stuck near the saddle
    assert float(f(gd(w, 50))) > -0.5


def test_escape_backtracks_when_the_first_step_overshoots():
    w = torch.tensor([0.0, 1e-6], dtype=F64)
    step = escape_step(hesse.hessian_of(f, w), step_size=8.0)  # f(0, 8) = 960: too far
    assert step.accepted and step.step_size < 8.0 and step.num_evaluations > 1
    assert float(f(w + step.delta)) < 0


def test_no_escape_at_a_minimum():
    w = torch.tensor([0.0, math.sqrt(2)], dtype=F64)
    step = escape_step(hesse.hessian_of(f, w))
    assert not step.accepted and not step.detection.is_negative
    assert torch.equal(step.delta, torch.zeros(2, dtype=F64))


def test_escape_on_a_network_moves_parameters_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():  # all-zero hidden layer: a saddle of the network loss
        for p in model.parameters():
            p.zero_()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=F64)
    y = X[:, :2] @ torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)
    loss_fn = nn.MSELoss()
    H = hesse.HessianOperator(model, loss_fn, (X, y))
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, (X, y)))
    det = detect_negative_curvature(H, generator=torch.Generator().manual_seed(0))
    assert det.is_negative and abs(det.lambda_min - float(evals[0])) < 1e-3 * float(
        evals.abs().max()
    )
    before = float(H.loss())
    step = escape_step(H, step_size=1.0, generator=torch.Generator().manual_seed(0))
    assert step.accepted and step.applied
    with torch.no_grad():
        after = float(loss_fn(model(X), y))
    assert after < before and abs(after - step.loss_after) < 1e-12


def test_bad_input():
    H = hesse.hessian_of(f, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="step_size"):
        escape_step(H, step_size=0.0)
    with pytest.raises(ValueError, match="c="):
        escape_step(H, c=1.5)
    with pytest.raises(TypeError, match="curvature operator"):
        escape_step(torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="rtol"):
        detect_negative_curvature(H, rtol=-1.0)
