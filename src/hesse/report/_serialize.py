"""Result objects <-> plain data (JSON, or tensors for ``torch.load(weights_only=True)``).

A frozen result dataclass becomes ``{"__type__": name, field: value, ...}``; in JSON a tensor
becomes ``{"__tensor__": values, "dtype": ..., "shape": ...}`` with non-finite values as the
strings ``"nan"``, ``"inf"``, ``"-inf"``. Only the types registered here are rebuilt, so a
file can never name an arbitrary class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["pack", "unpack"]


def _types() -> dict[str, type]:
    from ..analysis.critical import CriticalPoint, SpectrumSummary, StoppingRule, TaylorCheck
    from ..analysis.landscape import LossSlice
    from ..linalg import EigenResult, SpectralDensity, TraceResult

    return {
        t.__name__: t
        for t in (
            EigenResult,
            SpectralDensity,
            TraceResult,
            LossSlice,
            TaylorCheck,
            CriticalPoint,
            StoppingRule,
            SpectrumSummary,
        )
    }


def _num(x: float) -> Any:
    return x if math.isfinite(x) else str(x)


def pack(obj: Any, *, json: bool = True, drop: tuple[str, ...] = ()) -> Any:
    """Plain data for ``obj`` (tensors kept as tensors when ``json=False``).

    ``drop`` names fields to leave out (e.g. ``"eigenvectors"`` to keep a JSON file small);
    they come back as ``None``.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"__type__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out[f.name] = None if f.name in drop else pack(v, json=json, drop=drop)
        return out
    if isinstance(obj, Tensor):
        if not json:
            return obj.detach().cpu()
        t = obj.detach().cpu()
        if t.dtype.is_floating_point:
            values = [_num(v) for v in t.double().reshape(-1).tolist()]
        else:
            values = t.reshape(-1).tolist()
        return {
            "__tensor__": values,
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
        }
    if isinstance(obj, dict):
        return {str(k): pack(v, json=json, drop=drop) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v, json=json, drop=drop) for v in obj]
    if isinstance(obj, float):
        return _num(obj) if json else obj
    return obj


def _float(v: Any) -> float:
    return float(v) if isinstance(v, str) else v


def unpack(data: Any) -> Any:
    """Inverse of :func:`pack`: registered result types and tensors rebuilt."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            dtype = getattr(torch, data["dtype"])
            vals = data["__tensor__"]
            if dtype.is_floating_point:
                vals = [_float(v) for v in vals]
            return torch.tensor(vals, dtype=dtype).reshape(data["shape"])
        if "__type__" in data:
            types = _types()
            name = data["__type__"]
            if name not in types:
                raise ValueError(f"Unknown result type {name!r} in a saved report.")
            cls = types[name]
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: unpack(v) for k, v in data.items() if k in names})
        return {k: unpack(v) for k, v in data.items()}
    if isinstance(data, list):
        return [unpack(v) for v in data]
    if isinstance(data, str) and data in ("nan", "inf", "-inf"):
        return float(data)
    return data
