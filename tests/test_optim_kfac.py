"""K-FAC: factors against dense GGN/Fisher blocks, the preconditioner, the optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hesse
from hesse import FisherOperator, GGNOperator, KFACOperator
from hesse.optim import KFAC, KFACPreconditioner
from hesse.testing import check_operator

DT = torch.float64


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _targets(loss_fn, n, c, g):
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.randint(0, c, (n,), generator=g)
    y = torch.randn(n, c, generator=g, dtype=DT)
    return (y > 0).to(DT) if isinstance(loss_fn, nn.BCEWithLogitsLoss) else y


def _mlp(seed=0, d_in=4, h=5, c=3, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h, bias=bias), nn.Tanh(), nn.Linear(h, c)).to(DT)


LOSSES = [
    nn.MSELoss(),
    nn.MSELoss(reduction="sum"),
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(reduction="sum"),
    nn.BCEWithLogitsLoss(),
]


# -- factors ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: f"{type(f).__name__}-{f.reduction}")
@pytest.mark.parametrize("bias", [True, False])
def test_single_sample_linear_blocks_equal_ggn(loss_fn, bias):
    g = _gen(1)
    model = _mlp(bias=bias)
    X = torch.randn(1, 4, generator=g, dtype=DT)
    data = (X, _targets(loss_fn, 1, 3, g))
    K = KFACOperator(model, loss_fn, data)
    G = GGNOperator(model, loss_fn, data)
    for layer in ("0", "2"):
        ref = G.block(layer).to_dense()
        assert rel(K.block(layer).to_dense(), ref) < 1e-10
    # the reference is independent of hesse's products too
    dense = hesse.testing.dense_ggn(model, loss_fn, data)
    n0 = sum(p.numel() for p in model[0].parameters())
    assert rel(K.block("0").to_dense(), dense[:n0, :n0]) < 1e-10


def test_single_location_conv_and_single_index_embedding_exact():
    g = _gen(2)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)).to(DT)
    data = (
        torch.randn(1, 2, 3, 3, generator=g, dtype=DT),
        torch.randn(1, 2, generator=g, dtype=DT),
    )
    K, G = KFACOperator(conv, nn.MSELoss(), data), GGNOperator(conv, nn.MSELoss(), data)
    assert rel(K.block("0").to_dense(), G.block("0").to_dense()) < 1e-10
    emb = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(3, 4)).to(DT)
    data = (torch.tensor([[4]]), torch.tensor([2]))
    K, G = (
        KFACOperator(emb, nn.CrossEntropyLoss(), data),
        GGNOperator(emb, nn.CrossEntropyLoss(), data),
    )
    assert rel(K.block("0").to_dense(), G.block("0").to_dense()) < 1e-10


def _reference_batch_block(model, loss_fn, X, y):
    """Dense K-FAC block of layer 0 from per-sample Jacobians (torch.func), independent code."""
    lin0, rest = model[0], model[1:]
    N = X.shape[0]
    a = torch.cat([X, torch.ones(N, 1, dtype=DT)], dim=1)
    A = a.T @ a / N
    s = lin0(X).detach()
    G = torch.zeros(s.shape[1], s.shape[1], dtype=DT)
    for n in range(N):
        J = torch.func.jacrev(rest)(s[n])  # (C, h)
        f = rest(s[n]).detach()
        H = torch.func.hessian(lambda f_, n=n: loss_fn(f_.unsqueeze(0), y[n : n + 1]))(f)
        G += J.T @ H @ J / N  # mean reduction: loss_n enters with 1/N
    K = torch.kron(G, A)  # row-major [W | b]
    out, inp = lin0.weight.shape
    perm = [i * (inp + 1) + j for i in range(out) for j in range(inp)] + [
        i * (inp + 1) + inp for i in range(out)
    ]
    return K[perm][:, perm]


def test_batch_factors_match_independent_reference_and_error_is_documented():
    g = _gen(3)
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    X = torch.randn(6, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    data = [(X[:4], y[:4]), (X[4:], y[4:])]  # unequal batches: exact mean weighting
    K = KFACOperator(model, loss_fn, data)
    ref = _reference_batch_block(model, loss_fn, X, y)
    assert rel(K.block("0").to_dense(), ref) < 1e-10
    # vs the exact GGN the batch approximation error is real but bounded (documented)
    ggn = GGNOperator(model, loss_fn, data).block("0").to_dense()
    err = rel(K.block("0").to_dense(), ggn)
    assert 1e-6 < err < 1.0


def test_empirical_single_sample_equals_empirical_fisher_block():
    g = _gen(4)
    model = _mlp()
    data = (torch.randn(1, 4, generator=g, dtype=DT), torch.tensor([1]))
    K = KFACOperator(model, nn.CrossEntropyLoss(), data, fisher="empirical")
    F = FisherOperator(model, nn.CrossEntropyLoss(), data, kind="empirical")
    for layer in ("0", "2"):
        assert rel(K.block(layer).to_dense(), F.block(layer).to_dense()) < 1e-10


@pytest.mark.montecarlo
def test_mc_fisher_factors_are_unbiased():
    g = _gen(5)
    model = _mlp()
    X = torch.randn(6, 4, generator=g, dtype=DT)
    data = (X, torch.randint(0, 3, (6,), generator=g))
    exact = KFACOperator(model, nn.CrossEntropyLoss(), data).factors
    gen = _gen(6)
    runs = [
        KFACOperator(
            model, nn.CrossEntropyLoss(), data, fisher="mc", num_samples=40, generator=gen
        ).factors
        for _ in range(10)
    ]
    for name in exact:
        assert torch.allclose(runs[0][name][0], exact[name][0])  # A does not depend on sampling
        Gs = torch.stack([r[name][1] for r in runs])
        mean, se = Gs.mean(0), Gs.std(0) / len(runs) ** 0.5
        assert bool(((mean - exact[name][1]).abs() <= 4 * se + 1e-12).all())
        assert rel(mean, exact[name][1]) < 0.2


def test_operator_conformance_and_inverse():
    g = _gen(7)
    model = _mlp()
    data = (torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
    K = KFACOperator(model, nn.MSELoss(), data, weight_decay=0.1)
    check_operator(K)
    D = K.to_dense()
    n = D.shape[0]
    # block diagonal: no coupling between layers
    n0 = sum(p.numel() for p in model[0].parameters())
    assert float(D[:n0, n0:].abs().max()) == 0.0
    lam = 0.05
    Kinv = K.inverse(lam).to_dense()
    assert rel(Kinv, torch.linalg.inv(D + lam * torch.eye(n, dtype=DT))) < 1e-10


@pytest.mark.parametrize(
    "k, d, p, s", [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 2), (2, 1), (0, 2), (2, 3))]
)
def test_conv_patches_match_unfold(k, d, p, s):
    from hesse.operators.kfac import conv_patches

    x = torch.randn(3, 2, 9, 11, generator=_gen(16), dtype=DT)
    cols = torch.nn.functional.unfold(x, k, d, p, s)
    assert torch.equal(conv_patches(x, k, d, p, s), cols.transpose(1, 2).reshape(-1, cols.shape[1]))


def test_conv_model_operator_runs_and_is_psd():
    g = _gen(8)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    ).to(DT)
    data = (torch.randn(5, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g))
    check_operator(KFACOperator(model, nn.CrossEntropyLoss(), data))


def test_unsupported_layer_policy():
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(DT)
    data = (torch.randn(3, 4, dtype=DT), torch.randn(3, 3, dtype=DT))
    with pytest.raises(NotImplementedError, match=r"'1\.weight'.*'1'.*LayerNorm.*first_order"):
        KFACOperator(model, nn.MSELoss(), data, unsupported="raise")
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        KFACPreconditioner(model, nn.MSELoss(), unsupported="raise")
    hesse._checks._warned.clear()
    with pytest.warns(UserWarning, match=r"2 parameter\(s\).*first-order.*1\.weight, 1\.bias"):
        K = KFACOperator(model, nn.MSELoss(), data)  # the default
    assert K.skipped == ["1.weight", "1.bias"]
    sl = K.param_slices()["1.weight"]
    assert float(K.to_dense()[sl].abs().max()) == 0.0  # zero block, documented
    # preconditioner: the unfactored parameters keep their plain gradient
    for policy in ("first_order", "skip"):
        loss_fn = nn.MSELoss()
        pre = KFACPreconditioner(model, loss_fn, unsupported=policy, fisher="exact")
        model.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        plain = [p.grad.clone() for p in model[1].parameters()]
        lin = model[0].weight.grad.clone()
        pre.step()
        pre.remove()
        for p, g0 in zip(model[1].parameters(), plain):
            assert torch.equal(p.grad, g0)
        assert not torch.allclose(model[0].weight.grad, lin)
    with pytest.raises(ValueError, match="unsupported"):
        KFACOperator(model, nn.MSELoss(), data, unsupported="ignore")


# -- preconditioner -------------------------------------------------------------------
def _dense_kfac_solve(model, loss_fn, data, damping, grads):
    D = KFACOperator(model, loss_fn, data).to_dense()
    n = D.shape[0]
    return torch.linalg.solve(D + damping * torch.eye(n, dtype=DT), grads)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss()], ids=["mse", "ce"])
def test_preconditioner_tikhonov_equals_dense_solve(loss_fn):
    g = _gen(9)
    model = _mlp()
    X = torch.randn(7, 4, generator=g, dtype=DT)
    y = _targets(loss_fn, 7, 3, g)
    pre = KFACPreconditioner(model, loss_fn, fisher="exact", damping=0.03)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    pre.step()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = _dense_kfac_solve(model, loss_fn, (X, y), 0.03, grads)
    assert rel(got, want) < 1e-9


def test_preconditioner_factored_damping_formula():
    g = _gen(10)
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)
    pre = KFACPreconditioner(
        model, nn.MSELoss(), fisher="exact", damping=0.1, damping_mode="factored"
    )
    nn.MSELoss()(model(X), y).backward()
    Gm = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
    pre.step()
    A, G = KFACOperator(model, nn.MSELoss(), (X, y)).factors["0"]
    pi = ((torch.trace(A) / 4) / (torch.trace(G) / 2)).sqrt()
    Ad = A + pi * 0.1**0.5 * torch.eye(4, dtype=DT)
    Gd = G + 0.1**0.5 / pi * torch.eye(2, dtype=DT)
    want = torch.linalg.solve(Gd, Gm) @ torch.linalg.inv(Ad)
    got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)
    assert rel(got, want) < 1e-10


def _mse_batches(g, count, rows):
    """``count`` regression batches ``(X (rows, 4), Y (rows, 3))`` for :func:`_mlp`."""
    return [
        (torch.randn(rows, 4, generator=g, dtype=DT), torch.randn(rows, 3, generator=g, dtype=DT))
        for _ in range(count)
    ]


def test_running_average_intervals_and_kl_clip():
    g = _gen(11)
    model = _mlp()
    loss_fn = nn.MSELoss()
    batches = _mse_batches(g, 3, 5)
    pre = KFACPreconditioner(
        model,
        loss_fn,
        fisher="exact",
        factor_decay=0.8,
        factor_update_interval=2,
        inverse_update_interval=1,
    )
    for X, y in batches:
        model.zero_grad()
        loss_fn(model(X), y).backward()
        pre.step()
    f0 = KFACOperator(model, loss_fn, batches[0]).factors["0"]
    f2 = KFACOperator(model, loss_fn, batches[2]).factors["0"]
    A, G = pre.factors[0]
    # steps 0 and 2 record (interval 2); model parameters never changed
    assert rel(A, 0.8 * f0[0] + 0.2 * f2[0]) < 1e-12
    assert rel(G, 0.8 * f0[1] + 0.2 * f2[1]) < 1e-12

    # KL clipping: the quadratic KL estimate lr^2 nu^2 <D, g> is capped at kl_clip
    def direction(kl_clip):
        pre2 = KFACPreconditioner(model, loss_fn, fisher="exact", kl_clip=kl_clip, lr=0.5)
        model.zero_grad()
        loss_fn(model(batches[0][0]), batches[0][1]).backward()
        g0 = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        nu = pre2.step()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g0, nu

    D, g0, nu_none = direction(None)
    d, _, nu = direction(1e-6)
    assert nu_none is None and float(nu) < 1.0
    assert rel(d, float(nu) * D) < 1e-12
    assert float(0.25 * float(nu) ** 2 * (D @ g0)) == pytest.approx(1e-6, rel=1e-8)
    _, _, nu_big = direction(1e6)
    assert float(nu_big) == 1.0


def test_basis_update_interval_keeps_the_basis_and_refreshes_eigenvalues():
    g = _gen(12)
    model = _mlp()
    loss_fn = nn.MSELoss()
    batches = _mse_batches(g, 4, 6)
    pre = KFACPreconditioner(
        model, loss_fn, fisher="exact", damping=0.05, factor_decay=0.5, basis_update_interval=3
    )
    pre.inverse_update_interval = 1
    bases = []
    for X, y in batches:
        model.zero_grad()
        loss_fn(model(X), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model[0].parameters()])
        pre.step()
        QL, dL, QR, dR = pre._eig[0]
        bases.append((QL.clone(), QR.clone()))
        # independently: the running factors, diagonalised in the kept basis
        A, G = pre.factors[0]
        dG = torch.diagonal(QL.T @ G @ QL).clamp_min(0)
        dA = torch.diagonal(QR.T @ A @ QR).clamp_min(0)
        assert rel(dL, dG) < 1e-12 and rel(dR, dA) < 1e-12
        P = torch.kron(QL, QR)  # row-major vec of the (out, in + 1) weight matrix
        K = P @ torch.diag(torch.kron(dG, dA)) @ P.T + 0.05 * torch.eye(P.shape[0], dtype=DT)
        W = model[0].weight
        gm = torch.cat([grads[: W.numel()].reshape(W.shape), grads[W.numel() :, None]], 1)
        want = torch.linalg.solve(K, gm.reshape(-1)).reshape(gm.shape)
        got = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        assert rel(got, want) < 1e-9
    # full eigendecompositions at inverse updates 0 and 3; the basis kept at 1 and 2
    assert all(torch.equal(bases[i][0], bases[0][0]) for i in (1, 2))
    assert not torch.allclose(bases[3][0].abs(), bases[0][0].abs(), atol=1e-6)
    # with a full update the eigenvalues are exact: Q diag(d) Q^T is the factor
    QL, dL, _, _ = pre._eig[0]
    assert rel((QL * dL) @ QL.T, pre.factors[0][1]) < 1e-10


def test_preconditioner_under_torch_optimizer_mc_trains():
    g = _gen(12)
    model = _mlp(c=2)
    X = torch.randn(64, 4, generator=g, dtype=DT)
    y = torch.tanh(X[:, :2] * 2)
    loss_fn = nn.MSELoss()
    pre = KFACPreconditioner(model, loss_fn, damping=1e-2, kl_clip=1e-2, lr=0.2, generator=_gen(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    with torch.no_grad():  # not recorded by the preconditioner
        first = float(loss_fn(model(X), y))
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        pre.step()
        opt.step()
    assert float(loss.detach()) < 0.05 * first
    pre.remove()
    assert not model[0]._forward_hooks


# -- optimizer database ---------------------------------------------------------------
def _problem(dtype=DT):
    g = _gen(13)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    X = torch.randn(50, 3, generator=g).to(dtype)
    y = torch.sin(X[:, :2])
    return model, nn.MSELoss(), X, y


def _run(opt, model, loss_fn, X, y, steps):
    losses = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


@pytest.mark.parametrize("fisher", ["mc", "exact", "empirical"])
def test_kfac_converges(fisher):
    model, loss_fn, X, y = _problem()
    opt = KFAC(
        model,
        loss_fn,
        lr=0.5,
        momentum=0.5,
        damping=1e-2,
        fisher=fisher,
        inverse_update_interval=2,
        generator=_gen(0),
    )
    losses = _run(opt, model, loss_fn, X, y, 60)
    assert min(losses) < 0.05 * losses[0]
    assert losses[-1] < 0.1 * losses[0]


def test_kfac_on_linear_least_squares_reaches_the_minimum():
    # one Linear layer + MSE: K-FAC with exact Fisher is the Gauss-Newton step; lr=1 solves it
    g = _gen(14)
    model = nn.Linear(3, 1).to(DT)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.3
    loss_fn = nn.MSELoss()
    opt = KFAC(
        model,
        loss_fn,
        lr=1.0,
        momentum=0.0,
        damping=1e-10,
        kl_clip=None,
        fisher="exact",
        factor_decay=0.0,
    )
    _run(opt, model, loss_fn, X, y, 2)
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]], dtype=DT), atol=1e-7)
    assert float(model.bias.detach()) == pytest.approx(0.3, abs=1e-7)


def _least_squares(seed=14):
    g = _gen(seed)
    model = nn.Linear(3, 2).to(DT)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = X @ torch.randn(3, 2, generator=g, dtype=DT) + 0.3
    return model, X, y


@pytest.mark.parametrize("lr, direction", [(1.0, "down"), (3.0, "none")])
def test_adaptive_damping_levenberg_marquardt_on_a_quadratic(lr, direction):
    # one Linear layer + MSE with the exact Fisher: the loss is quadratic and K-FAC is its
    # exact curvature, so the reduction ratio is known in closed form. With
    # delta = -lr (K + lam I)^{-1} g: lr = 1 gives rho = 1 + lam |delta|^2 / (2 |model|) > 1
    # (damping shrinks by omega = (20/19)^T per check); lr = 3 overshoots so far that the
    # model itself predicts an increase: no evidence, the damping stays.
    model, X, y = _least_squares()
    loss_fn = nn.MSELoss()
    T, lam0 = 2, 1e-2
    opt = KFAC(model, loss_fn, lr=lr, momentum=0.0, damping=lam0, kl_clip=None,
               fisher="exact", factor_decay=0.0, inverse_update_interval=1,
               adapt_damping=T)  # fmt: skip
    omega = (20 / 19) ** T
    for step in range(6):
        w = [p.detach().clone() for p in model.parameters()]
        lam = opt.param_groups[0]["damping"]
        opt.zero_grad()
        before = loss_fn(model(X), y)
        before.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        if step % T:
            assert opt.param_groups[0]["damping"] == lam  # checked every T steps only
            continue
        with torch.no_grad():
            after = loss_fn(model(X), y)
            before = before.detach()
        delta = torch.cat([(p - q).reshape(-1) for p, q in zip(model.parameters(), w)])
        # closed form of the quadratic model: the Hessian of this loss, by autograd
        H = torch.autograd.functional.hessian(
            lambda v: loss_fn(torch.func.functional_call(model, {
                "weight": v[:6].reshape(2, 3), "bias": v[6:]}, (X,)), y),
            torch.cat([q.reshape(-1) for q in w]),
        )  # fmt: skip
        m = g @ delta + 0.5 * (delta @ H @ delta + lam * delta @ delta)
        if not m < 0:  # a model that predicts no decrease gives no evidence: no change
            assert opt.last_rho is None and opt.param_groups[0]["damping"] == lam
            continue
        rho = float((after - before) / m)
        assert opt.last_rho == pytest.approx(rho, rel=1e-8)
        if direction == "down":
            assert opt.last_rho > 1.0
            assert opt.param_groups[0]["damping"] == pytest.approx(lam / omega, rel=1e-12)
        else:
            raise AssertionError(f"lr={lr}: the model predicted a decrease, rho={rho}")


def test_adaptive_damping_grows_when_the_loss_rises_against_the_model():
    # a Gauss-Newton step with almost no damping on a tanh MLP overshoots: the quadratic
    # model predicts a decrease, the loss rises, rho < 0 < 1/4 and the damping grows by omega
    model = _mlp()
    g = _gen(3)
    X, y = torch.randn(30, 4, generator=g, dtype=DT), torch.randn(30, 3, generator=g, dtype=DT)
    loss_fn = nn.MSELoss()
    opt = KFAC(model, loss_fn, lr=1.0, momentum=0.0, damping=1e-4, kl_clip=None,
               fisher="exact", factor_decay=0.0, adapt_damping=1)  # fmt: skip
    opt.zero_grad()
    before = loss_fn(model(X), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss_fn(model(X), y) > before
    assert opt.last_rho is not None and opt.last_rho < 0
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-4 * 20 / 19, rel=1e-12)


def test_adaptive_damping_keeps_its_range_and_round_trips():
    model, X, y = _least_squares()
    loss_fn = nn.MSELoss()
    kw = dict(lr=1.0, momentum=0.0, damping=1.02e-8, kl_clip=None, fisher="exact",
              factor_decay=0.0, adapt_damping=1)  # fmt: skip
    opt = KFAC(model, loss_fn, **kw)
    _run(opt, model, loss_fn, X, y, 1)  # rho > 3/4: 1.02e-8 / omega, clamped
    assert opt.param_groups[0]["damping"] == hesse.optim.kfac.MIN_DAMPING
    # the adapted damping is optimizer state: a resumed run continues identically
    model2 = copy.deepcopy(model)
    opt2 = KFAC(model2, loss_fn, **{**kw, "damping": 1.0})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    _run(opt, model, loss_fn, X, y, 2)
    _run(opt2, model2, loss_fn, X, y, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_adaptive_damping_without_the_loss_call_warns_and_keeps_damping():
    model, X, y = _least_squares()
    opt = KFAC(model, nn.MSELoss(), damping=1e-2, adapt_damping=1, generator=_gen(0))
    hesse._checks._warned -= {m for m in hesse._checks._warned if "damping fixed" in m}
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), y).backward()  # not through loss_fn
    with pytest.warns(UserWarning, match="keeps the damping fixed"):
        opt.step()
    assert opt.param_groups[0]["damping"] == 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kfac_keeps_dtype(dtype):
    model, loss_fn, X, y = _problem(dtype)
    opt = KFAC(model, loss_fn, generator=_gen(0))
    _run(opt, model, loss_fn, X, y, 3)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_state_dict_resume_bit_identical():
    model, loss_fn, X, y = _problem()
    opt = KFAC(model, loss_fn, generator=_gen(0), inverse_update_interval=3)
    _run(opt, model, loss_fn, X, y, 4)
    model2 = copy.deepcopy(model)
    opt2 = KFAC(model2, loss_fn, generator=_gen(99), inverse_update_interval=3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    _run(opt, model, loss_fn, X, y, 5)
    _run(opt2, model2, loss_fn, X, y, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(damping=0.0), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(fisher="true"), "fisher"),
        (dict(damping_mode="levenberg"), "damping_mode"),
        (dict(factor_decay=1.5), "factor_decay"),
        (dict(inverse_update_interval=0), "inverse_update_interval"),
        (dict(kl_clip=-1.0), "kl_clip"),
        (dict(adapt_damping=0), "adapt_damping"),
    ],
)
def test_kfac_rejects_bad_hyperparameters(kwargs, match):
    model, loss_fn, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        KFAC(model, loss_fn, **kwargs)


def test_kfac_rejects_non_likelihood_loss():
    model, _, _, _ = _problem()
    with pytest.raises(NotImplementedError, match="likelihood"):
        KFAC(model, nn.L1Loss())


def test_kfac_trains_cnn_and_embedding_models_in_float32():
    g = _gen(15)
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    X = torch.randn(48, 1, 8, 8, generator=g)
    y = (X[:, 0, :4].mean((1, 2)) > 0).long() + (X[:, 0, 4:].mean((1, 2)) > 0).long()
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    T = torch.randint(0, 10, (48, 3), generator=g)
    yt = T[:, 0] % 3
    for model, inputs, targets in [(cnn, X, y), (emb, T, yt)]:
        loss_fn = nn.CrossEntropyLoss()
        opt = KFAC(
            model,
            loss_fn,
            lr=0.3,
            momentum=0.5,
            damping=1e-2,
            inverse_update_interval=2,
            generator=_gen(0),
        )
        losses = _run(opt, model, loss_fn, inputs, targets, 25)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert min(losses) < 0.5 * losses[0]


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_preconditioner_factors_equal_operator_factors(fisher):
    g = _gen(17)
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    X, y = torch.randn(7, 4, generator=g, dtype=DT), torch.randint(0, 3, (7,), generator=g)
    pre = KFACPreconditioner(model, loss_fn, fisher=fisher)
    loss_fn(model(X), y).backward()
    pre.step()
    ref = KFACOperator(model, loss_fn, (X, y), fisher=fisher).factors
    for layer, (A, G) in zip(pre.layers, pre.factors):
        assert rel(A, ref[layer.name][0]) < 1e-12
        assert rel(G, ref[layer.name][1]) < 1e-12


def test_non_finite_factors_raise_nonfinite_error():
    model = _mlp()
    pre = KFACPreconditioner(model, nn.MSELoss(), fisher="exact")
    X = torch.randn(4, 4, dtype=DT)
    X[0, 0] = float("nan")
    nn.MSELoss()(model(X), torch.zeros(4, 3, dtype=DT)).backward()
    with pytest.raises(hesse.NonFiniteError, match="K-FAC"):
        pre.step()
