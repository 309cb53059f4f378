"""Shared type aliases."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Union

from torch import Tensor

Params = dict[str, Tensor]
"""Parameters as an ordered name -> tensor dict (``model.named_parameters()`` order)."""

Batch = tuple[Any, Tensor]
"""One batch ``(inputs, targets)``; ``inputs`` may be a tensor or a tuple of tensors."""

Data = Union[Batch, Iterable[Batch]]
"""An ``(X, y)`` pair or any re-iterable of them (list, DataLoader)."""

ModelFn = Callable[[Params, Any], Tensor]
"""Functional model: ``(params, inputs) -> outputs``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Loss on outputs and targets returning a scalar (e.g. ``nn.CrossEntropyLoss()``)."""
