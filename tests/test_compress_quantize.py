"""Quantization: grids, the OBS/GPTQ quantizer vs brute force, HAWQ sensitivity, bit allocation."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hesse.compress import (
    allocate_bits,
    compressible_weights,
    layer_inputs_hessian,
    layer_sensitivity,
    quantization_grid,
    quantize,
    quantize_obs,
    quantize_rtn,
    spearman,
)
from hesse.testing import dense_ggn, dense_hessian

DT = torch.float64


def _on_grid(Q: torch.Tensor, W: torch.Tensor, bits: int) -> bool:
    """Every row of ``Q`` uses at most 2^bits values, spaced by a common step (and 0 is one)."""
    for q in Q:
        vals = torch.unique(q)
        if len(vals) > 2**bits:
            return False
        if len(vals) > 1:
            steps = torch.diff(torch.cat([vals, torch.zeros(1, dtype=q.dtype)]).unique())
            base = steps.min()
            if not torch.allclose(steps / base, torch.round(steps / base), atol=1e-6):
                return False
    return True


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=DT)
    mix = torch.eye(d, dtype=DT) + 0.7 * torch.randn(d, d, generator=g, dtype=DT)
    return Z @ mix


def test_rtn_is_nearest_grid_point():
    W = torch.randn(5, 9, dtype=DT)
    for bits in (1, 2, 3, 4):
        scale, zero, maxq = quantization_grid(W, bits)
        Q = quantize_rtn(W, bits)
        levels = (torch.arange(maxq + 1, dtype=DT) - zero) * scale  # (rows, levels)
        dist = (W.unsqueeze(-1) - levels.unsqueeze(1)).abs()
        best = levels.gather(1, dist.argmin(-1))
        torch.testing.assert_close(Q, best)
        assert _on_grid(Q, W, bits)
    W[0, 3] = 0.0
    assert float(quantize_rtn(W, 2)[0, 3]) == 0.0  # zero is a level


def test_obs_equals_rtn_when_inputs_are_uncorrelated():
    """H = c I: the nearest-plane pass has nothing to compensate, so it is rounding."""
    W = torch.randn(4, 7, dtype=DT)
    H = 3.0 * torch.eye(7, dtype=DT)
    for bits in (2, 3):
        Q = quantize_obs(W, H, bits, grid="minmax", refine=0, act_order=False, damping=1e-9)
        torch.testing.assert_close(Q, quantize_rtn(W, bits))


def test_gptq_pass_matches_explicit_obs_column_updates():
    """The Cholesky form equals quantizing one column at a time with the explicit OBS update
    delta = -(w_q - q) / [H_F^-1]_qq * [H_F^-1]_{:,q} on the remaining columns F."""
    X = _correlated(50, 6)
    H = X.T @ X
    W = torch.randn(3, 6, dtype=DT)
    bits = 2
    Q = quantize_obs(W, H, bits, grid="minmax", refine=0, act_order=False, damping=1e-10)
    scale, zero, maxq = quantization_grid(W, bits)
    Wc = W.clone()
    ref = torch.zeros_like(W)
    for q in range(6):
        F = list(range(q, 6))
        Hinv = torch.linalg.inv(H[F][:, F])
        col = Wc[:, q]
        qc = (torch.clamp(torch.round(col.unsqueeze(1) / scale) + zero, 0, maxq) - zero) * scale
        qc = qc.squeeze(1)
        ref[:, q] = qc
        delta = -((col - qc) / Hinv[0, 0]).unsqueeze(1) * Hinv[0].unsqueeze(0)
        Wc[:, F] += delta
    torch.testing.assert_close(Q, ref, rtol=1e-7, atol=1e-9)


def _out_err(W, Q, H):
    D = W - Q
    return ((D @ H) * D).sum(1)


def test_obs_vs_brute_force_on_a_tiny_layer():
    X = _correlated(40, 4, seed=3)
    H = X.T @ X
    W = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    bits = 2
    Q = quantize_obs(W, H, bits, grid="minmax")
    scale, zero, maxq = quantization_grid(W, bits)
    e_obs, e_rtn = _out_err(W, Q, H), _out_err(W, quantize_rtn(W, bits), H)
    for r in range(3):
        levels = (torch.arange(maxq + 1, dtype=DT) - zero[r]) * scale[r]
        best = min(
            float(_out_err(W[r : r + 1], torch.stack(c).unsqueeze(0), H))
            for c in itertools.product(levels, repeat=4)
        )
        assert best - 1e-9 <= float(e_obs[r]) <= float(e_rtn[r]) + 1e-12
        # refinement leaves a coordinate-wise local minimum
        for j in range(4):
            for lv in levels:
                Qm = Q[r].clone()
                Qm[j] = lv
                assert float(_out_err(W[r : r + 1], Qm.unsqueeze(0), H)) >= float(e_obs[r]) - 1e-9
    assert float(e_obs.sum()) < 0.8 * float(e_rtn.sum())


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.booleans())
def test_obs_never_worse_than_rtn(seed, bits, act_order):
    X = _correlated(30, 5, seed=seed)
    W = torch.randn(3, 5, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    H = X.T @ X
    Q = quantize_obs(W, H, bits, act_order=act_order, num_grid=4, refine=1)
    assert bool((_out_err(W, Q, H) <= _out_err(W, quantize_rtn(W, bits), H) + 1e-9).all())


@functools.cache
def _trained_mlp():
    g = torch.Generator().manual_seed(0)
    X = _correlated(80, 6, seed=5)
    y = (X[:, 0] - X[:, 2] > 0).long() + (X[:, 1] > 0.3).long()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    del g
    return model, loss_fn, (X, y)


def _mlp():
    model, loss_fn, data = _trained_mlp()
    return copy.deepcopy(model), loss_fn, data


def test_quantize_model_errors_grids_and_biases():
    model, loss_fn, (X, y) = _mlp()
    for method in ("rtn", "obs"):
        m = copy.deepcopy(model)
        res = quantize(m, (X, y), 3, method=method)
        assert res.size_bits == 3 * (72 + 96 + 24)
        for idx in (0, 2, 4):
            assert _on_grid(m[idx].weight.detach(), model[idx].weight.detach(), 3)
            torch.testing.assert_close(m[idx].bias, model[idx].bias)
        # layer_error against an independent forward pass on the quantized prefix
        inputs = X
        for idx in (0, 2, 4):
            W0, Wq = model[idx].weight.detach(), m[idx].weight.detach()
            rel = (inputs @ (W0 - Wq).T).pow(2).sum() / (inputs @ W0.T).pow(2).sum()
            assert res.layer_error[f"{idx}.weight"] == pytest.approx(float(rel), rel=1e-8)
            with torch.no_grad():
                inputs = m[idx + 1](m[idx](inputs)) if idx < 4 else None
    rtn = quantize(copy.deepcopy(model), X, 2, method="rtn", sequential=False)
    obs = quantize(copy.deepcopy(model), X, 2, method="obs", sequential=False)
    for k in rtn.layer_error:
        assert obs.layer_error[k] <= rtn.layer_error[k] + 1e-12


def test_quantize_per_layer_bits_and_bad_input():
    model, loss_fn, (X, y) = _mlp()
    res = quantize(model, [(X[:40], y[:40]), (X[40:], y[40:])], {"0": 2, "4.weight": 8})
    assert res.bits == {"0.weight": 2, "4.weight": 8}
    assert res.size_bits == 2 * 72 + 8 * 24
    with pytest.raises(ValueError, match="bits"):
        quantize(model, X, 0)
    with pytest.raises(ValueError, match="bits"):
        quantize(model, X, 17)
    with pytest.raises(TypeError, match="bits"):
        quantize(model, X, 2.5)
    with pytest.raises(ValueError, match="method"):
        quantize(model, X, 4, method="kmeans")
    with pytest.raises(ValueError, match="match no layer"):
        quantize(model, X, {"9": 4})
    with pytest.raises(ValueError, match="grid"):
        quantize(model, X, 4, grid="best")
    with pytest.raises(ValueError, match="empty"):
        quantize(model, [], 4)


def test_layer_inputs_hessian():
    model, _, (X, _) = _mlp()
    ref = compressible_weights(model)[1]
    with torch.no_grad():
        h = torch.tanh(model[0](X))
    torch.testing.assert_close(layer_inputs_hessian(model, ref, [X]), h.T @ h)


# -- sensitivity ------------------------------------------------------------------------------


def test_sensitivity_traces_against_dense_references():
    model, loss_fn, data = _mlp()
    res = layer_sensitivity(model, loss_fn, data, bits=(2, 4))
    H = dense_hessian(model, loss_fn, data, params=["2.weight"])
    assert res.mean_trace["2.weight"] == pytest.approx(float(H.trace()) / 96, rel=1e-8)
    W = model[2].weight.detach()
    pert = float((quantize_rtn(W, 2) - W).pow(2).sum())
    assert res.perturbation["2.weight"][2] == pytest.approx(pert)
    assert res.sensitivity["2.weight"][2] == pytest.approx(pert * float(H.trace()) / 96)
    G = dense_ggn(model, loss_fn, data, params=["4.weight"])
    gg = layer_sensitivity(model, loss_fn, data, bits=(2,), curvature="ggn")
    assert gg.mean_trace["4.weight"] == pytest.approx(float(G.trace()) / 24, rel=1e-8)


@pytest.mark.montecarlo
def test_sensitivity_hutchinson_within_4_stderr():
    model, loss_fn, data = _mlp()
    est = layer_sensitivity(
        model,
        loss_fn,
        data,
        bits=(2,),
        exact_max=0,
        num_matvecs=64,
        generator=torch.Generator().manual_seed(0),
        layers=["2"],
    )
    H = dense_hessian(model, loss_fn, data, params=["2.weight"])
    err = abs(est.mean_trace["2.weight"] - float(H.trace()) / 96)
    assert est.trace_stderr["2.weight"] > 0
    assert err <= 4 * est.trace_stderr["2.weight"]


def test_measured_loss_increase_and_model_restored():
    model, loss_fn, (X, y) = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = layer_sensitivity(model, loss_fn, (X, y), bits=(2, 3), measure=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[4].weight.copy_(quantize_rtn(m[4].weight, 2))
        inc = float(loss_fn(m(X), y) - loss_fn(model(X), y))
    assert res.measured["4.weight"][2] == pytest.approx(inc, rel=1e-8, abs=1e-14)
    assert -1.0 <= res.rank_correlation() <= 1.0


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        spearman([1], [1])


# -- bit allocation ---------------------------------------------------------------------------


def test_allocation_docstring_example():
    a = allocate_bits(
        {"a": {2: 9.0, 4: 1.0}, "b": {2: 2.0, 4: 1.0}}, 12, num_weights={"a": 2, "b": 2}
    )
    assert a.bits == {"a": 4, "b": 2} and a.size_bits == 12 and a.objective == 3.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
    st.integers(0, 10_000),
    st.floats(0.0, 1.0),
)
def test_allocation_is_exact_and_respects_the_budget(sizes, seed, frac):
    g = torch.Generator().manual_seed(seed)
    options = (2, 3, 4, 8)
    table = {}
    for i, _ in enumerate(sizes):
        costs = torch.rand(len(options), generator=g, dtype=DT).sort(descending=True).values
        table[f"l{i}"] = {b: float(c) for b, c in zip(options, costs)}
    n = {f"l{i}": s for i, s in enumerate(sizes)}
    lo, hi = 2 * sum(sizes), 8 * sum(sizes)
    budget = int(lo + frac * (hi - lo))
    a = allocate_bits(table, budget, num_weights=n)
    assert a.size_bits == sum(n[k] * b for k, b in a.bits.items())
    assert a.size_bits <= budget
    best = min(
        sum(table[k][b] for k, b in zip(table, combo))
        for combo in itertools.product(options, repeat=len(sizes))
        if sum(n[k] * b for k, b in zip(table, combo)) <= budget
    )
    assert a.objective == pytest.approx(best, rel=1e-12, abs=1e-12)
    sizes_f = [s for s, _ in a.frontier]
    objs = [v for _, v in a.frontier]
    assert sizes_f == sorted(sizes_f) and objs == sorted(objs, reverse=True)


def test_allocation_bad_input():
    t = {"a": {2: 1.0, 4: 0.5}}
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_bits(t, 3, num_weights={"a": 2})
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(t, num_weights={"a": 2})
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(t, 8, average_bits=3.0, num_weights={"a": 2})
    with pytest.raises(ValueError, match="num_weights"):
        allocate_bits(t, 8)
    with pytest.raises(ValueError, match="average_bits"):
        allocate_bits(t, average_bits=-1.0, num_weights={"a": 2})
    a = allocate_bits(t, average_bits=3.0, num_weights={"a": 2})
    assert a.budget_bits == 6 and a.bits == {"a": 2}


def test_allocation_from_sensitivity_result():
    model, loss_fn, data = _mlp()
    res = layer_sensitivity(model, loss_fn, data, bits=(2, 4, 8))
    a = allocate_bits(res, average_bits=4.0)
    assert a.size_bits <= int(4.0 * (72 + 96 + 24))
    q = quantize(copy.deepcopy(model), data, a.bits, method="rtn")
    assert q.size_bits == a.size_bits


def test_conv2d_quantize_and_prune():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 1, 6, 6, generator=g, dtype=DT)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 3)
    ).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    m = copy.deepcopy(model)
    res = quantize(m, (X, y), 2, method="obs", layers=["0"])
    W0, Wq = model[0].weight.detach(), m[0].weight.detach()
    conv = torch.nn.functional.conv2d
    rel = conv(X, W0 - Wq, padding=1).pow(2).sum() / conv(X, W0, padding=1).pow(2).sum()
    assert res.layer_error["0.weight"] == pytest.approx(float(rel), rel=1e-8)
    from hesse.compress import prune, sparsity_of

    p = copy.deepcopy(model)
    prune(p, loss_fn, (X, y), 0.5, method="obs", num_steps=2)
    assert sparsity_of(p)["global"] == pytest.approx(round(0.5 * (27 + 324)) / (27 + 324))
    assert hasattr(p[0], "weight_mask")


def test_non_finite_inputs_raise():
    from hesse import NonFiniteError

    model, loss_fn, (X, y) = _mlp()
    Xbad = X.clone()
    Xbad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        quantize(copy.deepcopy(model), Xbad, 3)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[2].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        quantize(bad, X, 3, layers=["2"])
