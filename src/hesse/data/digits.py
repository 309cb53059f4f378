"""Digits (8x8 images, 10 classes, 1797 samples) from scikit-learn, shipped offline.

The default model is an MLP 64-32-10 with tanh (n = 2410 parameters) trained full-batch with
Adam from a fixed seed: deterministic, a few seconds on a CPU core, and small enough that the
dense float64 Hessian is cheap to check against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Workload", "default_workload", "load_digits_tensors", "make_mlp", "train_full_batch"]


def load_digits_tensors(
    dtype: torch.dtype = torch.float32, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Standardised digits as ``((X_train, y_train), (X_test, y_test))``.

    Features are standardised with the training mean/std (constant pixels get std 1).
    The split is a fixed permutation from ``seed``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    X = ((X - mu) / sd).to(dtype)
    return (X[tr], y[tr]), (X[te], y[te])


def make_mlp(
    widths: Sequence[int] = (64, 32, 10),
    activation: str = "tanh",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """An MLP ``Linear -> act -> ... -> Linear`` initialised from ``seed``."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"Invalid activation={activation!r}; expected one of {list(acts)}.")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(acts[activation]())
        model = nn.Sequential(*layers).to(dtype)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def train_full_batch(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    steps: int = 300,
    lr: float = 0.01,
) -> list[float]:
    """Full-batch Adam (deterministic); returns the loss history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


@dataclass
class Workload:
    """A model with its loss and data: what ``hesse`` analyses when given nothing."""

    model: nn.Module
    loss_fn: nn.Module
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    name: str

    def accuracy(self, split: str = "test") -> float:
        X, y = self.test if split == "test" else self.train
        with torch.no_grad():
            return float((self.model(X).argmax(1) == y).double().mean())


def default_workload(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    steps: int = 300,
    widths: Sequence[int] = (64, 32, 10),
    activation: str = "tanh",
) -> Workload:
    """Train the default digits MLP (64-32-10 tanh, cross-entropy) from ``seed``."""
    train, test = load_digits_tensors(dtype, seed=seed)
    model = make_mlp(widths, activation, seed=seed, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    train_full_batch(model, loss_fn, *train, steps=steps)
    name = f"digits-mlp-{'-'.join(map(str, widths))}-{activation}"
    return Workload(model, loss_fn, train, test, name)
