"""Cached product graphs: rebuilt on any parameter change, deterministic block strategy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse.func import GradGraph
from hesse.testing import dense_hessian

from .cases import mlp_ce_mean


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.data.mul_(1.5),  # bypasses the autograd version counter
        lambda p: p.data.add_(0.25),
        lambda p: p.detach().mul_(0.5),  # shares the version counter
        lambda p: setattr(p, "data", p.data * 2.0),  # new storage
    ],
    ids=["data.mul_", "data.add_", "detach.mul_", "data="],
)
def test_cached_graph_rebuilt_after_any_parameter_change(change):
    model, loss_fn, data = mlp_ce_mean()
    for cache_graph in (True, False):
        H = hesse.HessianOperator(model, loss_fn, data, cache_graph=cache_graph)
        G = hesse.GGNOperator(model, loss_fn, data, cache_graph=cache_graph)
        v = torch.randn(H.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        H @ v, G @ v  # builds the caches
        change(model[0].weight)
        dense = dense_hessian(model, loss_fn, data)
        assert _rel(H @ v, dense @ v) < 1e-10
        fresh = hesse.GGNOperator(model, loss_fn, data) @ v
        assert _rel(G @ v, fresh) < 1e-12
        change(model[0].weight)  # undo-like second change for the next round
        with torch.no_grad():
            model[0].weight.copy_(mlp_ce_mean()[0][0].weight)


def test_unchanged_parameters_keep_the_cache():
    model, loss_fn, data = mlp_ce_mean()
    H = hesse.HessianOperator(model, loss_fn, data)
    v = torch.ones(H.shape[1], dtype=torch.float64)
    H @ v
    graphs = H._cache
    H @ v
    assert H._cache is graphs


def _graph(N: int, width: int):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, width), nn.Tanh(), nn.Linear(width, 4))
    X = torch.randn(N, 16, generator=g)
    y = torch.randint(0, 4, (N,), generator=g)
    params = list(model.parameters())
    return GradGraph(nn.CrossEntropyLoss()(model(X), y), params), params


@pytest.mark.parametrize("N,width", [(8, 8), (2000, 64)])
def test_block_products_are_bit_identical_on_every_call(N, width):
    """The batched / per-column choice depends on shapes only (never on timing)."""
    graph, params = _graph(N, width)
    g = torch.Generator().manual_seed(1)
    V = [torch.randn(6, *p.shape, generator=g) for p in params]
    first = graph.hmp(V)
    for _ in range(5):
        for a, b in zip(graph.hmp(V), first):
            assert torch.equal(a, b)
    again, _ = _graph(N, width)  # a fresh graph of the same shapes decides the same way
    assert again.batched_wins() == graph.batched_wins()
    for a, b in zip(again.hmp(V), first):
        assert torch.equal(a, b)
    # both strategies agree with the columns up to rounding
    for j in range(6):
        col = graph.hvp([v[j] for v in V])
        for a, c in zip(first, col):
            torch.testing.assert_close(a[j], c, rtol=1e-4, atol=1e-6)


def test_strategy_follows_graph_size():
    small, _ = _graph(8, 8)
    large, _ = _graph(2000, 64)
    assert small.batched_wins() and not large.batched_wins()


def test_grad_graph_hvp_checks_shapes():
    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    g = GradGraph(w[0] ** 3 - w[1] ** 2, [w])
    v = torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(g.hvp([v])[0], torch.tensor([6.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="Shape mismatch"):
        g.hvp([torch.ones(3, dtype=torch.float64)])


def test_products_import_no_sympy():
    """Single-vector products skip torch.autograd.grad's Python checks, whose first call
    imports torch.fx's symbolic shapes and sympy (~0.4 s of CPU at start-up)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, hesse\n"
        "from hesse.data import default_workload\n"
        "w = default_workload()\n"
        "for Op in (hesse.HessianOperator, hesse.GGNOperator):\n"
        "    A = Op(w.model, w.loss_fn, w.train)\n"
        "    A @ torch.ones(A.shape[1])\n"
        "heavy = ('sympy', 'torch.fx.experimental.symbolic_shapes')\n"
        "bad = [k for k in heavy if k in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
