"""Pure functional core: HVP (two modes), GGN/Fisher pieces, losses in output space, ravel."""

from ._ggn import OutputGraph, ggn_vp
from ._hvp import GradGraph, hvp
from ._loss import (
    LossAt,
    OutputLoss,
    loss_kind,
    output_grad_unreduced,
    output_loss,
    reduction_scale,
    sample_targets,
)
from ._ravel import ravel, ravel_block, unravel, unravel_block

__all__ = [
    "GradGraph",
    "LossAt",
    "OutputGraph",
    "OutputLoss",
    "ggn_vp",
    "hvp",
    "loss_kind",
    "output_grad_unreduced",
    "output_loss",
    "ravel",
    "ravel_block",
    "reduction_scale",
    "sample_targets",
    "unravel",
    "unravel_block",
]
