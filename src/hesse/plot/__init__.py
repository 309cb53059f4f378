"""Plots of result objects (matplotlib only, imported lazily inside each function)."""

from .blocks import plot_block_spectra
from .compress import plot_compression
from .landscape import plot_loss_slice, plot_loss_surface_2d
from .report import plot_comparison, plot_report
from .spectrum import plot_eigenvalues, plot_layer_curvature, plot_spectral_density
from .tracking import plot_sharpness, plot_sharpness_vs_batch_size

__all__: list[str] = [
    "plot_block_spectra",
    "plot_compression",
    "plot_comparison",
    "plot_report",
    "plot_eigenvalues",
    "plot_layer_curvature",
    "plot_spectral_density",
    "plot_loss_slice",
    "plot_loss_surface_2d",
    "plot_sharpness",
    "plot_sharpness_vs_batch_size",
]
