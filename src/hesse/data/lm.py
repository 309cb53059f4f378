"""The embedded language-model workload: a small causal transformer on a shipped text corpus.

Corpus: docstrings of the top-level modules of CPython 3.11's standard library (PSF licence,
see ``LM_CORPUS_LICENSE`` below), collected once in sorted module order by
``python benchmarks/lm.py corpus`` (ASCII only, at most 4000 characters per module) and shipped
as ``lm_train.txt`` (355,520 characters, 1504 docstrings) and ``lm_test.txt`` (41,000
characters, 167 docstrings; every tenth docstring), so the data is identical on every machine
and Python version.

Tokens are characters: newline plus printable ASCII (``VOCAB``, 96 symbols). Sequences are
non-overlapping windows of ``context`` characters; the target of position ``t`` is the
character at ``t + 1``.

The model (:class:`CausalTransformer`) is a pre-norm GPT: token and learned position
embeddings, ``n_layers`` blocks of causal multi-head attention
(:func:`torch.nn.functional.scaled_dot_product_attention`, separate bias-free ``q``, ``k``,
``v``, ``o`` projections) and a GELU MLP (``fc1``, ``fc2``), LayerNorm, and an output layer
``head`` (an ``nn.Linear`` sharing the token embedding's tensor: tied). It maps ``(B, T)``
token ids to ``(B, T, V)`` logits. The default
(``d_model=64``, 4 layers, 4 heads, context 64) has 208,000 parameters; its weights, trained
by :func:`train_lm` from seed 0, ship as ``lm_weights.npz`` so that :func:`lm_workload` loads
in well under a second and gives the same model everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..func import OutputLoss
from .digits import Workload

__all__ = [
    "VOCAB",
    "CausalTransformer",
    "LMConfig",
    "LMWorkload",
    "decode",
    "encode",
    "lm_corpus",
    "lm_loss",
    "lm_sequences",
    "lm_workload",
    "train_lm",
    "unigram_loss",
]

LM_CORPUS_LICENSE = (
    "The LM corpus consists of docstrings from the Python 3.11 standard library, "
    "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved; distributed "
    "under the PSF License Agreement (https://docs.python.org/3/license.html)."
)

VOCAB = "\n" + "".join(chr(i) for i in range(32, 127))
_INDEX = {c: i for i, c in enumerate(VOCAB)}
_WEIGHTS = "lm_weights.npz"


def encode(text: str) -> Tensor:
    """Token ids ``(len(text),)`` of ``text`` (characters outside ``VOCAB`` raise)."""
    try:
        return torch.tensor([_INDEX[c] for c in text], dtype=torch.long)
    except KeyError as e:
        raise ValueError(
            f"Character {e.args[0]!r} is not in the LM vocabulary (newline and printable "
            "ASCII); replace tabs and non-ASCII characters first."
        ) from None


def decode(tokens: Tensor) -> str:
    """The text of a 1-D tensor of token ids."""
    return "".join(VOCAB[int(i)] for i in tokens.reshape(-1))


def lm_corpus(split: str = "train") -> str:
    """The shipped corpus text, ``split`` in ``{"train", "test"}``."""
    if split not in ("train", "test"):
        raise ValueError(f"Invalid split={split!r}; expected 'train' or 'test'.")
    return resources.files(__package__).joinpath(f"lm_{split}.txt").read_text(encoding="ascii")


def lm_sequences(text: str, context: int = 64) -> tuple[Tensor, Tensor]:
    """Non-overlapping next-character windows: ``(X, y)``, both ``(N, context)`` long.

    ``y[i, t]`` is the character after ``X[i, t]``; a tail shorter than ``context + 1`` is
    dropped.
    """
    ids = encode(text)
    n = (ids.numel() - 1) // context
    if n < 1:
        raise ValueError(f"Text of {len(text)} characters is shorter than context+1={context + 1}.")
    X = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return X, y


def unigram_loss(
    train_targets: Tensor, eval_targets: Tensor, vocab_size: int = len(VOCAB)
) -> float:
    """Cross-entropy (nats/token) of ``eval_targets`` under the add-one-smoothed character
    frequencies of ``train_targets``: the baseline a model must beat."""
    counts = torch.bincount(train_targets.reshape(-1), minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[eval_targets.reshape(-1)].mean())


def lm_loss() -> OutputLoss:
    """The LM loss: mean cross-entropy (nats/token) of ``(B, T, V)`` logits against ``(B, T)``
    next-character targets, i.e. ``hesse.func.OutputLoss("ce", class_dim=-1)`` (the mean is
    over all target tokens of the data set in :class:`hesse.Objective`)."""
    return OutputLoss("ce", class_dim=-1)


@dataclass(frozen=True)
class LMConfig:
    """Shape of a :class:`CausalTransformer`."""

    vocab_size: int = len(VOCAB)
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    context: int = 64
    mlp_ratio: int = 4


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} must be divisible by n_heads={heads}.")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2)

        h = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(h.transpose(1, 2).reshape(B, T, d))


class _MLP(nn.Module):
    def __init__(self, d: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(d, ratio * d, bias=False)
        self.fc2 = nn.Linear(ratio * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = _MLP(cfg.d_model, cfg.mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Pre-norm causal transformer with tied input/output embeddings (see module docstring).

    Args:
        config: the :class:`LMConfig` (default: the shipped model's shape).
        seed: initialisation seed (GPT-2 style: ``N(0, 0.02)``, residual output projections
            ``o``/``fc2`` scaled by ``1 / sqrt(2 n_layers)``, LayerNorm ``(1, 0)``).

    Shapes: ``(B, T)`` long ids with ``T <= context`` -> ``(B, T, vocab_size)`` logits.
    """

    def __init__(self, config: LMConfig | None = None, *, seed: int = 0):
        super().__init__()
        cfg = self.config = config or LMConfig()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # the output layer is a module sharing the embedding's tensor, so the layer registry
        # (hesse.operators.kfac) sees both uses of the tied weight
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self._register_load_state_dict_pre_hook(_tied_head_key)
        g = torch.Generator().manual_seed(seed)
        resid = 0.02 / math.sqrt(2 * cfg.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    std = resid if name.endswith(("o.weight", "fc2.weight")) else 0.02
                    p.normal_(0.0, std, generator=g)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.config.context:
            raise ValueError(f"Sequence length {T} exceeds the context {self.config.context}.")
        x = self.tok(idx) + self.pos.weight[:T]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _tied_head_key(state: dict, prefix: str, *_: Any) -> None:
    """State dicts saved before the head was a module lack ``head.weight`` (= ``tok.weight``)."""
    if prefix + "head.weight" not in state and prefix + "tok.weight" in state:
        state[prefix + "head.weight"] = state[prefix + "tok.weight"]


class LMWorkload(Workload):
    """:class:`~hesse.data.Workload` of a language model (outputs ``(B, T, V)``).

    ``train`` is a fixed analysis sample of the training sequences (the model was trained on
    all of them); ``test`` is the whole held-out split.
    """

    def accuracy(self, split: str = "test") -> float:
        """Next-character accuracy."""
        X, y = self.test if split == "test" else self.train
        with torch.no_grad():
            return float((self.model(X).argmax(-1) == y).double().mean())

    def loss(self, split: str = "test") -> float:
        """Mean cross-entropy in nats/token."""
        X, y = self.test if split == "test" else self.train
        with torch.no_grad():
            return float(self.loss_fn(self.model(X), y))

    def unigram_loss(self, split: str = "test") -> float:
        """The unigram baseline (nats/token) on ``split``, frequencies from the training text."""
        _, y_all = lm_sequences(lm_corpus("train"), self.model.config.context)
        return unigram_loss(y_all, (self.test if split == "test" else self.train)[1])


def train_lm(
    model: CausalTransformer,
    X: Tensor,
    y: Tensor,
    *,
    steps: int = 1200,
    batch_size: int = 32,
    lr: float = 6e-3,
    weight_decay: float = 0.01,
    warmup: int = 50,
    seed: int = 0,
) -> list[float]:
    """Deterministic AdamW training on random minibatches (fixed generator), linear warm-up
    then cosine decay to 10% of ``lr``. Returns the minibatch loss history."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def schedule(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        c = (t - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * c))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    loss_fn = lm_loss()
    history = []
    model.train()
    for _ in range(steps):
        i = torch.randint(len(X), (batch_size,), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(X[i]), y[i])
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
    model.eval()
    return history


def _weights_path() -> Any:
    return resources.files(__package__).joinpath(_WEIGHTS)


def save_lm_weights(model: CausalTransformer, path: Any, **meta: Any) -> None:
    """Write ``model``'s config and float32 weights to an ``.npz`` (no pickle)."""
    arrays = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    info = {"config": asdict(model.config), **meta}
    np.savez_compressed(path, __meta__=np.array(json.dumps(info)), **arrays)


def load_lm_weights(path: Any = None) -> tuple[CausalTransformer, dict[str, Any]]:
    """The model stored at ``path`` (default: the shipped weights) and its metadata."""
    with _weights_path().open("rb") if path is None else open(path, "rb") as f:
        z = np.load(f, allow_pickle=False)
        meta = json.loads(str(z["__meta__"]))
        model = CausalTransformer(LMConfig(**meta["config"]))
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != "__meta__"}
    model.load_state_dict(state)
    return model.eval(), meta


def lm_workload(
    *,
    pretrained: bool = True,
    config: LMConfig | None = None,
    seed: int = 0,
    steps: int = 1200,
    num_train: int = 128,
    num_test: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LMWorkload:
    """The embedded LM workload: a :class:`CausalTransformer` on the stdlib-docstring corpus.

    Args:
        pretrained: load the shipped trained weights (default; ``config``, ``seed`` and
            ``steps`` must then be left at their defaults). ``False`` trains with
            :func:`train_lm` from ``seed`` (``steps=0``: the model at initialisation).
        config: model shape when training (default :class:`LMConfig`).
        num_train: number of training sequences in ``train`` (the analysis sample: the first
            ``num_train`` windows of the training text).
        num_test: number of held-out sequences in ``test`` (default all 640).
        dtype: dtype of the model.

    Returns:
        An :class:`LMWorkload` ``(model, loss_fn, train, test, name)`` with
        ``loss_fn = lm_loss()`` (mean nats/token over ``(B, T, V)`` logits).
    """
    if pretrained:
        if config is not None or seed != 0 or steps != 1200:
            raise ValueError(
                "The shipped LM weights are for config=None, seed=0, steps=1200; pass "
                "pretrained=False to train another model."
            )
        model, _ = load_lm_weights()
    else:
        model = CausalTransformer(config, seed=seed)
        if steps:
            train_lm(
                model,
                *lm_sequences(lm_corpus("train"), model.config.context),
                steps=steps,
                seed=seed,
            )
    model = model.to(dtype).eval()
    ctx = model.config.context
    Xtr, ytr = lm_sequences(lm_corpus("train"), ctx)
    Xte, yte = lm_sequences(lm_corpus("test"), ctx)
    cfg = model.config
    name = f"lm-transformer-d{cfg.d_model}-l{cfg.n_layers}-h{cfg.n_heads}-t{ctx}"
    return LMWorkload(
        model,
        lm_loss(),
        (Xtr[:num_train], ytr[:num_train]),
        (Xte[:num_test], yte[:num_test]),
        name,
    )
