"""Resumable long runs: save a solver's state with ``torch.save`` and pick it up again.

``top_eigenpairs(..., checkpoint="run.pt")`` and ``spectral_density(..., checkpoint="run.pt")``
write their Krylov state every ``checkpoint_every`` matvecs and when interrupted with Ctrl-C
(the ``KeyboardInterrupt`` is re-raised after saving, with a message saying how to resume).
Calling the same function again with the same ``checkpoint`` path resumes from the file; the
file is removed when the run finishes. The state is checked against the call (operator size,
dtype, the algorithm's settings) so a stale file is refused rather than silently mixed in.
The operator itself is not saved: resume only with the same operator (same model, data and
parameters), which cannot be verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_state", "load_state", "remove_state", "interrupted_message"]

_FORMAT = 1


def _path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Invalid checkpoint={path!r}; must be a file path (str or PathLike).")
    return Path(path)


def save_state(path: str | os.PathLike, kind: str, config: dict, state: dict) -> None:
    """Write ``state`` atomically (temporary file, then rename)."""
    p = _path(path)
    tmp = p.with_name(p.name + ".tmp")
    payload = {"format": _FORMAT, "kind": kind, "config": config, "state": state}
    torch.save(payload, tmp)
    os.replace(tmp, p)


def load_state(path: str | os.PathLike, kind: str, config: dict) -> dict | None:
    """The saved state if ``path`` exists, else ``None``.

    Raises:
        ValueError: the file belongs to another algorithm or to a call with other settings.
    """
    p = _path(path)
    if not p.exists():
        return None
    payload: Any = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"Checkpoint {str(p)!r} is not a hesse solver checkpoint.")
    if payload.get("kind") != kind:
        raise ValueError(
            f"Checkpoint {str(p)!r} was written by {payload.get('kind')!r}, not {kind!r}. "
            "Use another path or delete the file."
        )
    saved = payload["config"]
    diff = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"Checkpoint {str(p)!r} does not match this call ({details}). "
            "Call with the original settings to resume, or delete the file to start afresh."
        )
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


def to_device(state: dict, device: torch.device) -> dict:
    """Move the tensors of a loaded state to ``device``."""
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) and k != "rng" else v
        for k, v in state.items()
    }
