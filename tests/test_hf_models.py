"""Hugging Face models nobody here wrote (tiny random configs, no downloads), float64.

``loss_fn=None`` means the loss each model trains with; Hessian, GGN and exact Fisher
products on its own dict batches match independent references (tests/hf_cases.py).
"""

from __future__ import annotations

import os

import pytest
import torch

import hesse
from hesse.objective import math_attention
from tests.hf_cases import HF_CASES, Reference

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

D = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def build(name):
    """The case, or a skip when this transformers install cannot import the model (a
    broken optional dependency such as a torchvision built for another torch)."""
    try:
        return HF_CASES[name]()
    except ImportError as e:
        pytest.skip(f"transformers cannot import the {name} model here: {e}")


@pytest.fixture(scope="module", params=list(HF_CASES))
def case(request):
    model, batches, ref_loss = build(request.param)
    return request.param, model, batches, Reference(model, batches, ref_loss)


def test_default_loss_is_the_models_own_training_loss(case):
    name, model, batches, ref = case
    own = ref.model_loss().double()  # HF computes causal-LM losses in float32
    tol = 1e-6 if ref.model_loss().dtype == torch.float32 else 1e-12
    mine = ref.loss(ref.theta0).detach()
    torch.testing.assert_close(mine, own, rtol=tol, atol=tol)
    H = hesse.HessianOperator(model, None, batches)
    torch.testing.assert_close(H.loss(), mine, rtol=1e-12, atol=1e-14)
    if name in ("gpt2", "llama"):  # mean over the valid targets of the whole data set
        assert H.objective.count == int((ref.labels[:, 1:] != -100).sum())
    if name == "bert_mlm":
        assert H.objective.count == int((ref.labels != -100).sum())


def test_hessian_ggn_fisher_products_match_references(case):
    name, model, batches, ref = case
    n = ref.theta0.numel()
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    # HF Llama runs RMSNorm in float32 even in a float64 model (rounding ~1e-8 in both paths)
    tol = 1e-6 if name == "llama" else 1e-9
    H = hesse.HessianOperator(model, None, batches)
    assert _rel(H @ V, ref.hessian_mm(V)) < tol
    G_ref = ref.ggn_mm(V)
    for curvature in ("ggn", "fisher_exact"):
        op = hesse.curvature_operator(curvature, model, None, batches)
        assert _rel(op @ V, G_ref) < tol, curvature
    assert model.training is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpt2_products_on_cuda():
    model, batches, ref_loss = build("gpt2")
    ref = Reference(model, batches, ref_loss)
    V = torch.randn(ref.theta0.numel(), 2, generator=torch.Generator().manual_seed(0), dtype=D)
    expected = ref.ggn_mm(V)
    model = model.cuda()  # the batches stay on the CPU and follow the model
    G = hesse.GGNOperator(model, None, batches)
    assert _rel((G @ V.cuda()).cpu(), expected) < 1e-9


def test_gpt2_empirical_fisher_is_per_token():
    model, batches, ref_loss = build("gpt2")
    ref = Reference(model, batches, ref_loss)
    labels = ref.labels[:, 1:].reshape(-1)
    valid = labels != -100

    def token_nll(theta):  # one loss term per valid token
        rows = ref.logits(theta)[:, :-1].reshape(-1, ref.logits(theta).shape[-1])[valid]
        return torch.nn.functional.cross_entropy(rows, labels[valid], reduction="none")

    with math_attention():
        g = torch.autograd.functional.jacobian(token_nll, ref.theta0)  # (tokens, n)
    V = torch.randn(ref.theta0.numel(), 2, generator=torch.Generator().manual_seed(1), dtype=D)
    E = hesse.curvature_operator("fisher_empirical", model, None, batches)
    assert _rel(E @ V, g.T @ (g @ V) / g.shape[0]) < 1e-9
