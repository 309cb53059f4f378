"""Plots of result objects (matplotlib only, imported lazily inside each function)."""

from .landscape import plot_loss_slice, plot_loss_surface_2d
from .tracking import plot_sharpness, plot_sharpness_vs_batch_size

__all__: list[str] = [
    "plot_loss_slice",
    "plot_loss_surface_2d",
    "plot_sharpness",
    "plot_sharpness_vs_batch_size",
]
