"""Batches and outputs as users have them, bad input at the door, models left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hesse
from hesse.testing import check_operator, dense_ggn, dense_hessian
from tests.cases import CASES, mlp_ce_mean, mlp_mse_mean

D = torch.float64


class DictModel(nn.Module):
    """A model called with keyword inputs that returns an HF-style output with .logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, input_ids, attention_mask=None):
        out = self.net(input_ids)
        if attention_mask is not None:
            out = out * attention_mask.unsqueeze(-1)
        return {"logits": out, "hidden": input_ids}


def _dict_data():
    model, loss_fn, data = mlp_ce_mean()
    dmodel = DictModel().double()
    dmodel.net.load_state_dict(model.state_dict())
    batches = [
        {"input_ids": X, "attention_mask": torch.ones(len(X), dtype=D), "labels": y}
        for X, y in data
    ]
    return model, dmodel, loss_fn, data, batches


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which warn_once messages were shown, so a test can see its own."""
    monkeypatch.setattr(hesse._checks, "_warned", set())


@pytest.mark.parametrize("curvature", list(hesse.operators.factory.CURVATURES))
def test_dict_batches_and_logits_outputs_match_tensor_batches(curvature, fresh_warnings):
    model, dmodel, loss_fn, data, batches = _dict_data()
    kw = {"num_samples": 3, "generator": torch.Generator().manual_seed(0)}
    kw = kw if curvature == "fisher_mc" else {}
    ref = hesse.curvature_operator(curvature, model, loss_fn, data, **kw).to_dense()
    kw = {"num_samples": 3, "generator": torch.Generator().manual_seed(0)}
    kw = kw if curvature == "fisher_mc" else {}
    with pytest.warns(UserWarning, match="logits"):
        op = hesse.curvature_operator(curvature, dmodel, loss_fn, batches, **kw)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-12)


def test_factory_names_have_one_meaning_each():
    model, loss_fn, data = mlp_ce_mean()
    kinds = {
        "hessian": (hesse.HessianOperator, None),
        "ggn": (hesse.GGNOperator, None),
        "fisher_exact": (hesse.FisherOperator, "exact"),
        "fisher_mc": (hesse.FisherOperator, "mc"),
        "fisher_empirical": (hesse.FisherOperator, "empirical"),
    }
    for name, (cls, kind) in kinds.items():
        op = hesse.curvature_operator(name, model, loss_fn, data)
        assert type(op) is cls and getattr(op, "kind", None) == kind
    assert type(hesse.curvature_operator(hesse.operators.Curvature.GGN, model, loss_fn, data)) is (
        hesse.GGNOperator
    )
    with pytest.raises(ValueError, match="Invalid curvature='fisher'; expected one of"):
        hesse.curvature_operator("fisher", model, loss_fn, data)


def test_single_dict_batch_micro_batching_and_output_adapter():
    model, dmodel, loss_fn, data, batches = _dict_data()
    X = torch.cat([b["input_ids"] for b in batches])
    one = {"input_ids": X, "attention_mask": torch.ones(len(X), dtype=D), "labels": X[:, 0] > 0}
    one["labels"] = torch.cat([y for _, y in data])
    H = hesse.HessianOperator(
        dmodel, loss_fn, one, output_adapter=lambda out: out["logits"], micro_batch_size=4
    )
    check_operator(H, dense_hessian(model, loss_fn, data))


def test_tuple_batches_need_an_explicit_adapter():
    model, loss_fn, data = mlp_mse_mean()
    triples = [(X[:, :3], X[:, 3:], y) for X, y in data]

    class Two(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner(torch.cat([a, b], dim=1))

    two = Two(model)
    with pytest.raises(TypeError, match=r"3-tuple.*batch_adapter=lambda b"):
        hesse.GGNOperator(two, loss_fn, triples)
    G = hesse.GGNOperator(two, loss_fn, triples, batch_adapter=lambda b: ((b[0], b[1]), b[2]))
    check_operator(G, dense_ggn(model, loss_fn, data))


# -- bad input at the door ---------------------------------------------------------------------


def test_bad_batches_and_outputs():
    model, dmodel, loss_fn, data, batches = _dict_data()
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match=r"'labels' key.*batch_adapter"):
        hesse.HessianOperator(dmodel, loss_fn, no_labels)

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match=r"tuple.*no 'logits'.*output_adapter"):
        hesse.HessianOperator(TupleOut().double(), loss_fn, data)
    with pytest.raises(ValueError, match="Batch 1 is empty"):
        hesse.HessianOperator(model, loss_fn, [data[0], (data[1][0][:0], data[1][1][:0])])


def test_bad_targets_name_the_batch_and_the_fix():
    model, loss_fn, data = mlp_ce_mean()
    (X0, y0), (X1, y1) = data
    with pytest.raises(TypeError, match=r"integer dtype.*batch 0.*y.long\(\)"):
        hesse.GGNOperator(model, loss_fn, [(X0, y0.double()), (X1, y1)])
    bad = y1.clone()
    bad[1] = 3
    with pytest.raises(ValueError, match=r"target 3 in batch 1 is out of range for 3 classes"):
        hesse.HessianOperator(model, loss_fn, [(X0, y0), (X1, bad)])
    bad[1] = -2
    H = hesse.HessianOperator(model, loss_fn, [(X0, y0), (X1, bad)], check_determinism=False)
    with pytest.raises(ValueError, match=r"target -2 in batch 1"):  # at the first product
        H @ torch.ones(H.shape[0], dtype=D)
    one_out = nn.Linear(5, 1).double()
    with pytest.raises(ValueError, match=r"over 1 class.*BCEWithLogitsLoss"):
        hesse.HessianOperator(one_out, loss_fn, [(X0, torch.zeros_like(y0))])
    mse_model, mse, mse_data = mlp_mse_mean()
    X, y = mse_data[0]
    with pytest.raises(ValueError, match=r"shape of the outputs.*\(7, 1\).*\(7,\).*unsqueeze"):
        hesse.HessianOperator(nn.Linear(5, 1).double(), mse, (X, y[:, 0]))
    with pytest.raises(ValueError, match="Every target of the data is ignored"):
        hesse.GGNOperator(model, loss_fn, (X0, torch.full_like(y0, -100)))


def test_second_pass_that_yields_nothing_is_an_error():
    model, loss_fn, data = mlp_ce_mean()

    class Once:
        def __init__(self):
            self.used = False

        def __iter__(self):
            if self.used:
                return iter([])
            self.used = True
            return iter(data)

    with pytest.raises(ValueError, match="no batches on its second pass"):
        hesse.HessianOperator(model, loss_fn, Once())
    H = hesse.HessianOperator(model, loss_fn, Once(), check_determinism=False)
    with pytest.raises(ValueError, match="yielded 0 batches on this pass but 2"):
        H @ torch.ones(H.shape[0], dtype=D)


def test_numpy_vectors_and_compiled_models_are_refused():
    model, loss_fn, data = mlp_ce_mean()
    H = hesse.HessianOperator(model, loss_fn, data)
    v = np.ones(H.shape[0])
    with pytest.raises(TypeError, match="torch.as_tensor"):
        H @ v
    with pytest.raises(TypeError, match="torch.as_tensor"):
        v @ H
    compiled = torch.compile(model)  # wrapping only; nothing is compiled until called
    with pytest.raises(TypeError, match=r"torch.compile.*model._orig_mod"):
        hesse.HessianOperator(compiled, loss_fn, data)


# -- models left as they were --------------------------------------------------------------------


def test_train_mode_leaves_batchnorm_statistics_and_every_flag_as_they_were(fresh_warnings):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh()).double()
    model = nn.Sequential(inner, nn.Linear(4, 3)).double()
    _, loss_fn, data = mlp_ce_mean()
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        model(data[0][0] * 3 + 1)
    inner.eval()  # an eval-mode submodule inside a train-mode wrapper
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    with pytest.warns(UserWarning, match="BatchNorm in train mode"):
        ops = [
            hesse.curvature_operator(c, model, loss_fn, data, train_mode=True)
            for c in ("hessian", "ggn", "fisher_exact")
        ]
    for op in ops:
        op @ torch.ones(op.shape[0], dtype=D)
        op.gradient()
        op.loss()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert {name: m.training for name, m in model.named_modules()} == flags
    # and the curvature is the train-mode (batch statistics) one, per batch
    H = hesse.HessianOperator(model, loss_fn, data[0], train_mode=True).to_dense()
    assert {name: m.training for name, m in model.named_modules()} == flags
    dense = dense_hessian(model, loss_fn, data[0], train_mode=True)
    assert {name: m.training for name, m in model.named_modules()} == flags  # the reference too
    torch.testing.assert_close(H, dense, rtol=1e-10, atol=1e-12)


# -- devices ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_batches_follow_a_cuda_model():
    model, loss_fn, data = mlp_ce_mean()
    ref = dense_ggn(model, loss_fn, data)
    model = model.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in ("hessian", "ggn", "fisher_exact", "fisher_empirical"):
        op = hesse.curvature_operator(name, model, loss_fn, data)  # data stays on the CPU
        assert op.device.type == "cuda"
        v = torch.ones(op.shape[0], dtype=D, device="cuda")
        assert (op @ v).device.type == "cuda"
    G = hesse.GGNOperator(model, loss_fn, data)
    torch.testing.assert_close(G.to_dense().cpu(), ref, rtol=1e-10, atol=1e-12)
    mc = hesse.FisherOperator(model, loss_fn, data, kind="mc", generator=g)
    assert (mc @ v).device.type == "cuda"
    with pytest.raises(ValueError, match="generator is on cpu"):
        hesse.FisherOperator(model, loss_fn, data, kind="mc", generator=torch.Generator())


def test_every_case_still_takes_the_default_adapters():
    for case in CASES:
        model, loss_fn, data = case.build()
        ob = hesse.Objective(model, loss_fn, data)
        assert ob.N == sum(len(y) for _, y in data)
        assert (ob.output_loss is not None) == case.likelihood


def test_loss_fn_none_needs_a_known_model():
    model, _, data = mlp_ce_mean()
    with pytest.raises(ValueError, match=r"loss_fn=None means the loss the model trains with"):
        hesse.HessianOperator(model, None, data)
