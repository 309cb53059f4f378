"""Analyses composed from operators and linalg results (never re-implementing algorithms)."""

from .landscape import (
    LossSlice,
    LossSurface2D,
    loss_slice,
    loss_surface_2d,
    perturbed_parameters,
    random_direction,
)

__all__: list[str] = [
    "LossSlice",
    "LossSurface2D",
    "loss_slice",
    "loss_surface_2d",
    "perturbed_parameters",
    "random_direction",
]
