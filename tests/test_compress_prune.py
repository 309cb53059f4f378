"""Pruning: OBS algebra in closed form, saliency vs brute force, masks, sparsity bookkeeping."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from hesse.compress import (
    compressible_weights,
    curvature_blocks,
    curvature_diagonal,
    obd_saliency,
    obs_single_update,
    prune,
    sparsity_of,
)
from hesse.compress.saliency import (
    layer_obs_saliency,
    masked_inverse,
    obs_group_saliency,
    obs_masked_update,
)
from hesse.testing import dense_ggn, dense_hessian

DT = torch.float64


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=DT)
    return A @ A.T + 0.5 * torch.eye(n, dtype=DT)


def _tiny_classifier(seed: int = 0):
    model, loss_fn, data = _trained_tiny_classifier(seed)
    return copy.deepcopy(model), loss_fn, data


@functools.cache
def _trained_tiny_classifier(seed: int, steps: int = 60):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 6, generator=g, dtype=DT)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y) + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model, loss_fn, [(X[:25], y[:25]), (X[25:], y[25:])]


def _least_squares(seed: int = 0):
    """A linear model at its least-squares optimum: the loss is exactly quadratic."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 5, generator=g, dtype=DT)
    X[:, 1] += 0.8 * X[:, 0]  # correlated inputs, so that OBS compensation matters
    Y = torch.randn(30, 2, generator=g, dtype=DT)
    model = nn.Linear(5, 2, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    return model, nn.MSELoss(reduction="sum"), (X, Y)


# -- closed forms of the OBS algebra -----------------------------------------------------------


def test_obs_single_update_on_a_quadratic():
    H = _spd(7)
    w = torch.randn(7, dtype=DT, generator=torch.Generator().manual_seed(1))
    Hinv = torch.linalg.inv(H)
    for q in range(7):
        s, d = obs_single_update(w, Hinv, q)
        assert abs(float((w + d)[q])) < 1e-12
        cost = 0.5 * d @ H @ d
        torch.testing.assert_close(s, cost, rtol=1e-10, atol=0)
        # optimality: the KKT system of min 0.5 d^T H d s.t. d_q = -w_q
        K = torch.zeros(8, 8, dtype=DT)
        K[:7, :7], K[7, q], K[q, 7] = H, 1.0, 1.0
        rhs = torch.zeros(8, dtype=DT)
        rhs[7] = -w[q]
        torch.testing.assert_close(torch.linalg.solve(K, rhs)[:7], d, rtol=1e-9, atol=1e-12)


def test_masked_update_matches_multi_weight_obs_formula():
    H = _spd(9, seed=3)
    w = torch.randn(9, dtype=DT, generator=torch.Generator().manual_seed(2))
    Q = torch.tensor([1, 4, 7])
    Hinv = torch.linalg.inv(H)
    closed = -Hinv[:, Q] @ torch.linalg.solve(Hinv[Q][:, Q], w[Q])
    mask = torch.ones(9, dtype=torch.bool)
    mask[Q] = False
    new = obs_masked_update(w.unsqueeze(0), H.unsqueeze(0), mask.unsqueeze(0))[0]
    torch.testing.assert_close(new, w + closed, rtol=1e-9, atol=1e-12)
    assert bool((new[Q] == 0).all())


def test_masked_inverse_is_inverse_of_the_free_block():
    H = _spd(6, seed=4)
    mask = torch.tensor([True, False, True, True, False, True])
    F = mask.nonzero().squeeze(1)
    Ainv = masked_inverse(H.unsqueeze(0), mask.unsqueeze(0))[0]
    torch.testing.assert_close(Ainv[F][:, F], torch.linalg.inv(H[F][:, F]), rtol=1e-9, atol=1e-12)


def test_group_saliency_closed_form():
    H = _spd(8, seed=5)
    w = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(6))
    Hinv = torch.linalg.inv(H)
    sal = obs_group_saliency(w.unsqueeze(0), Hinv.unsqueeze(0), 4)[0]
    for j in range(2):
        Q = torch.arange(4 * j, 4 * j + 4)
        # the group's cost equals the minimum of 0.5 d^T H d with d_Q = -w_Q
        d = -Hinv[:, Q] @ torch.linalg.solve(Hinv[Q][:, Q], w[Q])
        torch.testing.assert_close(sal[j], 0.5 * d @ H @ d, rtol=1e-10, atol=0)


# -- curvature of weights vs independent dense references ---------------------------------------


def test_ggn_blocks_and_diagonal_match_dense_ggn():
    model, loss_fn, data = _tiny_classifier()
    G = dense_ggn(model, loss_fn, data, params=["0.weight", "2.weight"])
    whole = curvature_blocks(model, loss_fn, data, block_size=None, chunk_size=7)
    torch.testing.assert_close(whole["0.weight"][0], G[:48, :48], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(whole["2.weight"][0], G[48:, 48:], rtol=1e-8, atol=1e-12)
    rows = curvature_blocks(model, loss_fn, data, block_size=12)  # two rows of 6
    assert rows["0.weight"].shape == (4, 12, 12)
    torch.testing.assert_close(rows["0.weight"][2], G[24:36, 24:36], rtol=1e-8, atol=1e-12)
    diag = curvature_diagonal(model, loss_fn, data)
    torch.testing.assert_close(diag["2.weight"].reshape(-1), G.diagonal()[48:], rtol=1e-8, atol=0)


def test_fisher_blocks_match_per_sample_gradients():
    model, loss_fn, data = _tiny_classifier()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    gs = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(X[i : i + 1]), y[i : i + 1]).backward()
        gs.append(model[2].weight.grad.reshape(-1).clone())
    G = torch.stack(gs)
    F = G.T @ G / len(y)
    blocks = curvature_blocks(model, loss_fn, data, curvature="fisher", block_size=None)
    torch.testing.assert_close(blocks["2.weight"][0], F, rtol=1e-8, atol=1e-14)


def test_obd_hessian_diagonal_matches_dense_hessian():
    model, loss_fn, data = _tiny_classifier()
    H = dense_hessian(model, loss_fn, data, params=["2.weight"])
    sal = obd_saliency(model, loss_fn, data, curvature="hessian", layers=["2"])
    w = model[2].weight.detach().reshape(-1)
    torch.testing.assert_close(sal["2.weight"].reshape(-1), 0.5 * H.diagonal() * w**2)


# -- saliency vs brute force ---------------------------------------------------------------------


def test_obs_saliency_equals_quadratic_model_increase_on_a_tiny_model():
    """The target check: 0.5 d^T (G + lambda I) d == w_q^2 / (2 [H^-1]_qq) to 1e-6 relative."""
    model, loss_fn, data = _tiny_classifier()
    damping = 1e-3
    G = dense_ggn(model, loss_fn, data, params=["0.weight"])
    H = G + damping * G.diagonal().mean() * torch.eye(G.shape[0], dtype=DT)
    blocks = curvature_blocks(model, loss_fn, data, block_size=None, layers=["0"])
    ref = [r for r in compressible_weights(model) if r.name == "0.weight"]
    mask = torch.ones_like(model[0].weight, dtype=torch.bool)
    sal = layer_obs_saliency(ref[0], blocks["0.weight"], mask, damping=damping).reshape(-1)
    w = model[0].weight.detach().reshape(-1)
    Hinv = torch.linalg.inv(H)
    for q in range(0, w.numel(), 5):
        d = -(w[q] / Hinv[q, q]) * Hinv[:, q]  # independent of hesse's update code
        increase = 0.5 * d @ H @ d
        assert abs(float(sal[q] - increase)) <= 1e-6 * abs(float(increase))


def test_obs_saliency_equals_actual_loss_increase_and_brute_force_refit():
    """Exactly quadratic loss at its minimum: saliency == loss increase == best refit."""
    model, loss_fn, (X, Y) = _least_squares()
    base = float(loss_fn(model(X), Y).detach())
    for q in range(10):
        m = copy.deepcopy(model)
        r, c = divmod(q, 5)
        # brute force: refit row r of W with input c removed
        keep = [j for j in range(5) if j != c]
        sol = torch.linalg.lstsq(X[:, keep], Y[:, r : r + 1]).solution.squeeze(1)
        W = model.weight.detach().clone()
        W[r] = 0
        W[r, keep] = sol
        refit = float(loss_fn(X @ W.T, Y)) - base
        # OBS with (almost) no damping on the exact block of this row
        blocks = curvature_blocks(m, loss_fn, (X, Y), block_size=None)
        mask = torch.ones(2, 5, dtype=torch.bool)
        ref = compressible_weights(m)[0]
        sal = layer_obs_saliency(ref, blocks["weight"], mask, damping=1e-12).reshape(-1)
        assert abs(float(sal[q]) - refit) <= 1e-6 * refit


def test_obs_removes_the_weight_with_the_smallest_refit_cost():
    model, loss_fn, (X, Y) = _least_squares(seed=1)
    base = float(loss_fn(model(X), Y).detach())
    costs = []
    for q in range(10):
        r, c = divmod(q, 5)
        keep = [j for j in range(5) if j != c]
        sol = torch.linalg.lstsq(X[:, keep], Y[:, r : r + 1]).solution.squeeze(1)
        W = model.weight.detach().clone()
        W[r] = 0
        W[r, keep] = sol
        costs.append(float(loss_fn(X @ W.T, Y).detach()) - base)
    best = min(range(10), key=costs.__getitem__)
    m = copy.deepcopy(model)
    masks = prune(m, loss_fn, (X, Y), sparsity=0.1, num_steps=1, damping=1e-12)
    removed = (masks["weight"].reshape(-1) == 0).nonzero().squeeze(1).tolist()
    assert removed == [best]
    after = float(loss_fn(m(X), Y).detach()) - base
    assert abs(after - costs[best]) <= 1e-6 * costs[best]


# -- prune(): bookkeeping, masks, persistence ---------------------------------------------------


@pytest.mark.parametrize("method", ["obs", "obd", "magnitude"])
def test_global_and_layer_sparsity_are_exact(method):
    model, loss_fn, data = _tiny_classifier()
    m = copy.deepcopy(model)
    masks = prune(m, loss_fn, data, 0.6, method=method, num_steps=3)
    n = 48 + 24
    assert sum(int((mk == 0).sum()) for mk in masks.values()) == round(0.6 * n)
    assert sparsity_of(m)["global"] == pytest.approx(round(0.6 * n) / n)
    m = copy.deepcopy(model)
    prune(m, loss_fn, data, 0.5, method=method, scope="layer", num_steps=2)
    sp = sparsity_of(m)
    assert sp["0.weight"] == 0.5 and sp["2.weight"] == 0.5


def test_obs_beats_magnitude_and_obd_in_loss():
    model, loss_fn, data = _tiny_classifier()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    losses = {}
    for method in ("obs", "obd", "magnitude"):
        m = copy.deepcopy(model)
        prune(m, loss_fn, data, 0.6, method=method, num_steps=4)
        with torch.no_grad():
            losses[method] = float(loss_fn(m(X), y))
    assert losses["obs"] < losses["obd"] and losses["obs"] < losses["magnitude"]


def test_masks_follow_torch_prune_conventions_and_persist_through_training():
    model, loss_fn, data = _tiny_classifier()
    masks = prune(model, loss_fn, data, 0.5, method="obs", num_steps=2)
    lin = model[0]
    assert hasattr(lin, "weight_orig") and hasattr(lin, "weight_mask")
    assert "0.weight_orig" in dict(model.named_parameters())
    torch.testing.assert_close(lin.weight_mask, masks["0.weight"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = data[0]
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    for name, mod in (("0.weight", model[0]), ("2.weight", model[2])):
        assert bool((mod.weight[masks[name] == 0] == 0).all())
    # pruning further keeps the earlier zeros
    more = prune(model, loss_fn, data, 0.8, method="magnitude")
    for name in masks:
        assert bool((more[name][masks[name] == 0] == 0).all())
    assert sparsity_of(model)["global"] == pytest.approx(round(0.8 * 72) / 72)
    torch.nn.utils.prune.remove(model[0], "weight")
    assert bool((model[0].weight[more["0.weight"] == 0] == 0).all())


@pytest.mark.parametrize("method", ["obs", "obd", "magnitude"])
def test_structured_rows(method):
    model, loss_fn, data = _tiny_classifier()
    masks = prune(model, loss_fn, data, 0.25, method=method, structured="rows", layers=["0"])
    m = masks["0.weight"]
    rows_off = (m == 0).all(1)
    assert int(rows_off.sum()) == 2  # 25% of 8 rows
    assert bool(((m == 0).any(1) == rows_off).all())  # whole rows only


def test_bad_input_messages():
    model, loss_fn, data = _tiny_classifier()
    with pytest.raises(ValueError, match="sparsity"):
        prune(model, loss_fn, data, 1.0)
    with pytest.raises(ValueError, match="method"):
        prune(model, loss_fn, data, 0.5, method="random")
    with pytest.raises(ValueError, match="needs data"):
        prune(model, sparsity=0.5, method="obs")
    with pytest.raises(ValueError, match="structured"):
        prune(model, loss_fn, data, 0.5, structured="cols")
    with pytest.raises(ValueError, match="damping"):
        prune(model, loss_fn, data, 0.5, damping=-1.0)
    with pytest.raises(ValueError, match="No Linear/Conv layer named"):
        prune(model, loss_fn, data, 0.5, layers=["5"])
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        prune(nn.Sequential(nn.Tanh()), sparsity=0.5, method="magnitude")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune("model", sparsity=0.5, method="magnitude")
    with pytest.raises(TypeError, match="unexpected keyword"):
        prune(model, loss_fn, data, 0.5, method="obs", num_probes=3)
    with pytest.raises(ValueError, match="block_size >= one row"):
        prune(model, loss_fn, data, 0.5, structured="rows", block_size=3)


# -- Woodbury form for large layers ---------------------------------------------------------------


def test_woodbury_matches_dense_inverse_and_update():
    from hesse.compress.saliency import woodbury_inverse_diag, woodbury_masked_update

    g = torch.Generator().manual_seed(7)
    U = torch.randn(5, 12, generator=g, dtype=DT)  # rank 5 < n = 12
    lam = 0.3
    H = lam * torch.eye(12, dtype=DT) + U.T @ U
    w = torch.randn(12, generator=g, dtype=DT)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 9]] = False
    dense = masked_inverse(H.unsqueeze(0), mask.unsqueeze(0))[0].diagonal()
    torch.testing.assert_close(woodbury_inverse_diag(U, lam, mask)[mask], dense[mask])
    new = mask.clone()
    new[[0, 5]] = False
    torch.testing.assert_close(
        woodbury_masked_update(w * mask, U, lam, new),
        obs_masked_update((w * mask).unsqueeze(0), H.unsqueeze(0), new.unsqueeze(0))[0],
    )


def test_prune_woodbury_equals_dense_whole_layer_obs():
    model, loss_fn, data = _tiny_classifier()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(method="obs", curvature="fisher", block_size=None, num_steps=3)
    ma = prune(a, loss_fn, data, 0.6, woodbury=True, **kw)
    mb = prune(b, loss_fn, data, 0.6, woodbury=False, **kw)
    for k in ma:
        assert torch.equal(ma[k], mb[k])
    torch.testing.assert_close(a[0].weight, b[0].weight, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(a[2].weight, b[2].weight, rtol=1e-7, atol=1e-10)
    with pytest.raises(NotImplementedError, match="structured"):
        prune(
            copy.deepcopy(model),
            loss_fn,
            data,
            0.5,
            structured="rows",
            woodbury=True,
            block_size=None,
        )


def test_recompute_and_structured_obs_quality():
    model, loss_fn, data = _tiny_classifier()
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    m = copy.deepcopy(model)
    prune(m, loss_fn, data, 0.6, method="obs", num_steps=3, recompute=True)
    assert sparsity_of(m)["global"] == pytest.approx(round(0.6 * 72) / 72)
    losses = {}
    for method in ("obs", "magnitude"):
        m = copy.deepcopy(model)
        prune(m, loss_fn, data, 0.5, method=method, structured="rows", layers=["0"])
        with torch.no_grad():
            losses[method] = float(loss_fn(m(X), y))
    assert losses["obs"] < losses["magnitude"]


@pytest.mark.parametrize("curvature", ["ggn", "fisher_empirical"])
def test_sequence_ce_blocks_match_the_factory_operators(curvature):
    """Per-token rows: exact blocks of an LM-shaped model with ignore_index, two batches."""
    import hesse
    from hesse.compress import curvature_blocks
    from hesse.func import output_loss

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 3), nn.Tanh(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)
    )
    model = model.double()
    loss_fn = output_loss(nn.CrossEntropyLoss(), class_dim=-1)
    data = []
    for B in (2, 1):
        ids = torch.randint(0, 5, (B, 4), generator=g)
        y = torch.randint(0, 5, (B, 4), generator=g)
        y[0, 1] = -100
        data.append((ids, y))
    blocks = curvature_blocks(model, loss_fn, data, curvature=curvature, block_size=None)
    for name in ("2.weight", "4.weight"):
        op = hesse.curvature_operator(curvature, model, loss_fn, data, params=[name])
        ref = op.to_dense()
        assert float((blocks[name][0] - ref).norm() / ref.norm()) < 1e-10
