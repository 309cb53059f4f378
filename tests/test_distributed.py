"""Data-parallel curvature on torch.distributed (2 gloo processes) vs one process.

One spawn of two ranks runs every distributed check (process start-up dominates the cost);
the ranks save their results and the test compares them with a single process that holds all
the data, and with the dense float64 Hessian.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hesse
from hesse.testing import dense_hessian

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)

N_TOTAL = 23
SHARDS = {0: [(0, 4), (4, 7)], 1: [(7, 16), (16, 23)]}  # rank 0: 7 samples, rank 1: 16


def _problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(N_TOTAL, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TOTAL,), generator=g)
    return model, X, y


def _reg(p):
    return 0.05 * p["0.weight"].pow(4).sum()


def _compute(model, data, *, tag_kw):
    """Everything compared between 1 and 2 ranks (same generators everywhere)."""
    kw = dict(weight_decay=0.1, regularizer=_reg, **tag_kw)
    H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data, **kw)
    G = hesse.GGNOperator(model, nn.CrossEntropyLoss(reduction="sum"), data, **tag_kw)
    V = torch.randn(H.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eig = hesse.top_eigenpairs(H, 1, tol=1e-10, generator=torch.Generator().manual_seed(2))
    tr = hesse.hutchinson_trace(H, 20, generator=torch.Generator().manual_seed(3))
    value, grad = H.objective.value_and_grad()
    return {
        "N": torch.tensor(H.objective.N),
        "HV": H @ V,
        "Hv": H @ V[:, 0],
        "GV": G @ V,
        "lambda_max": eig.eigenvalues[0],
        "eig_matvecs": torch.tensor(eig.num_matvecs),
        "trace": tr.estimate,
        "value": value,
        "loss": H.loss(),
        "grad": grad,
    }


def _worker(rank: int, store: str, out: str) -> None:
    # A crash in C++ (gloo) aborts the process: have it print the Python stack of every thread.
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, X, y = _problem()
        data = [(X[a:b], y[a:b]) for a, b in SHARDS[rank]]
        res = _compute(model, data, tag_kw={})
        res["micro"] = _compute(model, data, tag_kw={"micro_batch_size": 3})["HV"]
        res["dist_off_N"] = torch.tensor(
            hesse.Objective(model, nn.CrossEntropyLoss(), data, distributed=False).N
        )

        # DistributedDataParallel: unwrapped; double backward must not fire its hooks.
        ddp = nn.parallel.DistributedDataParallel(model)
        H = hesse.HessianOperator(ddp, nn.CrossEntropyLoss(), data)
        assert H.objective.model is model
        V = torch.randn(
            H.shape[1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        res["ddp_HV"] = H @ V
        res["ddp_grads_untouched"] = torch.tensor(all(p.grad is None for p in model.parameters()))
        # ... and DDP training still works afterwards (its reducer saw no stray gradient)
        nn.CrossEntropyLoss()(
            ddp(X[SHARDS[rank][0][0] : SHARDS[rank][-1][1]]),
            y[SHARDS[rank][0][0] : SHARDS[rank][-1][1]],
        ).backward()
        res["ddp_grad"] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        del ddp  # free DDP's reducer while the process group is alive (else gloo can hang)

        # Parameters that differ between ranks are refused on every rank.
        bad = _problem()[0]
        if rank == 1:
            with torch.no_grad():
                bad[0].bias.add_(1e-3)
        try:
            hesse.HessianOperator(bad, nn.CrossEntropyLoss(), data)
            res["bad_params"] = "accepted"
        except ValueError as e:
            res["bad_params"] = str(e)
        # Vectors that differ between ranks (an unseeded generator) are refused.
        H = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data)
        try:
            H @ torch.full((H.shape[1],), float(rank), dtype=torch.float64)
            res["bad_vector"] = "accepted"
        except ValueError as e:
            res["bad_vector"] = str(e)
        # Parameters changed after the first product: identically on every rank (the cached
        # graphs are rebuilt everywhere), then through p.data on one rank only (a clear error
        # on every rank, not a collective that only one rank joins).
        m2 = _problem()[0]
        H = hesse.HessianOperator(m2, nn.CrossEntropyLoss(), data)
        v = torch.ones(H.shape[1], dtype=torch.float64)
        H @ v
        m2[0].weight.data.mul_(1.5)
        res["changed_Hv"] = H @ v
        res["fresh_Hv"] = hesse.HessianOperator(m2, nn.CrossEntropyLoss(), data) @ v
        if rank == 1:
            m2[2].bias.data.add_(1e-3)
        try:
            H @ v
            res["drift"] = "accepted"
        except ValueError as e:
            res["drift"] = str(e)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's C++ statics were seen to abort the process there
    # ("terminate called without an active exception", about 1 run in 12) after the results
    # were saved. An exception above still reaches the parent through spawn's error file.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    # spawn, not fork: a forked child inherits the parent's thread pools and locks (the whole
    # suite has used torch by now) and was seen to hang in gloo's teardown.
    ctx = mp.start_processes(
        _worker, args=(str(d / "store"), str(d)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish within 300 s")
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_rank():
    model, X, y = _problem()
    data = [(X[a:b], y[a:b]) for r in (0, 1) for a, b in SHARDS[r]]
    res = _compute(model, data, tag_kw={})
    res["dense"] = dense_hessian(model, nn.CrossEntropyLoss(), data)
    return res


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_ranks_identical(two_ranks):
    r0, r1 = two_ranks
    for key in ("HV", "Hv", "GV", "lambda_max", "trace", "value", "grad", "micro", "ddp_HV"):
        assert torch.equal(r0[key], r1[key]), key
    assert int(r0["eig_matvecs"]) == int(r1["eig_matvecs"])


def test_two_ranks_match_one_rank(two_ranks, one_rank):
    r0 = two_ranks[0]
    assert int(r0["N"]) == N_TOTAL and int(r0["dist_off_N"]) == 7
    for key in ("HV", "Hv", "GV", "grad"):
        assert _rel(r0[key], one_rank[key]) < 1e-12, key
    # the targets: lambda_max and trace to 1e-6 relative
    assert _rel(r0["lambda_max"], one_rank["lambda_max"]) < 1e-6
    assert _rel(r0["trace"], one_rank["trace"]) < 1e-6
    assert _rel(r0["value"], one_rank["value"]) < 1e-12
    assert _rel(r0["loss"], one_rank["loss"]) < 1e-12
    assert _rel(r0["micro"], one_rank["HV"]) < 1e-12


def test_two_ranks_match_dense_truth(two_ranks, one_rank):
    """Exact global normalisation with unequal shards; regulariser added once, not per rank."""
    model, X, y = _problem()
    n = one_rank["dense"].shape[0]
    reg = torch.autograd.functional.hessian(
        lambda w: _reg({"0.weight": w}), model[0].weight.detach()
    ).reshape(20, 20)
    H = one_rank["dense"] + 0.1 * torch.eye(n, dtype=torch.float64)
    H[:20, :20] += reg
    V = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _rel(two_ranks[0]["HV"], H @ V) < 1e-12
    lam = torch.linalg.eigvalsh(H)[-1]
    assert _rel(two_ranks[0]["lambda_max"], lam) < 1e-8


def test_ddp_wrapped_model(two_ranks, one_rank):
    r0, r1 = two_ranks
    assert bool(r0["ddp_grads_untouched"]) and bool(r1["ddp_grads_untouched"])
    # DDP averages the per-rank mean gradients after its own backward
    assert torch.equal(r0["ddp_grad"], r1["ddp_grad"])
    assert (
        _rel(
            r0["ddp_HV"],
            one_rank["dense"]
            @ torch.randn(
                r0["ddp_HV"].shape[0],
                2,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(1),
            ),
        )
        < 1e-12
    )


def test_mismatch_refused_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "differ between ranks" in r["bad_params"]
        assert "generator" in r["bad_vector"]
        # a p.data write on one rank after the first product: the same clear error everywhere
        assert "parameters differ between ranks" in r["drift"]


def test_parameter_change_on_every_rank_rebuilds(two_ranks):
    for r in two_ranks:
        assert torch.equal(r["changed_Hv"], r["fresh_Hv"])
    assert torch.equal(two_ranks[0]["changed_Hv"], two_ranks[1]["changed_Hv"])
