"""Digits (8x8 images, 10 classes, 1797 samples), shipped with the package.

``digits.npz`` is the "Optical Recognition of Handwritten Digits" test set (E. Alpaydin and
C. Kaynak, UCI Machine Learning Repository, 1998, CC BY 4.0), as distributed by scikit-learn
(``sklearn.datasets.load_digits``, BSD-3-Clause): ``images`` (1797, 64) uint8 pixels in
0..16 and ``target`` (1797,) uint8 labels. Shipping it avoids importing scikit-learn.

The default model is an MLP 64-32-10 with tanh (n = 2410 parameters) trained full-batch with
Adam from a fixed seed: deterministic, a second on a CPU core, and small enough that the
dense float64 Hessian is cheap to check against. Its trained float32 weights ship as
``digits_mlp_64-32-10_tanh.npz`` (what :func:`default_workload` returns for the default
arguments without training; ``tests/test_data.py`` retrains and compares).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["Workload", "default_workload", "load_digits_tensors", "make_mlp", "train_full_batch"]

_HERE = Path(__file__).parent
# default_workload arguments whose trained weights ship with the package
_SHIPPED = {(0, torch.float32, 300, (64, 32, 10), "tanh"): "digits_mlp_64-32-10_tanh.npz"}


def _npz(name: str) -> dict:
    import numpy as np

    with np.load(_HERE / name, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_digits_tensors(
    dtype: torch.dtype = torch.float32, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Standardised digits as ``((X_train, y_train), (X_test, y_test))``.

    Features are standardised with the training mean/std (constant pixels get std 1).
    The split is a fixed permutation from ``seed``.
    """
    d = _npz("digits.npz")
    X = torch.from_numpy(d["images"]).to(torch.float64)
    y = torch.from_numpy(d["target"]).to(torch.long)
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
    pretrained: bool | None = None,
) -> Workload:
    """The default digits MLP (64-32-10 tanh, cross-entropy) trained from ``seed``.

    Args:
        pretrained: load the shipped weights instead of training (``None``: when weights for
            these exact arguments ship, i.e. the defaults; ``True`` raises if they do not).
    """
    train, test = load_digits_tensors(dtype, seed=seed)
    model = make_mlp(widths, activation, seed=seed, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    shipped = _SHIPPED.get((seed, dtype, steps, tuple(widths), activation))
    if pretrained and shipped is None:
        raise ValueError(
            f"No shipped weights for seed={seed}, dtype={dtype}, steps={steps}, "
            f"widths={tuple(widths)}, activation={activation!r}; pass pretrained=None to train."
        )
    if shipped is not None and pretrained is not False:
        state = {k: torch.from_numpy(v) for k, v in _npz(shipped).items()}
        model.load_state_dict(state)
    else:
        train_full_batch(model, loss_fn, *train, steps=steps)
    name = f"digits-mlp-{'-'.join(map(str, widths))}-{activation}"
    return Workload(model, loss_fn, train, test, name)
