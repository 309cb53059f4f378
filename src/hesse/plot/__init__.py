"""Plots of result objects (matplotlib only, imported lazily inside each function)."""

from .landscape import plot_loss_slice, plot_loss_surface_2d

__all__: list[str] = [
    "plot_loss_slice",
    "plot_loss_surface_2d",
]
