"""Plain-JSON persistence of result objects (no pickle: loading a file never runs code).

Every result dataclass that derives from :class:`Serializable` gets ``to_dict()`` /
``from_dict()`` and ``save(path)`` / ``load(path)``. Values are encoded as JSON:

* ``None``, ``bool``, ``int``, ``str`` and finite ``float`` as themselves; a non-finite float
  as ``{"__float__": "nan" | "inf" | "-inf"}`` (the file stays strict JSON);
* a tensor as ``{"__tensor__": dtype, "shape": [...], "data": [flat row-major values]}``
  (non-finite entries as the strings ``"nan"``, ``"inf"``, ``"-inf"``; complex tensors as
  ``[re, im]`` pairs), loaded on the CPU;
* a nested result as ``{"__type__": name, "fields": {...}}``, a registered ``str`` enum as
  ``{"__enum__": name, "value": ...}``, a tuple as ``{"__tuple__": [...]}``, a dict with
  non-string keys as ``{"__items__": [[key, value], ...]}``, a ``torch.dtype`` as
  ``{"__dtype__": "float64"}``; lists and string-keyed dicts as themselves.

Only classes registered here (every :class:`Serializable` subclass, and enums passed to
:func:`register`) are ever built while loading, so a crafted file can only produce data.
Float values round-trip exactly (JSON keeps the shortest repr that reads back bit-identical).

Files written by :func:`save_json` are ``{"format": "hesse", "version": 1, "type": name,
"data": ...}``; they are written to a temporary file in the target folder and renamed, so a
crash never leaves half a file and the rename works on any file system.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Serializable",
    "register",
    "to_jsonable",
    "from_jsonable",
    "save_json",
    "load_json",
    "write_text_atomic",
]

FORMAT = "hesse"
VERSION = 1

_REGISTRY: dict[str, type] = {}
T = TypeVar("T")

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.complex128,
        torch.complex64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def register(cls: type[T]) -> type[T]:
    """Allow ``cls`` (a dataclass or a ``str`` Enum) to be rebuilt when loading (by name)."""
    name = cls.__name__
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise TypeError(f"Two serializable classes are named {name!r}: {old} and {cls}.")
    _REGISTRY[name] = cls
    return cls


def _float(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"__float__": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def _tensor(t: Tensor) -> dict:
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"Cannot save a tensor of dtype {t.dtype} as JSON.")
    flat = torch.view_as_real(t).reshape(-1, 2) if t.is_complex() else t.reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        flat = flat.to(torch.float32)  # tolist of these is exact through float32
    data = flat.tolist()
    if t.is_floating_point() or t.is_complex():

        def fix(v: Any) -> Any:
            if isinstance(v, list):
                return [fix(u) for u in v]
            return v if math.isfinite(v) else _float(v)["__float__"]

        if not bool(torch.isfinite(flat).all()):
            data = fix(data)
    return {"__tensor__": name, "shape": list(t.shape), "data": data}


def _untensor(d: dict) -> Tensor:
    dtype = _DTYPES.get(d["__tensor__"])
    if dtype is None:
        raise ValueError(f"Unknown tensor dtype {d['__tensor__']!r} in a hesse JSON file.")
    shape = [int(s) for s in d["shape"]]

    def fix(v: Any) -> Any:
        if isinstance(v, list):
            return [fix(u) for u in v]
        return _NONFINITE[v] if isinstance(v, str) else v

    data = fix(d["data"])
    if dtype.is_complex:
        real = torch.tensor(data, dtype=torch.float64).reshape(-1, 2)
        return torch.view_as_complex(real.contiguous()).to(dtype).reshape(shape)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.tensor(data, dtype=torch.float32).to(dtype).reshape(shape)
    return torch.tensor(data, dtype=dtype).reshape(shape)


def to_jsonable(obj: Any) -> Any:
    """``obj`` (results, tensors, containers of them, plain values) as JSON-ready data."""
    if obj is None or isinstance(obj, (bool, str)) and not isinstance(obj, Enum):
        return obj
    if isinstance(obj, Enum):
        if type(obj).__name__ in _REGISTRY:
            return {"__enum__": type(obj).__name__, "value": obj.value}
        return to_jsonable(obj.value)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(float(obj))
    if isinstance(obj, Tensor):
        return _tensor(obj)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__name__
        if _REGISTRY.get(name) is not type(obj):
            raise TypeError(
                f"Cannot save a {name}: it is not a registered result class "
                "(derive it from hesse._serialize.Serializable)."
            )
        return {"__type__": name, "fields": _fields(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_jsonable(v) for v in obj]}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: to_jsonable(v) for k, v in obj.items()}
        return {"__items__": [[to_jsonable(k), to_jsonable(v)] for k, v in obj.items()]}
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return to_jsonable(obj.item())
    raise TypeError(f"Cannot save a value of type {type(obj).__name__} as JSON.")


def from_jsonable(data: Any) -> Any:
    """Inverse of :func:`to_jsonable` (builds only registered classes)."""
    if isinstance(data, list):
        return [from_jsonable(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__float__" in data:
        return _NONFINITE[data["__float__"]]
    if "__tensor__" in data:
        return _untensor(data)
    if "__dtype__" in data:
        return _DTYPES[data["__dtype__"]]
    if "__tuple__" in data:
        return tuple(from_jsonable(v) for v in data["__tuple__"])
    if "__items__" in data:
        return {from_jsonable(k): from_jsonable(v) for k, v in data["__items__"]}
    if "__enum__" in data:
        return _registered(data["__enum__"])(data["value"])
    if "__type__" in data:
        return _build(_registered(data["__type__"]), data["fields"])
    return {k: from_jsonable(v) for k, v in data.items()}


def _registered(name: str) -> type:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"Unknown result type {name!r} in a hesse JSON file.")
    return cls


def _fields(obj: Any) -> dict:
    return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _build(cls: type[T], fields: dict) -> T:
    if not isinstance(fields, dict):
        raise ValueError(f"{cls.__name__}: expected a dict of fields, got {type(fields).__name__}.")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(fields) - set(known))
    missing = sorted(
        name
        for name, f in known.items()
        if name not in fields
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(
            f"Cannot build {cls.__name__}: unexpected fields {unknown}, missing fields "
            f"{missing}. Was the file written by another version of hesse?"
        )
    return cls(**{k: from_jsonable(v) for k, v in fields.items()})


class Serializable:
    """Mixin for result dataclasses: ``to_dict`` / ``from_dict`` / ``save`` / ``load``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(cls)

    def to_dict(self) -> dict:
        """The fields as JSON-ready data (tensors as ``{"__tensor__": dtype, ...}``)."""
        return _fields(self)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        """Rebuild from :meth:`to_dict` output (tensors on the CPU)."""
        return _build(cls, data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this result to ``path`` as JSON (atomically); returns the path."""
        return save_json(path, self)

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        """Read a result written by :meth:`save`."""
        obj = load_json(path)
        if not isinstance(obj, cls):
            raise ValueError(
                f"{str(path)!r} holds a {type(obj).__name__}, not a {cls.__name__}; "
                f"load it with hesse._serialize.load_json or {type(obj).__name__}.load."
            )
        return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def save_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> Path:
    """Write ``obj`` (a result, or any container of results/tensors/plain values) to ``path``."""
    name = type(obj).__name__ if isinstance(obj, Serializable) else type(obj).__name__.lower()
    payload = {"format": FORMAT, "version": VERSION, "type": name, "data": to_jsonable(obj)}
    return write_text_atomic(path, json.dumps(payload, allow_nan=False, indent=indent))


def load_json(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`save_json` (never runs code from the file).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a hesse JSON file, or is corrupt.
    """
    p = Path(path)
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{str(p)!r} is not a hesse JSON file ({type(e).__name__}: {e}). Pass a file "
            "written by .save() / hesse._serialize.save_json."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{str(p)!r} is not a hesse JSON file (no 'format': 'hesse' header). Pass a file "
            "written by .save() / hesse._serialize.save_json."
        )
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{str(p)!r} has format version {payload.get('version')!r}; this hesse reads "
            f"version {VERSION}."
        )
    try:
        return from_jsonable(payload["data"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{str(p)!r} is a corrupt hesse JSON file: {e}") from None
