"""Losses in output space (hesse.func.OutputLoss) and sequence cross-entropy, exact.

Every curvature (Hessian, GGN, Fisher exact / MC / empirical) of cross-entropy over
``(N, C, T)`` outputs and over ``(B, T, V)`` language-model logits (causal shift), with
``ignore_index``, is checked against dense float64 references on the concatenated data,
where PyTorch's own mean over the valid targets is the ground truth.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import hesse
from hesse.func import OutputLoss, output_loss
from hesse.testing import check_operator, dense_ggn, dense_hessian
from hesse.testing.checks import concat_data

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- the closed forms against autograd --------------------------------------------------------

LOSSES = {
    "ce_2d": (lambda: output_loss(nn.CrossEntropyLoss()), (5, 3), "ce"),
    "ce_nct": (lambda: output_loss(nn.CrossEntropyLoss(reduction="sum")), (3, 4, 5), "ce"),
    "ce_lm": (lambda: OutputLoss("ce", class_dim=-1), (2, 5, 4), "ce"),
    "ce_causal": (lambda: OutputLoss("ce", class_dim=-1, shift=True), (2, 5, 4), "ce"),
    "mse": (lambda: output_loss(nn.MSELoss()), (4, 3), "mse"),
    "bce": (lambda: output_loss(nn.BCEWithLogitsLoss()), (4, 3), "bce"),
}


def _targets(loss, shape, g):
    if loss.kind == "mse":
        return torch.randn(shape, generator=g, dtype=D)
    if loss.kind == "bce":
        return (torch.rand(shape, generator=g) > 0.5).to(D)
    cd = 1 if loss.class_dim == 1 else len(shape) - 1
    C = shape[cd]
    tshape = [s for i, s in enumerate(shape) if i != cd]
    t = torch.randint(0, C, tshape, generator=g)
    t.view(-1)[::3] = -100  # every third target ignored
    return t


@pytest.mark.parametrize("name", list(LOSSES))
def test_output_loss_closed_forms_match_autograd(name):
    make, shape, _ = LOSSES[name]
    loss = make()
    g = _gen(0)
    f = torch.randn(shape, generator=g, dtype=D)
    t = _targets(loss, shape, g)
    loss.check(f, t)
    at = loss.at(f, t)
    n = f.numel()
    H = torch.autograd.functional.hessian(lambda o: loss.sum_loss(o, t), f).reshape(n, n)
    W = torch.randn(3, *shape, generator=g, dtype=D)
    torch.testing.assert_close(at.hessian_mp(W).reshape(3, n), W.reshape(3, n) @ H)
    # the square root, row by row (columns act on every row at once; H is block diagonal)
    S = at.hessian_sqrt().reshape(-1, n)
    rows = loss.rows(torch.arange(n).reshape(shape))  # output index of every row entry
    blocks = torch.zeros(n, n, dtype=D)
    for idx in rows:
        Si = S[:, idx]
        blocks[idx[:, None], idx[None, :]] = Si.T @ Si
    torch.testing.assert_close(blocks, H, atol=1e-12, rtol=1e-10)
    fg = f.clone().requires_grad_(True)
    grad = torch.autograd.grad(loss.sum_loss(fg, t), fg)[0]
    torch.testing.assert_close(at.grad(), grad)
    # per-row outer products: the rows partition the outputs, R = grad gives sum_m r_m r_m^T
    R = at.grad().unsqueeze(0)
    EF = at.outer_mp(R, W).reshape(3, n)
    ref = torch.zeros(n, n, dtype=D)
    r = grad.reshape(-1)
    for idx in rows:
        ref[idx[:, None], idx[None, :]] += torch.outer(r[idx], r[idx])
    torch.testing.assert_close(EF, W.reshape(3, n) @ ref)


def test_output_loss_values_and_counts_match_torch():
    g = _gen(1)
    f = torch.randn(3, 4, 5, generator=g, dtype=D)  # (N, C, T)
    t = torch.randint(0, 4, (3, 5), generator=g)
    t[0, :3] = -100
    ce = nn.CrossEntropyLoss()
    ol = output_loss(ce)
    torch.testing.assert_close(ol(f, t), ce(f, t))
    assert int(ol.count(t)) == 12
    lm = OutputLoss("ce", class_dim=-1, shift=True)
    logits = torch.randn(2, 4, 5, generator=g, dtype=D)
    labels = torch.tensor([[1, 2, 3, -100], [0, 1, -100, -100]])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(lm(logits, labels), ref)
    assert int(lm.count(labels)) == 3
    # the docstring example
    assert abs(float(lm(torch.zeros(2, 4, 5, dtype=D), labels)) - 1.6094379124341003) < 1e-12
    mse = output_loss(nn.MSELoss())
    y = torch.randn(4, 2, dtype=D)
    torch.testing.assert_close(mse(y * 2, y), nn.MSELoss()(y * 2, y))
    assert int(mse.count(y)) == 8


@pytest.mark.montecarlo
def test_sampled_grads_have_the_output_hessian_as_covariance():
    loss = OutputLoss("ce", class_dim=-1, shift=True)
    g = _gen(2)
    f = torch.randn(2, 3, 4, generator=g, dtype=D)
    t = torch.tensor([[0, 1, 2], [3, -100, 1]])
    at = loss.at(f, t)
    S = 20_000
    R = at.sampled_grads(S, _gen(3)).reshape(S, -1)
    n = f.numel()
    H = at.hessian_mp(torch.eye(n, dtype=D).reshape(n, *f.shape)).reshape(n, n)
    rows = loss.rows(torch.arange(n).reshape(f.shape))
    cov = torch.zeros(n, n, dtype=D)
    for idx in rows:  # per-row covariance (the MC Fisher never uses cross-row terms)
        Ri = R[:, idx]
        cov[idx[:, None], idx[None, :]] += Ri.T @ Ri / S
    # each entry of a covariance of bounded variables: stderr <= 1/sqrt(S); 4 stderr slack
    assert float((cov - H).abs().max()) < 4 / S**0.5
    assert float(R.mean(0).abs().max()) < 4 / S**0.5  # E[r] = 0


def test_output_loss_refuses_what_it_cannot_do():
    with pytest.raises(NotImplementedError, match="GGNOperator"):
        output_loss(nn.L1Loss())
    with pytest.raises(NotImplementedError, match="label smoothing"):
        output_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="shift=True needs"):
        OutputLoss("ce", shift=True)
    with pytest.raises(ValueError, match="class_dim and shift apply to CrossEntropyLoss"):
        output_loss(nn.MSELoss(), class_dim=-1)
    ce = output_loss(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"class_dim=-1"):  # LM logits with the (N, C) rule
        ce.check(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
    assert output_loss(ce) is ce
    assert output_loss(ce, class_dim=-1).class_dim == -1


# -- curvature of sequence losses, exact over the whole data set --------------------------------


class TinyLM(nn.Module):
    """Embedding -> causal running mean (positions interact) -> tanh -> linear head."""

    def __init__(self, V=5, d=3):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V)

    def forward(self, ids):
        e = self.emb(ids)
        T = ids.shape[1]
        run = e.cumsum(1) / torch.arange(1, T + 1, dtype=e.dtype).view(1, T, 1)
        return self.head(torch.tanh(self.mix(run)))


def lm_problem():
    torch.manual_seed(0)
    model = TinyLM().double()
    g = _gen(4)
    ids = torch.randint(0, 5, (5, 6), generator=g)
    labels = ids.clone()
    labels[0, 4:] = -100  # padding: unequal numbers of valid targets per batch
    labels[3, 2:] = -100
    labels[4, 5:] = -100
    data = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]

    def ref(out, y):  # what PyTorch computes on the concatenated data
        return F.cross_entropy(out[:, :-1].reshape(-1, 5), y[:, 1:].reshape(-1))

    return model, OutputLoss("ce", class_dim=-1, shift=True), data, ref


def nct_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 4, 1)).double()
    g = _gen(5)
    X = torch.randn(5, 2, 6, generator=g, dtype=D)
    y = torch.randint(0, 4, (5, 6), generator=g)
    y[1, :4] = -100
    y[4, ::2] = -100
    return model, nn.CrossEntropyLoss(), [(X[:3], y[:3]), (X[3:], y[3:])], nn.CrossEntropyLoss()


PROBLEMS = {"lm_causal": lm_problem, "nct": nct_problem}


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_sequence_ce_hessian_ggn_fisher_match_dense(name):
    model, loss, data, ref = PROBLEMS[name]()
    Hd = dense_hessian(model, ref, data)
    Gd = dense_ggn(model, ref, data)
    check_operator(hesse.HessianOperator(model, loss, data), Hd)
    check_operator(hesse.HessianOperator(model, loss, data, mode="fwd-rev"), Hd)
    check_operator(hesse.GGNOperator(model, loss, data), Gd)
    check_operator(hesse.FisherOperator(model, loss, data), Gd)
    # the batching does not matter (valid counts differ between batches)
    whole = hesse.GGNOperator(model, loss, concat_data(data))
    torch.testing.assert_close(whole.to_dense(), Gd, rtol=1e-10, atol=1e-12)
    micro = hesse.HessianOperator(model, loss, data, micro_batch_size=1)
    torch.testing.assert_close(micro.to_dense(), Hd, rtol=1e-10, atol=1e-12)


def _per_token_grads(model, loss, data):
    """Gradient of every valid token's loss term, by plain autograd (one pass per token)."""
    params = list(model.parameters())
    grads = []
    for X, y in data:
        out = model(X)
        rows = loss.rows(out)
        t = loss._shift_targets(y).reshape(-1)
        for m in range(rows.shape[0]):
            if t[m] == -100:
                continue
            lm = F.cross_entropy(rows[m : m + 1], t[m : m + 1], reduction="sum")
            g = torch.autograd.grad(lm, params, retain_graph=True)
            grads.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(grads)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_empirical_fisher_is_per_token(name):
    model, loss, data, _ = PROBLEMS[name]()
    Gs = _per_token_grads(model, output_loss(loss), data)
    F_emp = hesse.FisherOperator(model, loss, data, kind="empirical")
    assert F_emp.objective.count == Gs.shape[0]
    check_operator(F_emp, Gs.T @ Gs / Gs.shape[0])


@pytest.mark.montecarlo
def test_mc_fisher_of_sequences_converges_to_exact():
    model, loss, data, _ = lm_problem()
    exact = hesse.FisherOperator(model, loss, data).to_dense()
    errs = []
    for S in (50, 5000):
        mc = hesse.FisherOperator(
            model, loss, data, kind="mc", num_samples=S, generator=_gen(0)
        ).to_dense()
        errs.append(float((mc - exact).norm() / exact.norm()))
    # Monte-Carlo error falls like 1/sqrt(S): 100x the samples, ~10x smaller error.
    assert errs[1] < 0.05
    assert errs[1] < errs[0] / 3


def test_ggn_and_fisher_for_ce_never_evaluate_the_loss(monkeypatch):
    """Closed forms: no create_graph through log_softmax (big vocabularies stay cheap)."""
    model, loss, data, ref = lm_problem()
    Gd = dense_ggn(model, ref, data)

    def boom(*args, **kwargs):
        raise AssertionError("cross_entropy evaluated")

    monkeypatch.setattr(F, "cross_entropy", boom)
    for op in (hesse.GGNOperator, hesse.FisherOperator):
        A = op(model, loss, data)
        torch.testing.assert_close(A.to_dense(), Gd, rtol=1e-10, atol=1e-12)


def test_ggn_product_peak_memory_at_a_large_vocabulary():
    """Issue 14.5: with a vocabulary much wider than the model, a GGN-vector product (its
    first, which also builds the output graph) allocates at most 1.5x what a gradient does.
    Allocations are counted exactly (every new tensor storage), so the ratio is the same on
    every run; before the lean output graph it was about 2.2x."""
    from hesse.analysis.preflight import AllocationTracker

    V, d, B, T = 3000, 8, 2, 64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, d), nn.Tanh(), nn.Linear(d, V), nn.Flatten(0, 1))
    g = _gen(0)
    data = (torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B * T,), generator=g))
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    peaks = {}
    for name in ("gradient", "ggn"):
        op = hesse.curvature_operator(
            "hessian" if name == "gradient" else name, model, nn.CrossEntropyLoss(), data
        )
        with AllocationTracker() as tr:
            op.gradient() if name == "gradient" else op @ v
        peaks[name] = tr.peak
    logits = B * T * V * 4
    assert peaks["gradient"] >= 3 * logits  # the workload is vocabulary-dominated
    assert peaks["ggn"] <= 1.5 * peaks["gradient"], peaks
