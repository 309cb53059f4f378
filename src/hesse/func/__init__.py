"""Pure functional core: HVP (two modes), GGN/Fisher pieces, ravel/unravel."""

from ._ggn import OutputGraph, ggn_vp
from ._hvp import GradGraph, hvp
from ._loss import (
    loss_kind,
    output_fisher_mp,
    output_grad_unreduced,
    reduction_scale,
    sample_targets,
)
from ._ravel import ravel, ravel_block, unravel, unravel_block

__all__ = [
    "GradGraph",
    "OutputGraph",
    "ggn_vp",
    "hvp",
    "loss_kind",
    "output_fisher_mp",
    "output_grad_unreduced",
    "ravel",
    "ravel_block",
    "reduction_scale",
    "sample_targets",
    "unravel",
    "unravel_block",
]
