"""The embedded workloads: what ``hesse`` analyses when given no model.

``workload(name)`` builds one by name (``hesse analyze --workload NAME``). Adding a workload is
one entry in ``WORKLOADS``: ``"name": "module:factory"``, the factory taking keyword arguments
(``seed=``, ``dtype=``, ...) and returning a :class:`Workload` (model, loss, train/test data,
name); it is imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from .digits import Workload, default_workload, load_digits_tensors, make_mlp, train_full_batch
from .lm import LMWorkload, lm_workload

__all__ = [
    "WORKLOADS",
    "LMWorkload",
    "Workload",
    "default_workload",
    "lm_workload",
    "load_digits_tensors",
    "make_mlp",
    "train_full_batch",
    "workload",
]

# name -> "module:factory"
WORKLOADS: dict[str, str] = {
    "digits": "hesse.data.digits:default_workload",
    "lm": "hesse.data.lm:lm_workload",
}


def workload(name: str = "digits", **kwargs: Any) -> Workload:
    """Build the registered workload ``name`` (see ``WORKLOADS``) with ``kwargs``.

    Example:
        >>> w = workload("digits")
        >>> sum(p.numel() for p in w.model.parameters())
        2410
    """
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload {name!r}; expected one of {sorted(WORKLOADS)}.")
    module, _, attr = WORKLOADS[name].partition(":")
    return getattr(importlib.import_module(module), attr)(**kwargs)
