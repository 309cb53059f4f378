"""Shared validators and errors: one wording for every message (DESIGN.md section 5)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NonFiniteError",
    "check_positive",
    "check_nonnegative",
    "check_int",
    "check_probability",
    "check_choice",
    "check_vector",
    "check_finite",
    "warn_once",
]


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared. ``partial`` carries whatever was computed before it did."""

    def __init__(self, message: str, partial: Any = None):
        super().__init__(message)
        self.partial = partial


_LIKELY_CAUSES = (
    "Likely causes: a learning rate or step that blew up the parameters, inputs with NaN/inf, "
    "log/sqrt of a non-positive number in the model or loss, or float16/bfloat16 overflow "
    "(try dtype=torch.float64)."
)


def check_finite(x: Tensor, what: str, partial: Any = None) -> Tensor:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"Non-finite values (NaN/inf) in {what}. {_LIKELY_CAUSES}", partial)
    return x


def check_positive(value: float, name: str, *, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}={value!r}; must be a real number.")
    if not math.isfinite(value) or (value <= 0 if strict else value < 0):
        rel = "> 0" if strict else ">= 0"
        raise ValueError(f"Invalid {name}={value!r}; must be {rel}.")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    return check_positive(value, name, strict=False)


def check_int(value: int, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}={value!r}; must be an int.")
    if value < minimum or (maximum is not None and value > maximum):
        hi = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"Invalid {name}={value!r}; must be >= {minimum}{hi}.")
    return value


def check_probability(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not (0.0 < value < 1.0):
        raise ValueError(f"Invalid {name}={value!r}; must lie in (0, 1).")
    return float(value)


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    v = getattr(value, "value", value)
    if v not in choices:
        raise ValueError(
            f"Invalid {name}={value!r}; expected one of {', '.join(map(repr, choices))}."
        )
    return str(v)


def check_vector(
    v: Any, n: int, dtype: torch.dtype, device: torch.device, what: str = "vector"
) -> Tensor:
    """Validate a vector ``(n,)`` or block ``(n, k)`` for an operator of size ``n``."""
    if not isinstance(v, Tensor):
        raise TypeError(
            f"Expected a torch.Tensor {what} of shape (n,) or (n, k) with n={n}, got "
            f"{type(v).__name__}. Convert with torch.as_tensor(...)."
        )
    if v.ndim not in (1, 2) or v.shape[0] != n:
        raise ValueError(
            f"Shape mismatch: expected (n,) or (n, k) with n={n}, got {tuple(v.shape)}."
        )
    if v.dtype != dtype:
        raise TypeError(
            f"Dtype mismatch: operator is {dtype}, {what} is {v.dtype}. Use v.to({dtype})."
        )
    if v.device != device:
        raise ValueError(
            f"Device mismatch: operator is on {device}, {what} on {v.device}. Use v.to('{device}')."
        )
    return v


_warned: set[str] = set()


def warn_once(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """Emit ``message`` once per process."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, category, stacklevel=stacklevel)
