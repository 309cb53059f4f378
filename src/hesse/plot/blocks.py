"""Plot of per-block spectra (:func:`hesse.analysis.block_spectra`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .spectrum import _save

__all__ = ["plot_block_spectra"]


def plot_block_spectra(
    result: Any, path: str | Path | None = None, *, title: str | None = None
) -> Any:
    """Heat map of the block densities on their common grid (``log10`` density, one row per
    block, ``lambda_max`` marked) next to the matrix of pairwise Jensen-Shannon distances.

    Args:
        result: a :class:`hesse.analysis.BlockSpectra`.
        path: PNG file to write.
        title: figure title (default: the mean pairwise JS distance).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = result.names
    b = len(names)
    grid = result.grid.double().cpu().numpy()
    dens = result.densities.double().cpu().numpy()
    floor = max(float(dens.max()) * 1e-6, 1e-300)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(12.0, 1.0 + 0.28 * b), gridspec_kw={"width_ratios": [2.2, 1.0]}
    )
    import numpy as np

    im = ax.imshow(
        np.log10(dens.clip(floor)),
        aspect="auto",
        origin="upper",
        extent=(grid[0], grid[-1], b - 0.5, -0.5),
        cmap="magma",
        interpolation="nearest",
    )
    for i, blk in enumerate(result.blocks):
        lam = blk.lambda_max / (blk.radius if result.normalize == "radius" else 1.0)
        ax.plot([lam], [i], marker="|", color="cyan", ms=8)
    ax.set_yticks(range(b), names, fontsize=7)
    ax.set_xlabel(
        "eigenvalue / spectral radius of the block"
        if result.normalize == "radius"
        else "eigenvalue"
    )
    fig.colorbar(im, ax=ax, label="log10 density", pad=0.01)
    js = result.js.double().cpu().numpy()
    im2 = ax2.imshow(js, vmin=0.0, vmax=1.0, cmap="viridis")
    ax2.set_xticks(range(b), names, rotation=90, fontsize=6)
    ax2.set_yticks(range(b), names, fontsize=6)
    fig.colorbar(im2, ax=ax2, label="JS distance (base 2)", pad=0.01)
    fig.suptitle(
        title
        or f"Block spectra ({result.normalize}): mean pairwise JS distance {result.mean_js:.3f}"
    )
    _save(fig, path)
    return fig
