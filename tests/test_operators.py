"""Curvature operators against independently derived dense float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.testing import check_operator, dense_ggn, dense_hessian
from hesse.testing.checks import concat_data
from tests.cases import CASE_IDS, CASES

# -- every case x every operator vs the dense truth ------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hessian_matches_dense(case, mode):
    model, loss_fn, data = case.build()
    if mode == "fwd-rev" and case.name.startswith("layernorm"):
        with pytest.raises(NotImplementedError, match="LayerNorm"):
            hesse.HessianOperator(model, loss_fn, data, mode=mode)
        return
    H = hesse.HessianOperator(model, loss_fn, data, mode=mode)
    check_operator(H, dense_hessian(model, loss_fn, data))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ggn_matches_linearised_model_hessian(case):
    model, loss_fn, data = case.build()
    G = hesse.GGNOperator(model, loss_fn, data)
    check_operator(G, dense_ggn(model, loss_fn, data))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_exact_fisher_equals_ggn_for_likelihood_losses(case):
    model, loss_fn, data = case.build()
    F = hesse.FisherOperator(model, loss_fn, data, kind="exact")
    check_operator(F, dense_ggn(model, loss_fn, data))


def _per_sample_grads(model, loss_fn, data):
    """Per-sample gradients of the unreduced loss by vmap(grad) (an independent path)."""
    X, y = concat_data(data)
    params = {k: v.detach() for k, v in model.named_parameters()}
    unreduced = type(loss_fn)(reduction="sum")

    def one(p, x, t):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return unreduced(out, t.unsqueeze(0))

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[k].reshape(X.shape[0], -1) for k in params], dim=1), X, y


@pytest.mark.parametrize("name", ["mlp_ce_mean", "mlp_mse_mean", "mlp_bce_mean", "mlp_ce_sum"])
def test_empirical_fisher_matches_per_sample_outer_products(name):
    case = next(c for c in CASES if c.name == name)
    model, loss_fn, data = case.build()
    Gs, X, y = _per_sample_grads(model, loss_fn, data)
    if loss_fn.reduction == "sum":
        scale = 1.0
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        scale = 1.0 / X.shape[0]
    else:  # MSE/BCE mean divide by every element
        scale = 1.0 / y.numel()
    F = hesse.FisherOperator(model, loss_fn, data, kind="empirical")
    check_operator(F, scale * Gs.T @ Gs)


@pytest.mark.montecarlo
@pytest.mark.parametrize("name", ["mlp_ce_mean", "mlp_mse_sum", "mlp_bce_mean"])
def test_mc_fisher_converges_to_exact(name):
    case = next(c for c in CASES if c.name == name)
    model, loss_fn, data = case.build()
    exact = hesse.FisherOperator(model, loss_fn, data).to_dense()
    errs = []
    for S in (100, 10_000):
        g = torch.Generator().manual_seed(0)
        mc = hesse.FisherOperator(model, loss_fn, data, kind="mc", num_samples=S, generator=g)
        D = mc.to_dense()
        assert torch.allclose(D, D.T, atol=1e-12)
        errs.append(float((D - exact).norm() / exact.norm()))
    # Monte-Carlo error falls like 1/sqrt(S): 100x the samples, ~10x smaller error.
    assert errs[1] < 0.02
    assert errs[1] < errs[0] / 3


# -- closed forms ------------------------------------------------------------------------------


def test_linear_regression_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    H = hesse.HessianOperator(model, nn.MSELoss(), [(X[:13], y[:13]), (X[13:], y[13:])])
    Xa = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], dim=1)  # weight then bias
    torch.testing.assert_close(H.to_dense(), 2 * Xa.T @ Xa / 20, rtol=1e-12, atol=1e-12)
    # 0.5 * MSE gives H = X^T X / N (the textbook form), via a scaled loss callable
    half = hesse.HessianOperator(
        model, lambda o, t: 0.5 * nn.functional.mse_loss(o, t), (X, y), reduction="mean"
    )
    torch.testing.assert_close(half.to_dense(), Xa.T @ Xa / 20, rtol=1e-12, atol=1e-12)


def test_plain_function_hessian_closed_forms():
    x = torch.tensor([1.0, 0.0], dtype=torch.float64)
    H = hesse.hessian_of(lambda w: w[0] ** 3 - w[1] ** 2, x)
    torch.testing.assert_close(H.to_dense(), torch.diag(torch.tensor([6.0, -2.0]).double()))
    torch.testing.assert_close(H.gradient, torch.tensor([3.0, 0.0], dtype=torch.float64))
    check_operator(H)

    g = torch.Generator().manual_seed(1)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M + M.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    Q = hesse.hessian_of(lambda w: 0.5 * w @ A @ w + b @ w, torch.randn(6, dtype=torch.float64))
    check_operator(Q, A)


def test_hessian_of_matrix_shaped_input():
    W = torch.randn(2, 3, dtype=torch.float64)
    H = hesse.hessian_of(lambda w: (w**2).sum() * 1.5, W)
    torch.testing.assert_close(H.to_dense(), 3.0 * torch.eye(6, dtype=torch.float64))


# -- normalisation, regularisers, subsets, blocks ------------------------------------------------


@pytest.mark.parametrize("name", ["mlp_ce_mean", "mlp_mse_mean"])
def test_unequal_batches_give_the_global_mean_not_mean_of_means(name):
    case = next(c for c in CASES if c.name == name)
    model, loss_fn, data = case.build()
    split = hesse.HessianOperator(model, loss_fn, data).to_dense()
    whole = hesse.HessianOperator(model, loss_fn, concat_data(data)).to_dense()
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
    mean_of_means = sum(hesse.HessianOperator(model, loss_fn, b).to_dense() for b in data) / 2
    assert not torch.allclose(split, mean_of_means, rtol=1e-3)


def test_dataloader_with_ragged_last_batch():
    model, loss_fn, data = CASES[0].build()
    X, y = concat_data(data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    H = hesse.HessianOperator(model, loss_fn, loader)
    assert H.objective.N == 11 and H.objective.num_batches == 3
    check_operator(H, dense_hessian(model, loss_fn, data))


def test_weight_decay_and_regulariser():
    model, loss_fn, data = CASES[0].build()
    D = dense_hessian(model, loss_fn, data)
    n = D.shape[0]
    H = hesse.HessianOperator(model, loss_fn, data, weight_decay=0.3)
    check_operator(H, D + 0.3 * torch.eye(n, dtype=torch.float64))

    def quartic(p):
        return sum((t**4).sum() for t in p.values()) / 4

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = hesse.HessianOperator(model, loss_fn, data, regularizer=quartic)
    check_operator(H, D + torch.diag(3 * theta**2))
    G = hesse.GGNOperator(model, loss_fn, data, weight_decay=0.1, regularizer=quartic)
    check_operator(G, dense_ggn(model, loss_fn, data) + torch.diag(3 * theta**2 + 0.1))
    loss, grad = H.objective.value_and_grad()
    assert torch.isfinite(loss) and grad.shape == (n,)


def test_parameter_subsets_by_name_prefix_and_module():
    model, loss_fn, data = CASES[0].build()
    D = dense_hessian(model, loss_fn, data)
    # layer "2" = the last Linear: its parameters are the last 4*3 + 3 entries
    tail = slice(D.shape[0] - 15, D.shape[0])
    for sel in (["2"], ["2.weight", "2.bias"], model[2], [model[2]]):
        H = hesse.HessianOperator(model, loss_fn, data, params=sel)
        check_operator(H, D[tail, tail])
    H = hesse.HessianOperator(model, loss_fn, data, params=["2.bias", "0.bias"])
    assert H.param_names == ["0.bias", "2.bias"]  # model order, whatever the request order


def test_blocks_including_off_diagonal():
    model, loss_fn, data = CASES[0].build()
    H = hesse.HessianOperator(model, loss_fn, data)
    D = dense_hessian(model, loss_fn, data)
    sl = H.param_slices()
    first = torch.arange(sl["0.weight"].start, sl["0.bias"].stop)
    last = torch.arange(sl["2.weight"].start, sl["2.bias"].stop)
    off = H.block("0", "2")
    assert off.shape == (first.numel(), last.numel()) and not off.symmetric
    check_operator(off, D[first][:, last])
    blocks = H.layer_blocks()
    assert list(blocks) == ["0", "2"]
    check_operator(blocks["2"], D[last][:, last])


def test_cache_is_rebuilt_when_parameters_change_in_place():
    model, loss_fn, data = CASES[0].build()
    for Op in (hesse.HessianOperator, hesse.GGNOperator):
        op = Op(model, loss_fn, data)
        v = torch.randn(op.shape[0], dtype=torch.float64)
        before = op @ v
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        after = op @ v
        fresh = Op(model, loss_fn, data) @ v
        torch.testing.assert_close(after, fresh, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(before, after)


def test_no_cache_gives_identical_products_and_one_pass_per_block():
    model, loss_fn, data = CASES[0].build()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for Op in (hesse.HessianOperator, hesse.GGNOperator):
        cached = Op(model, loss_fn, data)
        uncached = Op(model, loss_fn, data, cache_graph=False)
        V = torch.randn(cached.shape[0], 5, dtype=torch.float64)
        calls.clear()
        out = uncached @ V
        assert len(calls) == len(data)  # one forward per batch for all 5 columns
        torch.testing.assert_close(out, cached @ V, rtol=1e-12, atol=1e-12)


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x, z):
            return torch.tanh(self.a(x)) * self.b(z)

    torch.manual_seed(0)
    model = Two().double()
    X, Z = torch.randn(6, 3).double(), torch.randn(6, 2).double()
    y = torch.randn(6, 2).double()
    data = [((X[:4], Z[:4]), y[:4]), ((X[4:], Z[4:]), y[4:])]
    check_operator(
        hesse.HessianOperator(model, nn.MSELoss(), data), dense_hessian(model, nn.MSELoss(), data)
    )


def test_float32_operator_against_float64_truth():
    model, loss_fn, data = CASES[0].build()
    D = dense_hessian(model, loss_fn, data)
    model32 = model.float()
    data32 = [(X.float(), y) for X, y in data]
    H = hesse.HessianOperator(model32, loss_fn, data32)
    assert H.dtype == torch.float32
    check_operator(H, D.float(), rtol=1e-4)


# -- lazy algebra ------------------------------------------------------------------------------


def test_lazy_algebra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = A + A.T
    B = torch.randn(5, 5, generator=g, dtype=torch.float64)
    opA, opB = hesse.DenseOperator(A), hesse.DenseOperator(B)
    assert opA.symmetric and not opB.symmetric
    check_operator(opA + 2.5 * opA.identity(), A + 2.5 * torch.eye(5, dtype=torch.float64))
    check_operator(opA.damped(0.5), A + 0.5 * torch.eye(5, dtype=torch.float64))
    check_operator(opA @ opB, A @ B)
    check_operator(opB.T, B.T)
    check_operator(opA - opB / 2, A - B / 2)
    check_operator(-opB, -B)
    v = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(v @ opB, v @ B)
    d = torch.rand(5, dtype=torch.float64)
    check_operator(hesse.DiagonalOperator(d), torch.diag(d))
    U = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    s = torch.tensor([3.0, 1.0], dtype=torch.float64)
    check_operator(hesse.LowRankOperator(U, s), U @ torch.diag(s) @ U.T)
    assert hesse.aslinearoperator(A).shape == (5, 5)


def test_num_matvecs_counts_columns():
    op = hesse.DenseOperator(torch.eye(4))
    op @ torch.ones(4)
    op @ torch.ones(4, 3)
    assert op.num_matvecs == 4


# -- bad input ---------------------------------------------------------------------------------


def test_bad_vectors():
    model, loss_fn, data = CASES[0].build()
    H = hesse.HessianOperator(model, loss_fn, data)
    n = H.shape[0]
    with pytest.raises(ValueError, match=rf"expected \(n,\) or \(n, k\) with n={n}, got \(3,\)"):
        H @ torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="Dtype mismatch"):
        H @ torch.ones(n, dtype=torch.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        H.matvec([1.0] * n)
    with pytest.raises(ValueError, match="Refusing to materialise"):
        H.to_dense(max_dim=10)


def test_bad_losses_and_params():
    model, _, data = CASES[0].build()
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        hesse.HessianOperator(model, lambda o, t: nn.functional.cross_entropy(o, t), data)
    with pytest.raises(ValueError, match="must be a scalar"):
        hesse.HessianOperator(model, lambda o, t: o.sum(1), data, reduction="sum") @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.float64
        )
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), data, params=["0.weight"])
    with pytest.warns(UserWarning, match="requires_grad=False"):
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert "0.weight" not in H.param_names
    with pytest.raises(ValueError, match="No parameter named 'nope'"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), data, params=["nope"])
    with pytest.raises(NotImplementedError, match="GGNOperator"):
        hesse.FisherOperator(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match="Invalid kind"):
        hesse.FisherOperator(model, nn.CrossEntropyLoss(), data, kind="typo")


def test_non_finite_parameters_raise():
    model, loss_fn, data = CASES[0].build()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(hesse.NonFiniteError, match="Non-finite"):
        H = hesse.HessianOperator(model, loss_fn, data, check_determinism=False)
        H @ torch.ones(H.shape[0], dtype=torch.float64)


def test_bad_data():
    model, loss_fn, data = CASES[0].build()
    with pytest.raises(ValueError, match="data is empty"):
        hesse.HessianOperator(model, loss_fn, [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        hesse.HessianOperator(model, loss_fn, (b for b in data))
    X, y = concat_data(data)
    ds = torch.utils.data.TensorDataset(X, y)
    shuffled = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=True"):
        hesse.HessianOperator(model, loss_fn, shuffled)


def test_dropout_and_batchnorm_policy():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    _, loss_fn, data = CASES[0].build()
    model.train()
    with pytest.warns(UserWarning, match="eval mode"):
        H = hesse.HessianOperator(model, loss_fn, data)
    check_operator(H)  # deterministic in eval mode
    assert model.training  # restored after every product
    with pytest.raises(ValueError, match="allow_dropout=True"):
        hesse.HessianOperator(model, loss_fn, data, train_mode=True)
    model.eval()
    no_drop = nn.Sequential(*[m for m in model if not isinstance(m, nn.Dropout)])
    with pytest.warns(UserWarning, match="BatchNorm in train mode"):
        H = hesse.HessianOperator(no_drop, loss_fn, data, train_mode=True)
    check_operator(H)  # batch statistics: deterministic, but coupled within each batch


def test_random_layer_is_caught():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x) + torch.randn(x.shape[0], 3, dtype=x.dtype)

    _, loss_fn, data = CASES[0].build()
    with pytest.raises(ValueError, match="different outputs"):
        hesse.HessianOperator(Noisy().double(), loss_fn, data)


def test_non_finite_inputs_raise_non_finite_error():
    model, loss_fn, data = CASES[0].build()
    X, y = data[0]
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(hesse.NonFiniteError, match="model outputs"):
        hesse.HessianOperator(model, loss_fn, [(X, y)])
