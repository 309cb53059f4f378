"""K-FAC and compression on a tiny Hugging Face GPT-2 (random init, no downloads, float64).

GPT-2 has ``Conv1D`` layers (weight ``(in, out)``), LayerNorms and a ``lm_head`` tied to the
token embedding ``wte``: with the old ``unsupported="skip"`` K-FAC covered 2 of its 28
parameters and OBS pruning failed with ``No parameter named 'lm_head.weight'``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
try:
    from transformers import GPT2Config, GPT2LMHeadModel
except Exception as e:  # e.g. a broken torchvision in the environment  # noqa: BLE001
    pytest.skip(f"transformers' GPT-2 does not import here: {e}", allow_module_level=True)

import hesse  # noqa: E402
from hesse import KFACOperator  # noqa: E402
from hesse.compress import compressible_weights, prune, quantize, sparsity_of  # noqa: E402
from hesse.operators.kfac import find_kfac_layers  # noqa: E402
from hesse.optim import KFAC  # noqa: E402

DT = torch.float64
V, T = 24, 6


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=V,
        n_positions=8,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(DT).eval()


def _batches(seed=0, sizes=(2, 1)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B in sizes:
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :2] = -100  # padding-like ignored targets
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lm_loss(model, batches):
    """Mean next-token cross-entropy over all valid targets of the data set (reference)."""
    tot, cnt = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        y = b["labels"][:, 1:]
        tot = tot + nn.functional.cross_entropy(
            logits.reshape(-1, V), y.reshape(-1), reduction="sum"
        )
        cnt += int((y != -100).sum())
    return tot / cnt


def test_kfac_covers_every_conv1d_and_the_tied_lm_head():
    model = _gpt2()
    layers, unfactored = find_kfac_layers(model)
    uses = {u.name: u.kind for layer in layers for u in layer.uses}
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and all(uses[n] == "conv1d_hf" for n in conv1d)
    tied = next(layer for layer in layers if layer.name == "transformer.wte")
    assert [u.name for u in tied.uses] == ["transformer.wte", "lm_head"]
    names = [n for n, _ in model.named_parameters()]
    covered = [n for layer in layers for n in layer.param_names]
    assert len(names) == 28 and len(covered) == 18  # the rest: 10 LayerNorm parameters
    assert all(".ln_" in n for n in unfactored) and len(unfactored) == 10


def test_kfac_operator_on_gpt2_is_batching_invariant_and_psd():
    model = _gpt2()
    data = _batches()
    K = KFACOperator(model, None, data)  # loss_fn=None: the causal-LM loss, -100 ignored
    merged = [
        {k: torch.cat([b[k] for b in data]) for k in data[0]}
    ]  # same data, one batch: the mean is over the valid targets of the whole data set
    K1 = KFACOperator(model, None, merged)
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(1), dtype=DT)
    Kv, K1v = K @ v, K1 @ v
    assert float((Kv - K1v).norm() / K1v.norm()) < 1e-10
    assert float(v @ Kv) > 0
    # the tied weight's block has both terms, and the lm_head term is not negligible
    (emb, head) = K.terms()[0]
    sl = K.param_slices()["transformer.wte.weight"]
    w = v[sl].reshape(V, 8).unsqueeze(0)
    from hesse.operators.kfac import kron_apply

    t_emb, t_head = kron_apply(*emb, w), kron_apply(*head, w)
    assert float(t_head.norm()) > 0.1 * float(t_emb.norm())
    assert float((Kv[sl] - (t_emb + t_head).reshape(-1)).norm()) < 1e-10 * float(Kv[sl].norm())


def test_kfac_optimizer_trains_gpt2():
    model = _gpt2(1)
    data = _batches(1, sizes=(4,))
    b = data[0]
    loss_fn = nn.CrossEntropyLoss()  # ignore_index=-100
    hesse._checks._warned.clear()
    with pytest.warns(UserWarning, match="10 parameter"):
        opt = KFAC(model, loss_fn, lr=0.1, damping=1e-2, fisher="mc", generator=torch.Generator())
    losses = []
    for _ in range(12):
        opt.zero_grad()
        logits = model(input_ids=b["input_ids"]).logits
        loss = loss_fn(logits[:, :-1].reshape(-1, V), b["labels"][:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert losses[-1] < 0.9 * losses[0]


def test_obs_and_magnitude_pruning_of_gpt2_keep_the_tie():
    data = _batches(2)
    base = _gpt2(2)
    loss0 = float(_lm_loss(base, data).detach())
    refs = compressible_weights(base)
    assert "transformer.wte.weight" in [r.name for r in refs]  # through lm_head
    results = {}
    for method in ("obs", "magnitude"):
        model = _gpt2(2)
        masks = prune(model, None, data, 0.3, method=method, scope="layer", num_steps=4)
        wte, head = model.transformer.wte, model.lm_head
        assert head.weight_orig is wte.weight_orig  # one tensor, one mask, both uses
        assert torch.equal(wte.weight_mask, head.weight_mask)
        assert torch.equal(wte.weight, head.weight)
        assert abs(float((wte.weight == 0).double().mean()) - 0.3) < 0.01
        assert abs(sparsity_of(model)["global"] - 0.3) < 0.01
        assert set(masks) == {r.name for r in refs}
        results[method] = float(_lm_loss(model, data).detach())
    # random init: both barely move the loss; OBS's compensation must not make it worse
    assert abs(results["obs"] - loss0) < 0.02 * loss0
    assert results["obs"] <= results["magnitude"] + 1e-3 * loss0


def test_quantization_of_gpt2_writes_the_tied_weight_once_on_its_grid():
    model = _gpt2(3)
    data = _batches(3)
    loss0 = float(_lm_loss(model, data).detach())
    res = quantize(model, data, bits=4, method="obs")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.wte.weight" in res.bits
    W = model.transformer.wte.weight.detach()  # (V, D): one 4-bit grid per row
    assert all(len(torch.unique(row)) <= 16 for row in W)
    C = model.transformer.h[0].mlp.c_fc.weight.detach()  # Conv1D (in, out): per out column
    assert all(len(torch.unique(col)) <= 16 for col in C.T)
    assert all(0 <= e < 1 for e in res.layer_error.values())
    assert abs(float(_lm_loss(model, data).detach()) - loss0) < 0.5 * loss0


def test_layerwise_obs_pruning_of_gpt2_per_output_channel_and_tied():
    """Layer-wise OBS on Conv1D ``(in, out)`` weights prunes every output channel (a column
    of the stored weight) to the sparsity; the tied wte/lm_head weight keeps one mask."""
    data = _batches(4)
    model = _gpt2(4)
    loss0 = float(_lm_loss(model, data).detach())
    prune(model, None, data, 0.5, method="obs", curvature="layerwise", scope="layer")
    wte, head = model.transformer.wte, model.lm_head
    assert head.weight_orig is wte.weight_orig and torch.equal(wte.weight, head.weight)
    C = model.transformer.h[0].mlp.c_fc.weight.detach()  # (in 8, out 32)
    assert bool(((C == 0).sum(0) == 4).all())
    assert bool(((wte.weight == 0).sum(1) == 4).all())  # rows of the output layer
    assert abs(sparsity_of(model)["global"] - 0.5) < 0.01
    assert float(_lm_loss(model, data).detach()) < 1.01 * loss0  # random init: +0.2%
