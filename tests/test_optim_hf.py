"""AdaHessian and SophiaH on tiny Hugging Face models (random init, no downloads).

Their Hessian-vector products differentiate attention twice; the fused CPU attention kernels
have no double backward, so the optimizers run the closure on the math backend.
"""

from __future__ import annotations

import os

import pytest
import torch

from hesse.optim import AdaHessian, SophiaH

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
try:
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification
except Exception as e:  # e.g. a broken torchvision in the environment  # noqa: BLE001
    pytest.skip(f"transformers' Llama/ViT do not import here: {e}", allow_module_level=True)


def _llama():
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def _vit():
    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    return model, lambda m: m(pixel_values=x, labels=y).loss


@pytest.mark.parametrize("build", [_llama, _vit], ids=["llama", "vit"])
@pytest.mark.parametrize(
    "cls, kw", [(AdaHessian, dict(lr=0.05)), (SophiaH, dict(lr=0.01, update_interval=1))]
)
def test_diagonal_curvature_optimizers_step_hf_models(build, cls, kw):
    model, loss_of = build()
    model.train(False)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = cls(params, generator=torch.Generator().manual_seed(0), **kw)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert moved >= 0.9 * len(params)  # (almost) every parameter got a finite Hessian step
    assert all(bool(torch.isfinite(p).all()) for p in params)
    diag = [opt.state[p]["exp_avg"] for p in params]
    assert all(bool(torch.isfinite(d).all()) for d in diag)
