"""Factories for the CLI tests (``--model tests/cli_fixtures.py:model`` and friends)."""

import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    return [(X[:20], y[:20]), (X[20:], y[20:])]


def wrong_data():
    return torch.randn(10, 7), torch.randint(0, 3, (10,))


def not_a_model():
    return "a string"


def unreduced_loss():
    return nn.CrossEntropyLoss(reduction="none")
