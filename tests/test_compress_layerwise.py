"""Layer-wise OBS pruning (SparseGPT) against dense float64 ground truth, and the tied
embedding/output weight of the LM in the layer-wise Hessian, quantization and pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hesse.compress import (
    compressible_weights,
    inverse_cholesky,
    layer_inputs_hessian,
    prune,
    prune_layer_obs,
    quantize,
    sparsity_of,
)
from hesse.data.lm import CausalTransformer, LMConfig, lm_corpus, lm_sequences

DT = torch.float64


def _layer(rows=5, d=12, n=200, seed=0):
    """Correlated inputs ``X (n, d)`` and weights ``W (rows, d)``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT) @ torch.randn(d, d, generator=g, dtype=DT)
    W = torch.randn(rows, d, generator=g, dtype=DT)
    return X, W


def _lambda(H, damping):
    return damping * float(torch.diagonal(H).mean())


def test_inverse_cholesky_rows_are_the_trailing_inverses():
    X, _ = _layer()
    H = X.T @ X + torch.eye(12, dtype=DT)
    U = inverse_cholesky(H)
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(H), rtol=1e-10, atol=1e-12)
    for q in range(12):
        Hq = torch.linalg.inv(H[q:, q:])
        assert float(U[q, q] ** 2) == pytest.approx(float(Hq[0, 0]), rel=1e-10)
        torch.testing.assert_close(U[q, q:] / U[q, q], Hq[0] / Hq[0, 0], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky(-torch.eye(3, dtype=DT))


def test_weights_are_the_exact_least_squares_optimum_for_the_mask():
    """Each row's kept weights minimise ||X (w - w_hat)||^2 + lam ||w - w_hat||^2 (lstsq on
    the augmented system, restricted to the kept columns)."""
    X, W = _layer()
    damping = 0.01
    H = X.T @ X
    Wn, keep = prune_layer_obs(W, H, 0.5, damping=damping, block_size=4)
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert (keep.sum(1) == 6).all() and bool((Wn[~keep] == 0).all())
    lam = _lambda(H, damping)
    A = torch.cat([X, lam**0.5 * torch.eye(12, dtype=DT)])
    for r in range(W.shape[0]):
        F = keep[r]
        b = A @ W[r]
        sol = torch.linalg.lstsq(A[:, F], b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(Wn[r, F], sol, rtol=1e-9, atol=1e-11)


def _brute_force_mask(W, H, sparsity, block):
    """The SparseGPT pass written with explicit inverses of the trailing blocks of H:
    at each block start every row drops its share of columns with the smallest
    w_q^2 / [(H_{>=q,>=q})^-1]_qq; a dropped column q moves the later columns by the OBS
    correction -(w_q / [Hq^-1]_00) [Hq^-1]_{0,1:} with Hq = H_{>=q,>=q}."""
    W = W.clone()
    rows, d = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    inv = [torch.linalg.inv(H[q:, q:]) for q in range(d)]
    target = round(sparsity * d)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        for r in range(rows):
            sal = torch.stack([W[r, q] ** 2 / inv[q][0, 0] for q in range(i1, i2)])
            done = int((~keep[r, :i1]).sum())
            quota = round(target * i2 / d) - done
            drop = torch.argsort(sal, stable=True)[:quota] + i1
            keep[r, drop] = False
        for q in range(i1, i2):
            for r in range(rows):
                if not keep[r, q]:
                    Hq = inv[q]
                    W[r, q:] -= W[r, q] / Hq[0, 0] * Hq[0]
    return keep


@pytest.mark.parametrize("block", [3, 5, None])
def test_mask_matches_the_brute_force_obs_pass(block):
    X, W = _layer(rows=4, d=10, seed=1)
    H = X.T @ X
    _, keep = prune_layer_obs(W, H, 0.6, damping=0.05, block_size=block)
    Hd = H + _lambda(H, 0.05) * torch.eye(10, dtype=DT)
    assert torch.equal(keep, _brute_force_mask(W, Hd, 0.6, block or 10))


def test_obs_beats_magnitude_on_the_reconstruction_error():
    X, W = _layer(rows=16, d=32, n=400, seed=2)
    H = X.T @ X

    def err(Q):
        return float(((X @ (W - Q).T) ** 2).sum() / ((X @ W.T) ** 2).sum())

    Wn, keep = prune_layer_obs(W, H, 0.5)
    small = W.abs().argsort(1)[:, :16]
    mag = W.clone().scatter_(1, small, 0.0)
    assert err(Wn) < 0.7 * err(mag), (err(Wn), err(mag))


def test_existing_zeros_stay_and_count():
    X, W = _layer()
    old = torch.ones_like(W, dtype=torch.bool)
    old[:, :8] = False  # more than the 50% asked for in every row
    old[0, :8] = True
    old[0, 0] = False
    Wn, keep = prune_layer_obs(W, X.T @ X, 0.5, mask=old, block_size=5)
    assert not bool((keep & ~old).any())
    assert int((~keep[0]).sum()) == 6 and bool((~keep[1:]).sum(1).eq(8).all())
    with pytest.raises(ValueError, match="sparsity"):
        prune_layer_obs(W, X.T @ X, 1.0)
    with pytest.raises(ValueError, match="Shape mismatch"):
        prune_layer_obs(W, torch.eye(3, dtype=DT), 0.5)


def _mlp():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).to(DT)
    X = torch.randn(64, 6, generator=g, dtype=DT)
    return model, X


def test_prune_layerwise_is_sequential_and_exact_per_layer():
    model, X = _mlp()
    ref = copy.deepcopy(model)
    y = torch.zeros(64, dtype=torch.long)  # targets are not used
    data = [(X[:40], y[:40]), (X[40:], y[40:])]
    masks = prune(model, None, data, 0.5, curvature="layerwise", scope="layer")
    assert set(masks) == {"0.weight", "2.weight"}
    sp = sparsity_of(model)
    assert sp["0.weight"] == pytest.approx(0.5) and sp["2.weight"] == pytest.approx(0.5)
    # layer 0 from the inputs; layer 2 from the outputs of the already-pruned layer 0
    W0, k0 = prune_layer_obs(ref[0].weight, X.T @ X, 0.5)
    torch.testing.assert_close(model[0].weight.detach(), W0)
    with torch.no_grad():
        h = torch.tanh(model[0](X))
    W2, k2 = prune_layer_obs(ref[2].weight, h.T @ h, 0.5)
    torch.testing.assert_close(model[2].weight.detach(), W2)
    assert torch.equal(masks["2.weight"].bool(), k2)


def test_prune_layerwise_bad_options():
    model, X = _mlp()
    with pytest.raises(ValueError, match="scope='layer'"):
        prune(model, None, X, 0.5, curvature="layerwise")
    with pytest.raises(ValueError, match="method='obs'"):
        prune(model, None, X, 0.5, method="obd", curvature="layerwise", scope="layer")
    # magnitude needs no curvature: the option is ignored (one set of options for a report)
    prune(model, None, None, 0.5, method="magnitude", curvature="layerwise")
    assert sparsity_of(model)["global"] == pytest.approx(0.5)
    with pytest.raises(NotImplementedError, match="structured"):
        prune(model, None, X, 0.5, curvature="layerwise", scope="layer", structured="rows")
    with pytest.raises(ValueError, match="curvature"):
        prune(model, None, X, 0.5, curvature="inputs", scope="layer")


# -- the tied embedding / output layer ---------------------------------------------------------

TINY = LMConfig(d_model=8, n_layers=1, n_heads=2, context=8)


def _tiny_lm():
    model = CausalTransformer(TINY, seed=0).double()
    X, _ = lm_sequences(lm_corpus("train")[: 6 * 8 + 1], 8)
    return model, X


def test_tied_weight_is_one_ref_with_relative_use_hessians():
    model, X = _tiny_lm()
    refs = compressible_weights(model)
    tied = refs[0]
    assert tied.name == "tok.weight" and tied.module_names == ["tok", "head"]
    assert model.head.weight is model.tok.weight
    # independent ground truth: the output layer's inputs and the mean lookup count
    with torch.no_grad():
        h = model.tok(X) + model.pos.weight[: X.shape[1]]
        for b in model.blocks:
            h = b(h)
        h = model.ln_f(h).reshape(-1, 8)
    W = model.tok.weight.detach()
    H_head = h.T @ h
    H_emb = X.numel() / TINY.vocab_size * torch.eye(8, dtype=DT)
    expected = H_head / torch.trace(W @ H_head @ W.T) + H_emb / torch.trace(W @ H_emb @ W.T)
    torch.testing.assert_close(layer_inputs_hessian(model, tied, [X[:4], X[4:]]), expected)


@pytest.mark.parametrize("what", ["quantize", "prune"])
def test_tied_weight_is_compressed_once_for_both_uses(what):
    model, X = _tiny_lm()
    if what == "quantize":
        res = quantize(model, X, 3, method="obs")
        assert "tok.weight" in res.bits and res.num_weights["tok.weight"] == 96 * 8
        assert model.head.weight is model.tok.weight
        assert all(len(torch.unique(row)) <= 8 for row in model.tok.weight.detach())
    else:
        prune(model, None, X, 0.5, curvature="layerwise", scope="layer")
        assert model.head.weight_orig is model.tok.weight_orig
        assert torch.equal(model.head.weight, model.tok.weight)
        assert sparsity_of(model)["tok.weight"] == pytest.approx(0.5)
    out = model(X)
    assert torch.isfinite(out).all()
