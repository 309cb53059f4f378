"""SharpnessTracker: known lambda_max on a quadratic, warm start, per layer, preconditioned."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch
from torch import nn

import hesse
from hesse.analysis.tracker import (
    EdgeOfStabilityWarning,
    SharpnessRecord,
    SharpnessTracker,
    _warm_start,
    adam_preconditioner,
    lightning_callback,
)
from hesse.linalg import top_eigenpairs
from hesse.testing import dense_hessian

F64 = torch.float64


def _quadratic(seed=0, spectrum=(4.0, 2.0, 1.0, 0.5, 0.25)):
    """Linear least squares with a chosen Hessian spectrum: H = 2 X^T X / N, constant."""
    n = len(spectrum)
    N = 3 * n
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, n, generator=g, dtype=F64))
    R, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    s = torch.tensor(spectrum, dtype=F64)
    X = Q @ torch.diag((s * N / 2).sqrt()) @ R.T
    y = torch.randn(N, 1, generator=g, dtype=F64)
    torch.manual_seed(seed)
    model = nn.Linear(n, 1, bias=False).double()
    return model, nn.MSELoss(), (X, y), 2 * X.T @ X / N


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(40, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, nn.CrossEntropyLoss(), (X, y)


def _train(model, loss_fn, data, opt, tracker, steps):
    X, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        tracker.step()


def test_quadratic_known_lambda_max_and_ratio():
    model, loss_fn, data, H = _quadratic()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(lam - 4.0) < 1e-10
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tr = hesse.SharpnessTracker(
        model, loss_fn, data, every=5, optimizer=opt, generator=torch.Generator().manual_seed(0)
    )
    _train(model, loss_fn, data, opt, tr, 20)
    assert [r.step for r in tr.history] == [5, 10, 15, 20]
    for r in tr.history:
        assert isinstance(r, SharpnessRecord)
        assert abs(r.lambda_max - lam) <= 1e-3 * lam
        assert r.lr == lr and abs(r.ratio - lr * r.lambda_max / 2) < 1e-15
        assert r.converged
    # the Hessian is constant: every warm-started check converges almost immediately
    assert all(r.num_matvecs <= 3 for r in tr.history[1:])
    assert tr.history[0].num_matvecs >= tr.history[1].num_matvecs


def test_warm_start_reduces_matvecs_on_a_network():
    model, loss_fn, data = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tr = SharpnessTracker(
        model, loss_fn, data, every=2, optimizer=opt, generator=torch.Generator().manual_seed(0)
    )
    _train(model, loss_fn, data, opt, tr, 20)
    first, later = tr.history[0].num_matvecs, [r.num_matvecs for r in tr.history[1:]]
    assert tr.mean_matvecs_after_first() <= 5.0
    assert max(later) < first
    # a cold start at the final parameters needs more products than the warm checks did
    cold = top_eigenpairs(tr.operator, k=1, tol=1e-3, generator=torch.Generator().manual_seed(1))
    assert cold.num_matvecs > tr.mean_matvecs_after_first()
    # and agrees with the dense Hessian
    evals = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data))
    assert abs(tr.history[-1].lambda_max - float(evals[-1])) <= 2e-3 * float(evals[-1])


def test_per_layer_and_lambda_min_against_dense():
    model, loss_fn, data = _mlp(1)
    tr = SharpnessTracker(
        model,
        loss_fn,
        data,
        every=1,
        lr=0.1,
        per_layer=True,
        track_lambda_min=True,
        generator=torch.Generator().manual_seed(0),
    )
    rec = tr.step()
    H = dense_hessian(model, loss_fn, data)
    evals = torch.linalg.eigvalsh(H)
    scale = float(evals.abs().max())
    assert abs(rec.lambda_max - float(evals[-1])) <= 1e-3 * scale
    assert abs(rec.lambda_min - float(evals[0])) <= 2e-3 * scale
    slices = tr.operator.layer_slices()
    assert set(rec.layer_lambda_max) == set(slices) == {"0", "2"}
    for name, sls in slices.items():
        idx = torch.cat([torch.arange(s.start, s.stop) for s in sls])
        top = float(torch.linalg.eigvalsh(H[idx][:, idx])[-1])
        assert abs(rec.layer_lambda_max[name] - top) <= 1e-3 * abs(top) + 1e-9
    assert rec.as_dict()["lambda_max/0"] == rec.layer_lambda_max["0"]


def test_edge_of_stability_warning_on_crossing():
    model, loss_fn, data, H = _quadratic()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / lam)  # ratio 0.5: stable
    tr = SharpnessTracker(model, loss_fn, data, every=1, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgeOfStabilityWarning)
        _train(model, loss_fn, data, opt, tr, 2)
    opt.param_groups[0]["lr"] = 2.2 / lam  # ratio 1.1: beyond the limit
    with pytest.warns(EdgeOfStabilityWarning, match="crossed the stability limit"):
        _train(model, loss_fn, data, opt, tr, 1)
    assert abs(tr.history[-1].ratio - 1.1) < 1e-3
    with warnings.catch_warnings():  # still above: no repeated warning
        warnings.simplefilter("error", EdgeOfStabilityWarning)
        _train(model, loss_fn, data, opt, tr, 1)


def test_preconditioned_sharpness_for_adam_matches_dense():
    model, loss_fn, data, H = _quadratic(1)
    b1, b2, eps, lr = 0.9, 0.99, 1e-8, 0.01
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    tr = SharpnessTracker(
        model, loss_fn, data, every=3, optimizer=opt, generator=torch.Generator().manual_seed(0)
    )
    _train(model, loss_fn, data, opt, tr, 6)
    rec = tr.history[-1]
    st = opt.state[model.weight]
    t = float(st["step"])
    P = (1 - b1**t) * ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps).reshape(-1)
    Dm = torch.diag(P.rsqrt())
    ref = float(torch.linalg.eigvalsh(Dm @ H @ Dm)[-1])
    assert abs(rec.precond_lambda_max - ref) <= 1e-3 * ref
    assert abs(rec.precond_ratio - lr * ref / ((2 + 2 * b1) / (1 - b1))) <= 1e-3 * rec.precond_ratio
    got = adam_preconditioner(opt, [model.weight])
    torch.testing.assert_close(got[0], P)


def test_preconditioner_for_plain_sgd_is_refused():
    model, loss_fn, data, _ = _quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="adaptive optimizer"):
        SharpnessTracker(model, loss_fn, data, optimizer=opt, preconditioned=True)
    tr = SharpnessTracker(model, loss_fn, data, every=1, optimizer=opt)  # auto: none
    assert tr.step().precond_lambda_max is None


def test_csv_json_writer_and_plot(tmp_path):
    model, loss_fn, data = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    w = Writer()
    tr = SharpnessTracker(
        model,
        loss_fn,
        data,
        every=2,
        optimizer=opt,
        per_layer=True,
        csv_path=tmp_path / "s.csv",
        json_path=tmp_path / "s.json",
        writer=w,
    )
    _train(model, loss_fn, data, opt, tr, 6)
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for row, rec in zip(rows, tr.history):
        assert float(row["lambda_max"]) == rec.lambda_max
        assert float(row["ratio"]) == rec.ratio
        assert float(row["lambda_max/0"]) == rec.layer_lambda_max["0"]
        assert row["precond_lambda_max"] == ""
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["every"] == 2 and len(doc["history"]) == 3
    assert doc["history"][1]["lambda_max"] == tr.history[1].lambda_max
    tags = {c[0] for c in w.calls}
    assert {"sharpness/lambda_max", "sharpness/ratio", "sharpness/lambda_max/2"} <= tags
    assert ("sharpness/lambda_max", tr.history[0].lambda_max, 2) in w.calls
    pytest.importorskip("matplotlib")
    fig = tr.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert len(fig.axes) == 3
    from hesse.plot import plot_sharpness

    plot_sharpness({"a": tr, "b": tr.history}, tmp_path / "two.png")
    assert (tmp_path / "two.png").exists()


def test_lightning_callback_or_clear_error():
    model, loss_fn, data = _mlp()
    tr = SharpnessTracker(model, loss_fn, data, every=1, lr=0.1)
    try:
        import lightning  # noqa: F401
    except ImportError:
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="Lightning"):
                lightning_callback(tr)
            return
    cb = tr.lightning_callback()

    class Module:
        def __init__(self):
            self.logged = {}

        def log(self, k, v):
            self.logged[k] = v

    m = Module()
    cb.on_train_batch_end(None, m, None, None, 0)
    assert tr.num_steps == 1 and "sharpness/lambda_max" in m.logged


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"every": 0}, ValueError, "every"),
        ({"lr": -0.1}, ValueError, "lr"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"optimizer": "sgd"}, TypeError, "optimizer"),
        ({"curvature": "hess"}, ValueError, "curvature"),
        ({"preconditioned": "yes"}, ValueError, "preconditioned"),
    ],
)
def test_bad_input(kwargs, exc, match):
    model, loss_fn, data = _mlp()
    with pytest.raises(exc, match=match):
        SharpnessTracker(model, loss_fn, data, **kwargs)


def test_recorded_loss_is_the_measurement_batch_loss():
    model, loss_fn, data = _mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for kw in ({}, {"weight_decay": 0.1}):
        tr = SharpnessTracker(model, loss_fn, data, every=1, optimizer=opt, **kw)
        _train(model, loss_fn, data, opt, tr, 2)
        with torch.no_grad():
            ref = float(loss_fn(model(data[0]), data[1]))
        if kw:
            ref += 0.05 * float(sum(p.detach().pow(2).sum() for p in model.parameters()))
        assert abs(tr.history[-1].loss - ref) < 1e-12 * max(1.0, abs(ref))


def test_preconditioned_sharpness_for_rmsprop_and_auto_fallback():
    model, loss_fn, data, H = _quadratic(2)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-8)
    tr = SharpnessTracker(
        model, loss_fn, data, every=2, optimizer=opt, generator=torch.Generator().manual_seed(0)
    )
    _train(model, loss_fn, data, opt, tr, 4)
    P = opt.state[model.weight]["square_avg"].sqrt().reshape(-1) + 1e-8
    Dm = torch.diag(P.rsqrt())
    ref = float(torch.linalg.eigvalsh(Dm @ H @ Dm)[-1])
    rec = tr.history[-1]
    assert abs(rec.precond_lambda_max - ref) <= 1e-3 * ref
    assert abs(rec.precond_ratio - 0.01 * ref / 2) <= 1e-3 * rec.precond_ratio
    # two learning rates: 'auto' warns once and carries on without the preconditioned value
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 1)).double()
    groups = [{"params": [net[0].weight], "lr": 0.01}, {"params": [net[0].bias], "lr": 0.1}]
    opt2 = torch.optim.Adam(groups)
    X, y = data[0], data[1]
    tr2 = SharpnessTracker(net, loss_fn, (X, y), every=1, optimizer=opt2, lr=0.01)
    with pytest.warns(UserWarning, match="preconditioned sharpness disabled"):
        _train(net, loss_fn, (X, y), opt2, tr2, 2)
    assert tr2.history[-1].precond_lambda_max is None and tr2.history[-1].lambda_max > 0
    with pytest.raises(ValueError, match="common learning rate"):
        t3 = SharpnessTracker(net, loss_fn, (X, y), every=1, optimizer=opt2, preconditioned=True)
        t3.step()


def test_lightning_callback_with_a_stub_module(monkeypatch):
    import sys
    import types

    class Callback:  # the only thing the callback needs from Lightning
        pass

    pkg, sub = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
    sub.Callback = Callback
    pkg.pytorch = sub
    monkeypatch.setitem(sys.modules, "lightning", pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    model, loss_fn, data = _mlp()
    tr = SharpnessTracker(model, loss_fn, data, every=2, lr=0.1)
    cb = tr.lightning_callback()
    assert isinstance(cb, Callback)

    class Module:
        def __init__(self):
            self.logged = {}

        def log(self, k, v):
            self.logged[k] = v

    m = Module()
    cb.on_train_batch_end(None, m, None, None, 0)
    assert tr.num_steps == 1 and not m.logged  # no check on step 1 (every=2)
    cb.on_train_batch_end(None, m, None, None, 1)
    assert m.logged["sharpness/lambda_max"] == tr.history[0].lambda_max
    assert m.logged["sharpness/ratio"] == tr.history[0].ratio


def test_log_dir_without_tensorboard_warns(tmp_path):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    model, loss_fn, data = _mlp()
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        tr = SharpnessTracker(model, loss_fn, data, every=1, lr=0.1, log_dir=tmp_path / "tb")
    assert tr.writer is None and tr.step() is not None


# -- the lean warm start and the shared training graph ----------------------------------------


def _dense_op(spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=F64))
    return hesse.DenseOperator(Q @ torch.diag(torch.tensor(spectrum, dtype=F64)) @ Q.T), Q


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("seed", range(6))
def test_warm_start_against_the_spectrum(sign, seed):
    """From warm starts it certifies in a few products with a true error <= tol (and the
    rigorous residual bound: an eigenvalue within r); an exact eigenvector certifies at once
    (a Krylov space cannot see what its start lacks: that one need not be the extreme)."""
    spectrum = [5.0, 4.0, 2.0, 1.0, -1.0, -3.0, -6.0][:: int(sign)]
    A, Q = _dense_op(spectrum, seed)
    lam = max(spectrum) if sign > 0 else min(spectrum)
    evals = torch.tensor(spectrum, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    for noise in (1e-5, 1e-3, 1e-2):
        v0 = Q[:, 0] + noise * torch.randn(7, generator=g, dtype=F64)
        theta, u, m, bound, ok = _warm_start(A, v0, 1e-3, sign)
        assert ok and 1 <= m <= 8 and abs(float(u.norm()) - 1) < 1e-12
        assert abs(theta - lam) <= 1e-3 * abs(lam)
        assert bound <= 1e-3 * abs(theta)
        r = float((A.matvec(u) - theta * u).norm())
        assert float((evals - theta).abs().min()) <= r * (1 + 1e-9)
        if noise <= 1e-5:
            assert m == 1
    theta, _, m, bound, ok = _warm_start(A, Q[:, 3].clone(), 1e-3, sign)
    assert ok and m == 1 and abs(theta - spectrum[3]) < 1e-12 and bound < 1e-12


def _step_loop(model, loss_fn, data, opt, tr, steps, shared):
    X, y = data
    for _ in range(steps):
        opt.zero_grad()
        if shared:
            tr.backward()
        else:
            loss_fn(model(X), y).backward()
        opt.step()
        tr.step()


def test_backward_shares_the_training_graph_and_matches_plain_training():
    runs = {}
    for shared in (False, True):
        model, loss_fn, data = _mlp(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        tr = SharpnessTracker(
            model, loss_fn, data, every=4, optimizer=opt, generator=torch.Generator().manual_seed(0)
        )
        _step_loop(model, loss_fn, data, opt, tr, 13, shared)
        if shared:
            assert tr._shared and [r.step for r in tr.history] == [0, 4, 8, 12]
            H = dense_hessian(model, loss_fn, data)  # at the final parameters (step 13)
            rec = tr.measure()
            assert abs(rec.lambda_max - float(torch.linalg.eigvalsh(H)[-1])) <= 1e-3 * abs(
                rec.lambda_max
            )
        runs[shared] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), tr)
    (p0, t0), (p1, t1) = runs[False], runs[True]
    torch.testing.assert_close(p1, p0, rtol=1e-10, atol=1e-12)  # the same training run
    classic = {r.step: r for r in t0.history}
    for r in t1.history:
        assert r.converged
        if r.step in classic:  # the same parameters: the same lambda_max to tol
            c = classic[r.step]
            assert abs(r.lambda_max - c.lambda_max) <= 2e-3 * abs(c.lambda_max)
            assert abs(r.loss - c.loss) <= 1e-12


def test_backward_does_not_share_with_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.2), nn.Tanh(), nn.Linear(6, 3)).double()
    _, loss_fn, data = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = SharpnessTracker(model, loss_fn, data, every=2, optimizer=opt)
        _step_loop(model, loss_fn, data, opt, tr, 4, shared=True)
    assert not tr._shared and [r.step for r in tr.history] == [2, 4]


def test_warm_checks_with_weight_decay_match_dense():
    model, loss_fn, data = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tr = SharpnessTracker(
        model,
        loss_fn,
        data,
        every=3,
        optimizer=opt,
        weight_decay=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    _train(model, loss_fn, data, opt, tr, 9)
    lam = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, data))[-1]) + 0.1
    rec = tr.history[-1]
    assert rec.converged and abs(rec.lambda_max - lam) <= 1e-3 * lam
