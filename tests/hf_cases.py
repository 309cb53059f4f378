"""Tiny Hugging Face models (random init from configs, no downloads) and their references.

Each case gives ``(model, batches, ref_loss)``: float64 models of a few hundred to ~1.5k
parameters, two dict batches of unequal size (language models padded with ``-100`` so the
batches hold unequal numbers of valid targets), and ``ref_loss(logits, labels)``, the loss
the model trains with written out with ``F.cross_entropy`` on the concatenated data
(checked against the model's own ``outputs.loss``). References for products are derived
from it independently of hesse: the Hessian by double backward through
``torch.func.functional_call`` on the flattened parameters, the GGN as the Hessian of the
loss of the *linearised* model ``f0 + J d`` at ``d = 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from hesse.objective import math_attention

D = torch.float64
V = 13  # vocabulary
T = 6  # sequence length
C = 3  # classes


def _lm_batches(g: torch.Generator) -> list[dict]:
    ids = torch.randint(0, V, (5, T), generator=g)
    mask = torch.ones(5, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[3, 2:] = 0
    mask[4, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]}
        for a, b in ((0, 3), (3, 5))
    ]


def _causal_ref(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _cls_ref(logits, labels):
    return F.cross_entropy(logits, labels)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2, n_inner=16,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return (
        GPT2LMHeadModel(cfg).double().eval(),
        _lm_batches(torch.Generator().manual_seed(1)),
        (_causal_ref),
    )


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(1)
    return (
        LlamaForCausalLM(cfg).double().eval(),
        _lm_batches(torch.Generator().manual_seed(2)),
        (_causal_ref),
    )


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=C,
    )  # fmt: skip
    torch.manual_seed(2)
    model = BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(3)
    batches = [
        {k: v for k, v in b.items() if k != "labels"} for b in _lm_batches(g)
    ]  # fmt: skip
    labels = torch.randint(0, C, (5,), generator=g)
    batches[0]["labels"], batches[1]["labels"] = labels[:3], labels[3:]
    return model, batches, _cls_ref


def _tokens_ref(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(5)
    model = BertForMaskedLM(cfg).double().eval()
    g = torch.Generator().manual_seed(6)
    batches = _lm_batches(g)
    for b in batches:  # predict ~40% of the tokens, the rest ignored
        keep = torch.rand(b["labels"].shape, generator=g) < 0.4
        b["labels"] = b["labels"].masked_fill(~keep, -100)
    return model, batches, _tokens_ref


def _image_batches(g: torch.Generator) -> list[dict]:
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=D)
    y = torch.randint(0, C, (5,), generator=g)
    return [{"pixel_values": x[a:b], "labels": y[a:b]} for a, b in ((0, 3), (3, 5))]


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=C,
    )  # fmt: skip
    torch.manual_seed(3)
    model = ViTForImageClassification(cfg).double().eval()
    return model, _image_batches(torch.Generator().manual_seed(4)), _cls_ref


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=1, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1],
        layer_type="basic", num_labels=C,
    )  # fmt: skip
    torch.manual_seed(4)
    model = ResNetForImageClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model.train()
        model(pixel_values=torch.randn(16, 1, 8, 8, generator=g, dtype=D))
        model.eval()
    return model, _image_batches(g), _cls_ref


HF_CASES: dict[str, Callable] = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "bert_mlm": bert_mlm,
    "vit": vit,
    "resnet": resnet,
}


def concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class Reference:
    """Independent float64 references for ``(model, batches, ref_loss)``."""

    def __init__(self, model, batches, ref_loss):
        self.model = model
        self.names = [k for k, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shapes = [params[k].shape for k in self.names]
        self.theta0 = torch.cat([params[k].detach().reshape(-1) for k in self.names])
        self.fixed = {k: v.detach() for k, v in model.named_buffers()}
        data = concat(batches)
        self.labels = data.pop("labels")
        self.inputs = data
        self.ref_loss = ref_loss

    def logits(self, theta):
        state, i = dict(self.fixed), 0
        for name, s in zip(self.names, self.shapes):
            state[name] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(self.model, state, (), self.inputs).logits

    def loss(self, theta):
        return self.ref_loss(self.logits(theta), self.labels)

    def model_loss(self):
        """The model's own training loss on the concatenated data (HF computes it)."""
        with torch.no_grad():
            return self.model(**self.inputs, labels=self.labels).loss

    def hessian_mm(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` by double backward of the reference loss."""
        with math_attention(), torch.enable_grad():
            theta = self.theta0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.loss(theta), theta, create_graph=True)
            cols = [torch.autograd.grad(g, theta, v, retain_graph=True)[0] for v in V.T]
        return torch.stack(cols, dim=1)

    def ggn_mm(self, V: torch.Tensor) -> torch.Tensor:
        """``G V``: the Hessian of ``ref_loss(f0 + J d)`` at ``d = 0`` (``J d`` by jvp)."""
        with math_attention(), torch.enable_grad():
            f0 = self.logits(self.theta0).detach()
            d = torch.zeros_like(self.theta0, requires_grad=True)
            Jd = torch.autograd.functional.jvp(self.logits, self.theta0, d, create_graph=True)[1]
            (g,) = torch.autograd.grad(self.ref_loss(f0 + Jd, self.labels), d, create_graph=True)
            cols = [torch.autograd.grad(g, d, v, retain_graph=True)[0] for v in V.T]
        return torch.stack(cols, dim=1)
