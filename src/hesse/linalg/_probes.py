"""Random probe blocks for randomized linear algebra (trace, diagonal, SLQ, sketches).

Every function draws from an explicit ``torch.Generator`` (or a fresh, non-global stream when
``generator=None``), never touching the global RNG. Rademacher probes are exactly ``+-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_choice, check_int

__all__ = ["rademacher", "gaussian", "probes", "PROBE_KINDS"]

PROBE_KINDS = ("rademacher", "gaussian")


def _gen(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator:
    """The caller's generator, or a fresh seeded one (never the global RNG)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        return generator
    g = torch.Generator(device=torch.device(device))
    g.seed()
    return g


def rademacher(
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """An ``(n, k)`` block of independent Rademacher signs, each exactly ``-1`` or ``+1``.

    Drawn as random bits (``torch.randint``) mapped to ``2 b - 1``, so the values are exact in
    every floating dtype.

    Args:
        n: rows (operator size).
        k: columns (number of probes).
        dtype, device: of the result.
        generator: source of randomness; ``None`` draws a fresh seed (never the global RNG).

    Returns:
        Tensor ``(n, k)`` with entries in ``{-1, +1}``.
    """
    check_int(n, "n", minimum=1)
    check_int(k, "k", minimum=1)
    g = _gen(generator, device)
    bits = torch.randint(0, 2, (n, k), generator=g, device=g.device, dtype=torch.int8)
    return (2 * bits - 1).to(dtype=dtype, device=device)


def gaussian(
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """An ``(n, k)`` block of independent standard normal entries."""
    check_int(n, "n", minimum=1)
    check_int(k, "k", minimum=1)
    g = _gen(generator, device)
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(n, k, generator=g, device=g.device, dtype=work).to(
        dtype=dtype, device=device
    )


def probes(
    kind: str,
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``rademacher`` or ``gaussian`` by name (``kind`` may be a ``str`` Enum)."""
    kind = check_choice(kind, "probe", PROBE_KINDS)
    fn = rademacher if kind == "rademacher" else gaussian
    return fn(n, k, dtype, device, generator)
