"""Resumable long runs: save a solver's state with ``torch.save`` and pick it up again.

``top_eigenpairs(..., checkpoint="run.pt")`` and ``spectral_density(..., checkpoint="run.pt")``
write their Krylov state every ``checkpoint_every`` matvecs and when interrupted with Ctrl-C
(the ``KeyboardInterrupt`` is re-raised after saving, with a message saying how to resume).
Calling the same function again with the same ``checkpoint`` path resumes from the file; the
file is removed when the run finishes.

Safety and checks:

* The path is checked when the call starts (its folder exists, it is not a folder, the folder
  is writable), not at the first save minutes later.
* Files are read with ``torch.load(weights_only=True)``: only tensors and plain Python values
  are rebuilt, so a crafted file cannot run code. A file that cannot be read that way
  (truncated, random bytes, another program's pickle) gets one error naming the path.
* The state is checked against the call: the algorithm, its settings (operator size, dtype,
  budget, ...) and a *fingerprint* of the operator, its product with a fixed seeded
  Rademacher probe (one extra product per checkpointed call). A checkpoint of another
  operator of the same size (another model, data or parameters) is refused, naming what
  differs.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_path",
    "fingerprint",
    "save_state",
    "load_state",
    "remove_state",
    "interrupted_message",
]

_FORMAT = 2  # 2: fingerprint of the operator in the config
_PROBE_SEED = 20260413  # fixed: the fingerprint must not depend on any caller's RNG


def _path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Invalid checkpoint={path!r}; must be a file path (str or PathLike).")
    return Path(path)


def check_path(path: str | os.PathLike) -> Path:
    """Validate a checkpoint path at the start of a call (before any product).

    Raises:
        TypeError: not a path.
        ValueError: the path is a folder, its folder is missing, or the folder is not writable.
    """
    p = _path(path)
    if p.is_dir():
        raise ValueError(
            f"Invalid checkpoint={str(p)!r}: it is a folder. Pass a file path, e.g. "
            f"{str(p / 'run.pt')!r}."
        )
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(
            f"Invalid checkpoint={str(p)!r}: the folder {str(folder)!r} does not exist. "
            "Create it first or pass a path in an existing folder."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise ValueError(
            f"Invalid checkpoint={str(p)!r}: cannot write in the folder {str(folder)!r} "
            f"({e.strerror or e}). Pass a path in a writable folder."
        ) from None
    os.close(fd)
    os.unlink(probe)
    return p


def fingerprint(op: Any) -> Tensor:
    """``op @ z`` for a fixed seeded Rademacher ``z`` (on the CPU): identifies the operator."""
    n = op.shape[1]
    g = torch.Generator().manual_seed(_PROBE_SEED)
    z = torch.randint(0, 2, (n,), generator=g).to(op.dtype).mul_(2).sub_(1)
    return op.matvec(z.to(op.device)).detach().to("cpu").clone()


def _unreadable(p: Path, why: str) -> ValueError:
    return ValueError(
        f"Checkpoint {str(p)!r} is not a readable hesse solver checkpoint ({why}). It may be "
        "truncated (a crash while writing), written by another program or an older hesse, or "
        "tampered with; nothing from it was used. Delete the file to start afresh, or pass "
        "another checkpoint= path."
    )


def save_state(path: str | os.PathLike, kind: str, config: dict, state: dict) -> None:
    """Write ``state`` atomically (temporary file in the same folder, then rename)."""
    p = _path(path)
    payload = {"format": _FORMAT, "kind": kind, "config": config, "state": state}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _same_fingerprint(saved: Any, now: Tensor) -> str | None:
    """``None`` if equal up to rounding, else how they differ."""
    if not isinstance(saved, Tensor) or saved.shape != now.shape:
        return "its shape differs"
    saved = saved.to(torch.float64)
    diff = float((saved - now.to(torch.float64)).norm())
    scale = max(float(saved.norm()), float(now.norm()), torch.finfo(torch.float64).tiny)
    rtol = torch.finfo(now.dtype).eps ** 0.5 if now.is_floating_point() else 0.0
    if diff <= rtol * scale:
        return None
    return f"relative difference {diff / scale:.3g} > {rtol:.2g}"


def load_state(path: str | os.PathLike, kind: str, config: dict) -> dict | None:
    """The saved state if ``path`` exists, else ``None``.

    ``config["fingerprint"]`` (if present) is compared up to rounding, every other entry
    exactly.

    Raises:
        ValueError: the file cannot be read safely, belongs to another algorithm, to a call
            with other settings, or to another operator.
    """
    p = _path(path)
    if not p.exists():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols
            payload: Any = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _unreadable(p, "it is not a pickle of tensors and plain values") from None
    except EOFError:
        raise _unreadable(p, "it is empty or cut short") from None
    except Exception as e:  # any other failure to parse is the same user error
        raise _unreadable(p, f"{type(e).__name__}: {str(e)[:80]}...") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise _unreadable(p, "no hesse header")
    if payload.get("format") != _FORMAT:
        raise _unreadable(p, f"format {payload.get('format')!r}, this hesse writes {_FORMAT}")
    if payload.get("kind") != kind:
        raise ValueError(
            f"Checkpoint {str(p)!r} was written by {payload.get('kind')!r}, not {kind!r}. "
            "Use another path or delete the file."
        )
    saved = payload["config"]
    details = []
    for k, v in config.items():
        if k == "fingerprint":
            why = _same_fingerprint(saved.get(k), v)
            if why is not None:
                details.append(
                    "the operator: its product with the fixed probe differs "
                    f"({why}), so the file was written for another operator (other model, "
                    "data or parameters)"
                )
        elif saved.get(k) != v:
            details.append(f"{k}: saved {saved.get(k)!r} vs now {v!r}")
    if details:
        raise ValueError(
            f"Checkpoint {str(p)!r} does not match this call ({'; '.join(details)}). "
            "Call with the original operator and settings to resume, or delete the file to "
            "start afresh."
        )
    if not isinstance(payload.get("state"), dict):
        raise _unreadable(p, "no solver state")
    return payload["state"]


def remove_state(path: str | os.PathLike) -> None:
    p = _path(path)
    if p.exists():
        p.unlink()


def interrupted_message(path: str | os.PathLike, what: str, done: int) -> str:
    return (
        f"{what} interrupted; its state after {done} matvecs was saved to {str(path)!r}. "
        f"Call it again with checkpoint={str(path)!r} (same operator and settings) to resume."
    )
