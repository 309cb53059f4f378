"""Which weights are compressible, and how masks are attached (``torch.nn.utils.prune``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

__all__ = ["WeightRef", "compressible_weights", "apply_mask", "current_mask"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class WeightRef:
    """One compressible weight: ``module.weight`` of a Linear/Conv layer.

    Attributes:
        name: ``"<module>.weight"`` (the name it has in an unpruned model).
        module_name: qualified name of the owning module.
        module: the layer.
        param_name: the name of the trainable parameter behind it: ``"<module>.weight"``, or
            ``"<module>.weight_orig"`` when the layer already carries a pruning mask.
    """

    name: str
    module_name: str
    module: nn.Module
    param_name: str

    @property
    def weight(self) -> Tensor:
        """Effective weight (``weight_orig * weight_mask`` for a pruned layer)."""
        return self.module.weight

    @property
    def param(self) -> Tensor:
        m = self.module
        return m.weight_orig if hasattr(m, "weight_orig") else m.weight

    @property
    def rows(self) -> int:
        return int(self.param.shape[0])

    @property
    def numel(self) -> int:
        return self.param.numel()


def compressible_weights(model: nn.Module, layers: Sequence[str] | None = None) -> list[WeightRef]:
    """The weights of Linear/Conv layers, in ``model.named_modules()`` order.

    Args:
        model: the network.
        layers: module names to keep (default: every Linear/Conv layer). Biases and
            normalisation parameters are never compressed.

    Raises:
        ValueError: a requested name is not a Linear/Conv module, or there is none at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, _SUPPORTED) and (mod.weight is not None)
    }
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        missing = [s for s in layers if s not in found]
        if missing:
            raise ValueError(
                f"No Linear/Conv layer named {missing}; compressible layers: {list(found)}."
            )
        found = {k: v for k, v in found.items() if k in set(layers)}
    if not found:
        raise ValueError(
            "The model has no Linear/Conv layer to compress (supported: "
            + ", ".join(c.__name__ for c in _SUPPORTED)
            + ")."
        )
    out = []
    for name, mod in found.items():
        pname = "weight_orig" if hasattr(mod, "weight_orig") else "weight"
        if not getattr(mod, pname).requires_grad:
            continue
        prefix = f"{name}." if name else ""
        out.append(WeightRef(f"{prefix}weight", name, mod, f"{prefix}{pname}"))
    if not out:
        raise ValueError("Every compressible weight has requires_grad=False.")
    return out


def current_mask(ref: WeightRef) -> Tensor:
    """The mask already on the layer (all ones if it carries none), as a bool tensor."""
    m = ref.module
    if hasattr(m, "weight_mask"):
        return m.weight_mask.detach().bool().clone()
    return torch.ones_like(m.weight, dtype=torch.bool)


def apply_mask(ref: WeightRef, mask: Tensor, new_weight: Tensor | None = None) -> None:
    """Attach ``mask`` with the ``torch.nn.utils.prune`` conventions (in place).

    The layer gets a parameter ``weight_orig`` and a buffer ``weight_mask`` and recomputes
    ``weight = weight_orig * weight_mask`` before every forward, so the zeros survive
    fine-tuning and ``torch.nn.utils.prune.remove`` makes them permanent. ``new_weight`` (e.g.
    an OBS-compensated weight) replaces the stored values first. An existing mask is replaced
    by ``mask`` (which must already contain it; ``prune`` takes care of that).
    """
    m = ref.module
    with torch.no_grad():
        if hasattr(m, "weight_orig"):
            if new_weight is not None:
                m.weight_orig.copy_(new_weight)
            m.weight_mask.copy_(mask.to(m.weight_mask.dtype))
            m.weight = m.weight_orig * m.weight_mask  # keep the attribute in sync now
            return
        if new_weight is not None:
            m.weight.copy_(new_weight)
    torch_prune.custom_from_mask(m, "weight", mask.to(m.weight.dtype))


def mask_dtype_like(t: Tensor, mask: Any) -> Tensor:
    return torch.as_tensor(mask, device=t.device).to(t.dtype)
