"""Registry of tiny problems: small enough that a dense float64 Hessian costs milliseconds.

Each case builds ``(model, loss_fn, data)`` with ``data`` a list of at least two batches of
unequal size, in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, nn.Module, list]]
    likelihood: bool = True  # a loss FisherOperator supports


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(X, y, sizes=(7, 4)):
    out, i = [], 0
    for s in sizes:
        out.append((X[i : i + s], y[i : i + s]))
        i += s
    return out


def _mlp(d_in=5, hidden=4, d_out=3, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, d_out)).double()


def mlp_ce_mean():
    g = _gen(1)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return _mlp(), nn.CrossEntropyLoss(), _split(X, y)


def mlp_ce_sum():
    g = _gen(2)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    return _mlp(seed=1), nn.CrossEntropyLoss(reduction="sum"), _split(X, y)


def mlp_mse_mean():
    g = _gen(3)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randn(11, 2, generator=g, dtype=torch.float64)
    return _mlp(d_out=2, seed=2), nn.MSELoss(), _split(X, y)


def mlp_mse_sum():
    g = _gen(4)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randn(11, 2, generator=g, dtype=torch.float64)
    return _mlp(d_out=2, act=nn.Sigmoid, seed=3), nn.MSELoss(reduction="sum"), _split(X, y)


def mlp_bce_mean():
    g = _gen(5)
    X = torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(11, 2, generator=g) > 0.5).double()
    return _mlp(d_out=2, seed=4), nn.BCEWithLogitsLoss(), _split(X, y)


def cnn_ce_mean():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).double()
    g = _gen(6)
    X = torch.randn(9, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return model, nn.CrossEntropyLoss(), _split(X, y, (5, 4))


class Shared(nn.Module):
    """The same Linear applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def shared_ce_mean():
    torch.manual_seed(6)
    g = _gen(7)
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    return Shared().double(), nn.CrossEntropyLoss(), _split(X, y, (6, 4))


def layernorm_mse_mean():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = _gen(8)
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, generator=g, dtype=torch.float64)
    return model, nn.MSELoss(), _split(X, y, (3, 7))


CASES = [
    Case("mlp_ce_mean", mlp_ce_mean),
    Case("mlp_ce_sum", mlp_ce_sum),
    Case("mlp_mse_mean", mlp_mse_mean),
    Case("mlp_mse_sum", mlp_mse_sum),
    Case("mlp_bce_mean", mlp_bce_mean),
    Case("cnn_ce_mean", cnn_ce_mean),
    Case("shared_ce_mean", shared_ce_mean),
    Case("layernorm_mse_mean", layernorm_mse_mean),
]
CASE_IDS = [c.name for c in CASES]
