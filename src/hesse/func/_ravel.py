"""Ravel/unravel parameter dicts to and from flat vectors (``named_parameters()`` order)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["ravel", "unravel", "unravel_block", "ravel_block"]


def ravel(params: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (dict values in order, or a sequence) into one flat vector."""
    ts = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not ts:
        raise ValueError("Cannot ravel an empty parameter collection.")
    return torch.cat([t.reshape(-1) for t in ts])


def unravel(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector ``(n,)`` into tensors shaped like ``like`` (views into ``vec``)."""
    out, i = {}, 0
    for name, t in like.items():
        out[name] = vec[i : i + t.numel()].view(t.shape)
        i += t.numel()
    if i != vec.shape[0]:
        raise ValueError(f"Shape mismatch: expected a vector of length {i}, got {vec.shape[0]}.")
    return out


def unravel_block(V: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a block ``(n, k)`` into tensors of shape ``(k, *shape)`` (one per parameter)."""
    k = V.shape[1]
    sizes = [s.numel() for s in shapes]
    if k == 1:  # views of the column, no copy
        return [p.view(1, *s) for p, s in zip(V.reshape(-1).split(sizes), shapes)]
    return [p.reshape(k, *s) for p, s in zip(V.T.split(sizes, 1), shapes)]


def ravel_block(parts: Sequence[Tensor], k: int) -> Tensor:
    """Inverse of :func:`unravel_block`: tensors ``(k, *shape)`` to a block ``(n, k)``."""
    return torch.cat([p.reshape(k, -1) for p in parts], dim=1).T
