"""Loss slices: exact losses at sampled points, quadratic model from dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hesse.analysis import (
    LossSlice,
    loss_slice,
    loss_surface_2d,
    perturbed_parameters,
    random_direction,
)
from hesse.testing import dense_hessian
from hesse.testing.checks import concat_data

F64 = torch.float64


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(seed + 10)
    X = torch.randn(13, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=g)
    data = [(X[:8], y[:8]), (X[8:], y[8:])]  # unequal batches: exact mean must hold
    return model, nn.CrossEntropyLoss(), data


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_at(model, loss_fn, data, theta):
    """Independent reference: functional_call on the concatenated data."""
    X, y = concat_data(data)
    state, i = {}, 0
    for name, p in model.named_parameters():
        state[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    with torch.no_grad():
        return loss_fn(torch.func.functional_call(model, state, (X,)), y)


def _grad_at(model, loss_fn, data, theta):
    return torch.func.grad(lambda t: _loss_at_graph(model, loss_fn, data, t))(theta)


def _loss_at_graph(model, loss_fn, data, theta):
    X, y = concat_data(data)
    state, i = {}, 0
    for name, p in model.named_parameters():
        state[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return loss_fn(torch.func.functional_call(model, state, (X,)), y)


def test_slice_matches_loss_at_sampled_points_and_dense_quadratic():
    model, loss_fn, data = _problem()
    theta0 = _flat(model)
    g = torch.Generator().manual_seed(3)
    d = torch.randn(theta0.numel(), generator=g, dtype=F64)
    s = loss_slice(model, loss_fn, data, d, radius=0.7, num_points=9)
    assert isinstance(s, LossSlice)
    assert s.losses.shape == s.alphas.shape == s.quadratic.shape == (9,)
    for i in (0, 3, 4, 8):
        ref = _loss_at(model, loss_fn, data, theta0 + s.alphas[i] * d)
        torch.testing.assert_close(s.losses[i], ref, rtol=1e-12, atol=1e-12)
    H = dense_hessian(model, loss_fn, data)
    gref = _grad_at(model, loss_fn, data, theta0)
    torch.testing.assert_close(torch.tensor(s.curvature, dtype=F64), d @ H @ d, rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(s.slope, dtype=F64), gref @ d, rtol=1e-9, atol=1e-12)
    q = s.loss0 + s.alphas * (gref @ d) + 0.5 * s.alphas**2 * (d @ H @ d)
    torch.testing.assert_close(s.quadratic, q, rtol=1e-9, atol=1e-12)
    assert s.num_matvecs == 1 and s.num_evaluations == 9
    # parameters restored bit-exactly
    assert torch.equal(_flat(model), theta0)


def test_quadratic_model_error_is_third_order():
    model, loss_fn, data = _problem(1)
    d = random_direction(model, generator=torch.Generator().manual_seed(0))
    errs = []
    for r in (0.2, 0.1):
        s = loss_slice(model, loss_fn, data, d, radius=r, num_points=5)
        errs.append(s.max_quadratic_error)
    # Taylor remainder O(r^3): halving the radius divides the error by ~8
    assert 5.0 < errs[0] / errs[1] < 11.0


def test_linear_mse_slice_is_exactly_quadratic():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=F64)
    y = torch.randn(10, 2, generator=g, dtype=F64)
    d = torch.randn(8, generator=g, dtype=F64)
    s = loss_slice(model, nn.MSELoss(), (X, y), d, radius=3.0, num_points=7)
    torch.testing.assert_close(s.losses, s.quadratic, rtol=1e-10, atol=1e-12)


def test_curvature_alternatives_number_and_operator():
    model, loss_fn, data = _problem(2)
    theta0 = _flat(model)
    d = torch.ones(theta0.numel(), dtype=F64) / theta0.numel() ** 0.5
    s = loss_slice(model, loss_fn, data, d, radius=0.5, num_points=3, curvature=2.5)
    assert s.curvature == 2.5 and s.num_matvecs == 0
    # q(0.5) + q(-0.5) - 2 q(0) = 0.25 * curvature
    second = s.quadratic[2] + s.quadratic[0] - 2 * s.quadratic[1]
    assert abs(float(second) - 0.25 * 2.5) < 1e-12
    from hesse import GGNOperator
    from hesse.testing import dense_ggn

    G = GGNOperator(model, loss_fn, data)
    s2 = loss_slice(model, loss_fn, data, d, radius=0.5, num_points=3, curvature=G)
    Gd = dense_ggn(model, loss_fn, data)
    assert abs(s2.curvature - float(d @ Gd @ d)) < 1e-9 * abs(float(d @ Gd @ d))


def test_random_direction_is_filter_normalised():
    model, _, _ = _problem()
    d = random_direction(model, generator=torch.Generator().manual_seed(0))
    i = 0
    for p in model.parameters():
        block = d[i : i + p.numel()].view_as(p)
        i += p.numel()
        if p.ndim == 1:
            assert torch.equal(block, torch.zeros_like(block))
        else:
            torch.testing.assert_close(block.norm(dim=1), p.detach().norm(dim=1))
    d2 = random_direction(model, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d, d2)  # reproducible with a generator
    d3 = random_direction(model, ignore_1d=False, generator=torch.Generator().manual_seed(0))
    bias = model[0].bias
    off = model[0].weight.numel()
    torch.testing.assert_close(d3[off : off + 5].norm(), bias.detach().norm())


def test_surface_2d_matches_loss_and_dense_quadratic():
    model, loss_fn, data = _problem(3)
    theta0 = _flat(model)
    g = torch.Generator().manual_seed(5)
    D = torch.randn(theta0.numel(), 2, generator=g, dtype=F64)
    s = loss_surface_2d(model, loss_fn, data, D, radius=(0.5, 0.3), num_points=(5, 3))
    assert s.losses.shape == (5, 3) and s.quadratic.shape == (5, 3)
    for i, j in [(0, 0), (4, 2), (1, 2), (2, 1)]:
        ref = _loss_at(model, loss_fn, data, theta0 + s.alphas[i] * D[:, 0] + s.betas[j] * D[:, 1])
        torch.testing.assert_close(s.losses[i, j], ref, rtol=1e-12, atol=1e-12)
    H = dense_hessian(model, loss_fn, data)
    torch.testing.assert_close(s.curvature, D.T @ H @ D, rtol=1e-9, atol=1e-12)
    gref = _grad_at(model, loss_fn, data, theta0)
    c = torch.tensor([s.alphas[1], s.betas[2]], dtype=F64)
    q = s.loss0 + c @ (D.T @ gref) + 0.5 * c @ (D.T @ H @ D) @ c
    torch.testing.assert_close(s.quadratic[1, 2], q, rtol=1e-9, atol=1e-12)
    assert torch.equal(_flat(model), theta0)
    s2 = loss_surface_2d(
        model, loss_fn, data, "random", num_points=3, generator=torch.Generator().manual_seed(0)
    )
    assert s2.direction_kind == "random" and s2.losses.shape == (3, 3)


def test_top_direction_uses_top_eigenvector():
    pytest.importorskip("hesse.linalg.eigen")
    model, loss_fn, data = _problem(4)
    s = loss_slice(
        model,
        loss_fn,
        data,
        "top",
        radius=0.1,
        num_points=3,
        generator=torch.Generator().manual_seed(0),
    )
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data))
    assert abs(s.eigenvalue - float(evals[-1])) < 1e-3 * float(evals.abs().max())
    assert abs(s.curvature - float(evals[-1])) < 1e-3 * float(evals.abs().max())
    assert abs(s.direction_norm - 1.0) < 1e-6


def test_parameters_restored_on_error():
    model, loss_fn, data = _problem()
    theta0 = _flat(model)
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError):
        with perturbed_parameters(params) as set_delta:
            set_delta(torch.ones_like(theta0))
            assert not torch.equal(_flat(model), theta0)
            raise RuntimeError("boom")
    assert torch.equal(_flat(model), theta0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"radius": 0.0}, ValueError, "radius"),
        ({"num_points": 1}, ValueError, "num_points"),
        ({"direction": "sideways"}, ValueError, "direction"),
        ({"direction": torch.zeros(3, dtype=F64)}, ValueError, "Shape mismatch"),
        ({"direction": [1.0, 2.0]}, TypeError, "direction"),
        ({"curvature": "hessian"}, TypeError, "curvature"),
    ],
)
def test_bad_input(kwargs, exc, match):
    model, loss_fn, data = _problem()
    kwargs = dict(kwargs)
    d = kwargs.pop("direction", torch.ones(sum(p.numel() for p in model.parameters()), dtype=F64))
    with pytest.raises(exc, match=match):
        loss_slice(model, loss_fn, data, d, **kwargs)


def test_zero_direction_rejected():
    model, loss_fn, data = _problem()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="zeros"):
        loss_slice(model, loss_fn, data, torch.zeros(n, dtype=F64))


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from hesse.plot import plot_loss_slice, plot_loss_surface_2d

    model, loss_fn, data = _problem()
    gen = torch.Generator().manual_seed(0)
    s = loss_slice(model, loss_fn, data, "random", num_points=7, generator=gen)
    fig = plot_loss_slice(s, tmp_path / "slice.png")
    assert (tmp_path / "slice.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) >= 2  # loss and quadratic model
    s2 = loss_surface_2d(model, loss_fn, data, "random", num_points=5, generator=gen)
    plot_loss_surface_2d(s2, tmp_path / "sub" / "surface.png")
    assert (tmp_path / "sub" / "surface.png").stat().st_size > 1000


def test_surface_2d_top_eigenvectors_and_dense_curvature():
    model, loss_fn, data = _problem(5)
    H = dense_hessian(model, loss_fn, data)
    evals = torch.linalg.eigvalsh(H)
    s = loss_surface_2d(
        model,
        loss_fn,
        data,
        "top",
        radius=0.05,
        num_points=3,
        generator=torch.Generator().manual_seed(0),
    )
    scale = float(evals.abs().max())
    assert s.direction_kind == "top"
    torch.testing.assert_close(
        s.directions.T @ s.directions, torch.eye(2, dtype=F64), atol=1e-6, rtol=0
    )
    assert abs(float(s.curvature[0, 0]) - float(evals[-1])) < 1e-3 * scale
    assert abs(float(s.curvature[1, 1]) - float(evals[-2])) < 1e-3 * scale
    assert abs(float(s.curvature[0, 1])) < 1e-3 * scale
    # a dense (n, n) curvature gives the same quadratic model as the operator
    s2 = loss_surface_2d(model, loss_fn, data, s.directions, radius=0.05, num_points=3, curvature=H)
    torch.testing.assert_close(s2.quadratic, s.quadratic, rtol=1e-8, atol=1e-10)
