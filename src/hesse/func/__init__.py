"""Pure functional core: HVP (two modes), GGN/Fisher pieces, losses in output space, ravel."""

from ._ggn import OutputGraph, ggn_vp
from ._hvp import GradGraph, hvp
from ._loss import (
    LossAt,
    OutputLoss,
    output_loss,
)
from ._ravel import ravel, ravel_block, unravel, unravel_block

__all__ = [
    "GradGraph",
    "LossAt",
    "OutputGraph",
    "OutputLoss",
    "ggn_vp",
    "hvp",
    "output_loss",
    "ravel",
    "ravel_block",
    "unravel",
    "unravel_block",
]
