"""The K-FAC layer registry: leading dims, ConvNd, HF Conv1D, tied weights, unfactored params.

Ground truth: where K-FAC is exact (deep linear networks with MSE, for any number of samples
and positions: ``g g^T`` is then the same for every sample and position), its blocks equal the
dense GGN blocks of :func:`hesse.testing.dense_ggn` (float64). For a tied weight the K-FAC
block is the sum of the terms of its uses; its reference is the GGN of the *untied* model
(the same values in two separate parameters), whose two diagonal blocks are summed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hesse
from hesse import KFACOperator
from hesse.operators.kfac import conv_patches, find_kfac_layers, nearest_kronecker
from hesse.optim import KFAC, KFACPreconditioner
from hesse.testing import check_operator, dense_ggn

DT = torch.float64


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _blocks(model, dense):
    """Dense sub-blocks per parameter name of a dense matrix in named_parameters order."""
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = slice(i, i + p.numel())
        i += p.numel()
    return out


def _layer_block(dense, sl, names):
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])
    return dense[idx][:, idx]


def test_linear_with_leading_dims_deep_linear_mse_is_exact():
    g = _gen(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    X = torch.randn(5, 3, 2, 3, generator=g, dtype=DT)  # two leading dims besides the batch
    y = torch.randn(5, 3, 2, 2, generator=g, dtype=DT)
    for loss_fn in (nn.MSELoss(), nn.MSELoss(reduction="sum")):
        K = KFACOperator(model, loss_fn, (X, y)).to_dense()
        G = dense_ggn(model, loss_fn, (X, y))
        sl = _blocks(model, G)
        for layer in ("0", "1"):
            names = [f"{layer}.weight", f"{layer}.bias"]
            assert rel(_layer_block(K, sl, names), _layer_block(G, sl, names)) < 1e-10


def test_expand_normalisation_against_independent_per_position_formula():
    """Nonlinear case: A = sum_{n,t} a a^T / (N T), G = sum_{n,t} c J_t^T H J_t (expand)."""
    g = _gen(1)
    torch.manual_seed(1)
    lin, rest = nn.Linear(3, 4).to(DT), nn.Sequential(nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model = nn.Sequential(lin, *rest)
    N, T = 4, 3
    X = torch.randn(N, T, 3, generator=g, dtype=DT)
    y = torch.randn(N, T, 2, generator=g, dtype=DT)
    A, G = KFACOperator(model, nn.MSELoss(), (X, y)).factors["0"]
    a = torch.cat([X, torch.ones(N, T, 1, dtype=DT)], -1).reshape(-1, 4)
    assert rel(A, a.T @ a / (N * T)) < 1e-12
    s = lin(X).detach().reshape(-1, 4)
    J = torch.func.vmap(torch.func.jacrev(rest))(s)  # (N T, 2, 4)
    ref = 2 * torch.einsum("mci,mcj->ij", J, J) / (N * T * 2)  # mean MSE over N*T*2 entries
    assert rel(G, ref) < 1e-12


def test_convnd_patches_reproduce_the_convolution():
    g = _gen(2)
    for conv, shape in [
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 2, 9)),
        (nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (2, 2, 6, 7)),
        (nn.Conv3d(2, 3, 2, stride=1, padding=1, dilation=2), (2, 2, 4, 3, 5)),
    ]:
        conv = conv.to(DT)
        x = torch.randn(*shape, generator=g, dtype=DT)
        rows = conv_patches(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        out = conv(x)
        ref = out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1])
        got = rows @ conv.weight.reshape(3, -1).T + conv.bias
        assert rel(got, ref) < 1e-12


def test_conv1d_and_conv3d_single_location_exact():
    g = _gen(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)).to(DT)
    data = (torch.randn(1, 2, 4, generator=g, dtype=DT), torch.tensor([1]))
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    G = hesse.GGNOperator(model, nn.CrossEntropyLoss(), data)
    assert rel(K.block("0").to_dense(), G.block("0").to_dense()) < 1e-10


# -- Hugging Face Conv1D (GPT-2), imported only here -------------------------------------
def _hf_conv1d():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


def test_hf_conv1d_deep_linear_and_single_sample_exact():
    Conv1D = _hf_conv1d()
    g = _gen(4)
    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(4, 3), Conv1D(2, 4)).to(DT)  # Conv1D(nf=out, nx=in)
    X = torch.randn(3, 5, 3, generator=g, dtype=DT)
    y = torch.randn(3, 5, 2, generator=g, dtype=DT)
    layers, skipped = find_kfac_layers(model)
    assert [u.kind for layer in layers for u in layer.uses] == ["conv1d_hf"] * 2
    assert skipped == []
    K = KFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    G = dense_ggn(model, nn.MSELoss(), (X, y))
    assert rel(K, G * _block_mask(model)) < 1e-10
    # nonlinear, one sample: exact too
    model = nn.Sequential(Conv1D(4, 3), nn.Tanh(), Conv1D(3, 4)).to(DT)
    data = (torch.randn(1, 3, generator=g, dtype=DT), torch.tensor([2]))
    K = KFACOperator(model, nn.CrossEntropyLoss(), data)
    Gop = hesse.GGNOperator(model, nn.CrossEntropyLoss(), data)
    for layer in ("0", "2"):
        assert rel(K.block(layer).to_dense(), Gop.block(layer).to_dense()) < 1e-10
    check_operator(K)


def _block_mask(model):
    """1 on the diagonal blocks of each module's parameters, 0 elsewhere."""
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model]
    return torch.block_diag(*[torch.ones(s, s, dtype=DT) for s in sizes])


# -- tied weights ---------------------------------------------------------------------
class _TiedLM(nn.Module):
    """Embedding -> Linear -> output head sharing the embedding matrix (deep linear)."""

    def __init__(self, V=7, D=3, tied=True):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.mid(self.emb(idx)))


def _tied_problem(seed=5, N=4, T=3):
    g = _gen(seed)
    torch.manual_seed(seed)
    model = _TiedLM().to(DT)
    idx = torch.randint(0, 7, (N, T), generator=g)
    y = torch.randn(N, T, 7, generator=g, dtype=DT)
    return model, idx, y


def test_tied_weight_is_one_layer_with_both_uses_and_exact_per_use_blocks():
    model, idx, y = _tied_problem()
    layers, skipped = find_kfac_layers(model)
    assert [[u.name for u in layer.uses] for layer in layers] == [["emb", "head"], ["mid"]]
    assert skipped == []
    K = KFACOperator(model, nn.MSELoss(), (idx, y))
    Kt = K.block("emb").to_dense()  # the tied weight, 7 x 3
    # reference: the untied model with the same values; both uses' blocks summed
    untied = _TiedLM(tied=False).to(DT)
    untied.load_state_dict({**model.state_dict(), "head.weight": model.emb.weight.detach()})
    G = dense_ggn(untied, nn.MSELoss(), (idx, y))
    sl = _blocks(untied, G)
    ref = _layer_block(G, sl, ["emb.weight"]) + _layer_block(G, sl, ["head.weight"])
    assert rel(Kt, ref) < 1e-10
    # neither use alone (what dropping the second module gave) is close
    assert rel(_layer_block(G, sl, ["emb.weight"]), ref) > 0.1
    assert rel(_layer_block(G, sl, ["head.weight"]), ref) > 0.1
    check_operator(K)


def test_nearest_kronecker_matches_rearrangement_svd():
    g = _gen(6)

    def spd(n):
        M = torch.randn(n, n, generator=g, dtype=DT)
        return M @ M.T + 0.1 * torch.eye(n, dtype=DT)

    terms = [(spd(3), spd(2)), (torch.rand(3, generator=g, dtype=DT), spd(2))]
    L, R = nearest_kronecker(terms)
    S = sum(torch.kron(torch.diag(a) if a.ndim == 1 else a, b) for a, b in terms)
    # Van Loan: ||S - kron(L, R)||_F is minimal <=> rank-1 SVD of the rearranged S
    Rm = S.reshape(3, 2, 3, 2).permute(0, 2, 1, 3).reshape(9, 4)
    U, s, Vh = torch.linalg.svd(Rm)
    best = s[0] * torch.outer(U[:, 0], Vh[0])
    assert rel(torch.outer(L.reshape(-1), R.reshape(-1)), best) < 1e-10
    assert float(torch.linalg.eigvalsh(L).min()) > 0 and float(torch.linalg.eigvalsh(R).min()) > 0
    one = nearest_kronecker(terms[:1])
    assert one[0] is terms[0][0] and one[1] is terms[0][1]


def test_tied_inverse_and_preconditioner_use_the_nearest_kronecker_product():
    model, idx, y = _tied_problem(7)
    K = KFACOperator(model, nn.MSELoss(), (idx, y))
    L, R = nearest_kronecker(K.terms()[0])
    lam = 0.05
    block = torch.kron(L, R) + lam * torch.eye(21, dtype=DT)  # row-major 7 x 3 weight
    v = torch.randn(K.shape[0], generator=_gen(8), dtype=DT)
    got = K.inverse(lam) @ v
    sl = K.param_slices()["emb.weight"]
    assert rel(got[sl], torch.linalg.solve(block, v[sl])) < 1e-10
    # preconditioner: same statistics as the operator (sum reduction, one batch)
    model.zero_grad()
    loss_fn = nn.MSELoss()
    pre = KFACPreconditioner(model, loss_fn, fisher="exact", damping=lam)
    loss_fn(model(idx), y).backward()
    grad = model.emb.weight.grad.clone()
    pre.step()
    ref = torch.linalg.solve(block, grad.reshape(-1)).reshape(7, 3)
    assert rel(model.emb.weight.grad, ref) < 1e-10
    pre.remove()


def test_kfac_trains_tied_model():
    model, idx, y = _tied_problem(9, N=16)
    loss_fn = nn.MSELoss()
    opt = KFAC(model, loss_fn, lr=0.2, damping=1e-2, fisher="exact", generator=_gen(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(idx), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert model.head.weight is model.emb.weight  # still tied
    assert losses[-1] < 0.9 * losses[0]


# -- normalisation layers with the default policy -------------------------------------
class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean((2, 3)))


def test_batchnorm_resnet_trains_with_defaults_and_one_warning():
    g = _gen(10)
    torch.manual_seed(10)
    model = _ResNet()
    X = torch.randn(32, 1, 6, 6, generator=g)
    y = (X[:, 0, :3].mean((1, 2)) > 0).long() + (X[:, 0, 3:].mean((1, 2)) > 0).long()
    loss_fn = nn.CrossEntropyLoss()
    hesse._checks._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = KFAC(model, loss_fn, lr=0.1, damping=1e-2, generator=_gen(0))
    msgs = [str(w.message) for w in caught if "K-FAC" in str(w.message)]
    assert len(msgs) == 1 and "stem.1.weight" in msgs[0] and "block.4.bias" in msgs[0]
    assert "6 parameter(s)" in msgs[0]
    bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    before = [p.detach().clone() for p in bn]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert min(losses) < 0.8 * losses[0]
    assert all(not torch.equal(p, b) for p, b in zip(bn, before))  # normalisation trained
    # the operator with defaults too (eval mode: running statistics)
    model = model.double().eval()
    K = KFACOperator(model, loss_fn, (X.double()[:4], y[:4]))
    check_operator(K)


def test_pruned_layers_are_factored_through_weight_orig():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    torch.nn.utils.prune.random_unstructured(model[0], "weight", amount=0.5)
    layers, skipped = find_kfac_layers(model)
    assert [layer.weight_name for layer in layers] == ["0.weight_orig", "2.weight"]
    assert skipped == []


# -- sequence cross-entropy with ignore_index --------------------------------------------
def _lm(seed=11):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 6)).to(DT)


def _lm_data(seed=11):
    g = _gen(seed)
    data = []
    for B in (2, 1):
        ids = torch.randint(0, 6, (B, 5), generator=g)
        y = torch.randint(0, 6, (B, 5), generator=g)
        y[0, :2] = -100
        data.append((ids, y))
    return data


def test_sequence_ce_factors_closed_form_and_batching_invariant():
    from hesse.func import output_loss

    model, data = _lm(), _lm_data()
    loss_fn = output_loss(nn.CrossEntropyLoss(), class_dim=-1)  # logits (B, T, V)
    K = KFACOperator(model, loss_fn, data)
    A, G = K.factors["2"]
    ids = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    h = torch.tanh(model[0](ids)).reshape(-1, 3).detach()
    a = torch.cat([h, torch.ones(len(h), 1, dtype=DT)], 1)
    assert rel(A, a.T @ a / len(a)) < 1e-12  # every position the layer processes
    p = torch.softmax(model(ids), -1).reshape(-1, 6).detach()
    valid = y.reshape(-1) != -100
    H = torch.stack([torch.diag(q) - torch.outer(q, q) for q in p[valid]]).sum(0)
    assert rel(G, H / int(valid.sum())) < 1e-12  # mean over the valid targets of all data
    merged = [(ids, y)]
    K1 = KFACOperator(model, loss_fn, merged)
    v = torch.randn(K.shape[0], generator=_gen(1), dtype=DT)
    assert rel(K @ v, K1 @ v) < 1e-12
    # the preconditioner sees the same statistics through the loss call (ignore_index kept)
    ce = nn.CrossEntropyLoss(reduction="sum")
    pre = KFACPreconditioner(model, ce, fisher="exact")
    ce(model(ids).reshape(-1, 6), y.reshape(-1)).backward()
    pre.step()
    seq_sum = output_loss(ce, class_dim=-1)
    ref = KFACOperator(model, seq_sum, merged).factors["2"]
    assert rel(pre.factors[1][1], ref[1]) < 1e-12
    assert rel(pre.factors[1][1], H) < 1e-12
    pre.remove()
