"""Shampoo and the inverse p-th root: roots vs eigh, update formula, optimizer database."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hesse import NonFiniteError
from hesse.linalg import matrix_inverse_root
from hesse.optim import Shampoo

DT = torch.float64


def _spd(n, cond, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, -np.log10(cond), n, dtype=torch.float64)
    return ((Q * ev) @ Q.T).to(dtype)


def _np_root(A, p, eps=0.0):
    w, V = np.linalg.eigh(np.asarray(A, dtype=np.float64))
    w = np.maximum(w, 0) + eps
    return (V * w ** (-1.0 / p)) @ V.T


# -- matrix_inverse_root ----------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 4, 6])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_matches_numpy_eigh(p, method):
    A = _spd(20, 1e4, seed=p)
    X = matrix_inverse_root(A, p, eps=1e-3, method=method)
    ref = torch.as_tensor(_np_root(A.numpy(), p, 1e-3))
    assert float((X - ref).norm() / ref.norm()) < 1e-9
    # defining property: X^p (A + eps I) = I
    M = torch.linalg.matrix_power(X, p) @ (A + 1e-3 * torch.eye(20, dtype=DT))
    assert float((M - torch.eye(20, dtype=DT)).abs().max()) < 1e-8


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_inverse_root_float32_stays_finite_and_accurate(method):
    A64 = _spd(40, 1e6, seed=3)
    ref = torch.as_tensor(_np_root(A64.numpy(), 4, 1e-5))
    X = matrix_inverse_root(A64.float(), 4, eps=1e-5, method=method)
    assert X.dtype == torch.float32
    assert bool(torch.isfinite(X).all())
    assert float((X.double() - ref).norm() / ref.norm()) < 1e-3
    # singular and ill-conditioned beyond float32: still finite (newton falls back to eigh)
    B = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    S = B @ B.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # newton warns and falls back to eigh
        Y = matrix_inverse_root(S, 4, eps=1e-9, method=method)
    assert bool(torch.isfinite(Y).all())
    assert bool(torch.isfinite(matrix_inverse_root(S, 4)).all())


def test_inverse_root_bad_input():
    A = _spd(4, 10)
    with pytest.raises(ValueError, match="square"):
        matrix_inverse_root(A[:3], 2)
    with pytest.raises(ValueError, match="p"):
        matrix_inverse_root(A, 0)
    with pytest.raises(ValueError, match="eps"):
        matrix_inverse_root(A, 2, eps=-1.0)
    with pytest.raises(ValueError, match="method"):
        matrix_inverse_root(A, 2, method="schur")
    with pytest.raises(NonFiniteError):
        matrix_inverse_root(A * float("nan"), 2)
    with pytest.raises(TypeError):
        matrix_inverse_root(A.numpy(), 2)


# -- the Shampoo update -----------------------------------------------------------------
def _one_step(p0, grad, **kw):
    kw = {"exponent_override": None, "statistics_interval": 1, **kw}  # the paper's Shampoo
    p = nn.Parameter(p0.clone())
    opt = Shampoo([p], **kw)
    p.grad = grad.clone()
    opt.step()
    return (p0 - p.detach()) / kw["lr"]


def test_matrix_update_is_L_quarter_G_R_quarter():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 3, generator=g, dtype=DT)
    G = torch.randn(5, 3, generator=g, dtype=DT)
    step = _one_step(W, G, lr=0.1, momentum=0.0, grafting="none", epsilon=1e-3)
    L = _np_root(G @ G.T, 4, 1e-3)
    R = _np_root(G.T @ G, 4, 1e-3)
    ref = torch.as_tensor(L @ G.numpy() @ R)
    assert float((step - ref).norm() / ref.norm()) < 1e-10


def test_order3_tensor_uses_inverse_sixth_roots_and_vectors_square_roots():
    g = torch.Generator().manual_seed(2)
    T = torch.randn(3, 4, 2, generator=g, dtype=DT)
    G = torch.randn(3, 4, 2, generator=g, dtype=DT)
    step = _one_step(T, G, lr=1.0, momentum=0.0, grafting="none", epsilon=1e-2)
    Gn = G.numpy()
    R = [
        _np_root(
            np.moveaxis(Gn, i, 0).reshape(Gn.shape[i], -1)
            @ np.moveaxis(Gn, i, 0).reshape(Gn.shape[i], -1).T,
            6,
            1e-2,
        )
        for i in range(3)
    ]
    ref = np.einsum("ai,bj,ck,ijk->abc", R[0], R[1], R[2], Gn)
    assert np.allclose(step.numpy(), ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(6, generator=g, dtype=DT)
    gv = torch.randn(6, generator=g, dtype=DT)
    step = _one_step(v, gv, lr=1.0, momentum=0.0, grafting="none", epsilon=1e-2)
    ref = _np_root(np.outer(gv.numpy(), gv.numpy()), 2, 1e-2) @ gv.numpy()
    assert np.allclose(step.numpy(), ref, rtol=1e-10)


def test_exponent_two_squares_the_preconditioner_and_vectors_can_follow_the_graft():
    g = torch.Generator().manual_seed(8)
    W, G = (torch.randn(5, 3, generator=g, dtype=DT) for _ in range(2))
    p = nn.Parameter(W.clone())
    with pytest.warns(UserWarning, match="exponent_override=None, statistics_interval=1"):
        opt = Shampoo(
            [p],
            lr=1.0,
            momentum=0.0,
            grafting="none",
            epsilon=1e-3,
            exponent_override=2,
            statistics_interval=1,
        )
    p.grad = G.clone()
    opt.step()
    ref = _np_root(G @ G.T, 2, 1e-3) @ G.numpy() @ _np_root(G.T @ G, 2, 1e-3)
    assert np.allclose((W - p.detach()).numpy(), ref, rtol=1e-10)
    # a vector is not preconditioned: the step is along its gradient, of Adam's length
    v, gv = (torch.randn(6, generator=g, dtype=DT) for _ in range(2))
    q = nn.Parameter(v.clone())
    opt = Shampoo([q], lr=1.0, momentum=0.0, precondition_1d=False)
    q.grad = gv.clone()
    opt.step()
    assert opt.state[q]["dims"] == []
    adam = gv / (gv.abs() + 1e-8)  # Adam's first step
    want = gv * adam.norm() / gv.norm()
    assert float(((v - q.detach()) - want).norm() / want.norm()) < 1e-10


def test_statistics_interval_skips_statistics():
    g = torch.Generator().manual_seed(9)
    p = nn.Parameter(torch.randn(4, 3, generator=g, dtype=DT))
    opt = Shampoo([p], statistics_interval=2, update_interval=1)  # grafted: no warning
    grads = [torch.randn(4, 3, generator=g, dtype=DT) for _ in range(3)]
    for G in grads:
        p.grad = G.clone()
        opt.step()
    L = opt.state[p]["stats"][0]
    want = grads[0] @ grads[0].T + grads[2] @ grads[2].T  # steps 0 and 2 (beta2 = 1)
    assert float((L - want).norm() / want.norm()) < 1e-12


def test_state_saved_before_the_new_options_resumes_with_the_old_behaviour():
    g = torch.Generator().manual_seed(10)
    grads = [torch.randn(3, 2, generator=g, dtype=DT) for _ in range(3)]
    ref = nn.Parameter(torch.ones(3, 2, dtype=DT))
    opt = Shampoo([ref], statistics_interval=1, precondition_1d=True)
    ref.grad = grads[0].clone()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())  # as saved to disk
    for group in sd["param_groups"]:  # as an older hesse saved it
        del group["precondition_1d"], group["statistics_interval"]
    p = nn.Parameter(ref.detach().clone())
    resumed = Shampoo([p])
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["statistics_interval"] == 1
    for G in grads[1:]:
        for q, o in ((ref, opt), (p, resumed)):
            q.grad = G.clone()
            o.step()
    assert torch.equal(p, ref)


@pytest.mark.parametrize("grafting", ["sgd", "adagrad", "adam"])
def test_grafting_takes_the_step_norm_of_the_grafted_method(grafting):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 6, generator=g, dtype=DT)
    G = torch.randn(4, 6, generator=g, dtype=DT)
    step = _one_step(W, G, lr=1.0, momentum=0.0, grafting=grafting, graft_eps=1e-8)
    graft = {"sgd": G, "adagrad": G / (G.abs() + 1e-8), "adam": G / (G.abs() + 1e-8)}[grafting]
    assert float(step.norm()) == pytest.approx(float(graft.norm()), rel=1e-10)
    raw = _one_step(W, G, lr=1.0, momentum=0.0, grafting="none")
    cos = float(step.flatten() @ raw.flatten() / (step.norm() * raw.norm()))
    assert cos == pytest.approx(1.0, abs=1e-12)  # direction is Shampoo's


def test_large_dimensions_are_not_preconditioned():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(3, 50, generator=g, dtype=DT)
    G = torch.randn(3, 50, generator=g, dtype=DT)
    step = _one_step(
        W, G, lr=1.0, momentum=0.0, grafting="none", epsilon=1e-3, max_preconditioner_dim=10
    )
    ref = torch.as_tensor(_np_root(G @ G.T, 4, 1e-3)) @ G
    assert float((step - ref).norm() / ref.norm()) < 1e-10


# -- optimizer database -----------------------------------------------------------------
def _quadratic(dtype=DT):
    g = torch.Generator().manual_seed(5)
    A = _spd(6, 1e3, seed=6, dtype=dtype)
    B = _spd(4, 1e2, seed=7, dtype=dtype)
    W_star = torch.randn(6, 4, generator=g).to(dtype)
    W = nn.Parameter(torch.zeros(6, 4, dtype=dtype))

    def loss():
        D = W - W_star
        return 0.5 * torch.trace(D.T @ A @ D @ B)

    return W, W_star, loss


def _closure(opt, f):
    def closure():
        opt.zero_grad()
        loss = f()
        loss.backward()
        return loss

    return closure


def test_shampoo_converges_on_ill_conditioned_kronecker_quadratic():
    W, W_star, f = _quadratic()
    opt = Shampoo(
        [W],
        lr=0.3,
        momentum=0.9,
        grafting="none",
        epsilon=1e-12,
        update_interval=1,
        statistics_interval=1,
    )
    first = float(f().detach())
    for _ in range(300):
        opt.step(_closure(opt, f))
    assert float(f().detach()) < 1e-4 * first


def test_shampoo_converges_on_rosenbrock():
    x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=DT))
    opt = Shampoo([x], lr=1e-2, momentum=0.9, grafting="adam", statistics_interval=1)

    def f():
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    for _ in range(1000):
        opt.step(_closure(opt, f))
    assert float(f().detach()) < 5e-3  # from 24.2 at the start
    assert float((x.detach() - 1).abs().max()) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("root_method", ["eigh", "newton"])
def test_shampoo_keeps_dtype(dtype, root_method):
    W, _, f = _quadratic(dtype)
    opt = Shampoo([W], lr=0.05, root_method=root_method)
    for _ in range(5):
        opt.step(_closure(opt, f))
    assert W.dtype == dtype and bool(torch.isfinite(W).all())
    assert all(r.dtype == dtype for r in opt.state[W]["roots"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(momentum=-0.1), "momentum"),
        (dict(beta2=1.5), "beta2"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(update_interval=0), "update_interval"),
        (dict(grafting="rmsprop"), "grafting"),
        (dict(graft_betas=(0.9,)), "graft_betas"),
        (dict(root_method="schur"), "root_method"),
        (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    ],
)
def test_shampoo_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shampoo([nn.Parameter(torch.zeros(2, 2))], **kwargs)
