"""Plots of spectra: the SLQ density, top eigenvalues, per-layer curvature.

matplotlib is imported inside each function (it is an optional dependency); every function
takes result objects, computes nothing new, writes a PNG when ``path`` is given and returns
the figure.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_spectral_density", "plot_eigenvalues", "plot_layer_curvature"]


def _figure(ax: Any, size: tuple[float, float] = (6.0, 4.0)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=size)
    else:
        fig = ax.figure
    return fig, ax


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def plot_spectral_density(
    density: Any,
    path: str | Path | None = None,
    *,
    log_scale: bool = False,
    ax: Any = None,
    title: str | None = None,
    outliers: Any = None,
) -> Any:
    """Plot a :class:`hesse.SpectralDensity` with its error band across probes.

    Args:
        density: the SLQ result.
        path: PNG file to write.
        log_scale: plot the density of ``log10(lambda)`` for the positive part (re-smoothed
            from the stored quadrature, no new products) on a log y-axis; otherwise the
            density over ``lambda`` on a log y-axis (the bulk is orders of magnitude taller
            than the outliers).
        outliers: optional :class:`hesse.EigenResult` whose eigenvalues are marked.
    """
    import torch

    fig, ax = _figure(ax)
    if log_scale:
        grid, dens, err = density.smooth(log_scale=True)
        xlabel = "log10(eigenvalue)  (positive part)"
    elif density.log_scale:
        grid, dens, err = density.smooth()
        xlabel = "eigenvalue"
    else:
        grid, dens, err = density.grid, density.density, density.density_stderr
        xlabel = "eigenvalue"
    g, d, e = (t.detach().double().cpu().numpy() for t in (grid, dens, err))
    floor = max(float(d.max()) * 1e-8, 1e-300)
    ax.fill_between(
        g,
        (d - 2 * e).clip(floor),
        (d + 2 * e).clip(floor),
        alpha=0.3,
        color="tab:blue",
        label="+-2 stderr (probes)",
    )
    ax.plot(g, d.clip(floor), color="tab:blue", lw=1.2, label="SLQ density")
    ax.set_yscale("log")
    if outliers is not None:
        vals = outliers.eigenvalues.detach().double().cpu()
        if log_scale:
            vals = torch.log10(vals[vals > 0])
        for i, v in enumerate(vals.tolist()):
            ax.axvline(
                v,
                color="tab:red",
                lw=0.6,
                alpha=0.6,
                label="top eigenvalues (Lanczos)" if i == 0 else None,
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(
        title
        or f"Spectral density (SLQ: {density.num_probes} probes x "
        f"{density.num_steps} steps, {density.num_matvecs} HVPs)"
    )
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_eigenvalues(
    result: Any, path: str | Path | None = None, *, ax: Any = None, title: str | None = None
) -> Any:
    """Plot the eigenvalues of a :class:`hesse.EigenResult` with residual error bars."""
    fig, ax = _figure(ax)
    vals = result.eigenvalues.detach().double().cpu().numpy()
    res = result.residual_norms.detach().double().cpu().numpy()
    idx = range(1, len(vals) + 1)
    ax.errorbar(
        list(idx),
        vals,
        yerr=res,
        fmt="o",
        ms=4,
        capsize=3,
        color="tab:blue",
        label="eigenvalue +- residual norm",
    )
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(
        title
        or f"Top eigenvalues ({result.which}, {result.num_matvecs} HVPs, "
        f"converged={result.converged})"
    )
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_layer_curvature(
    lambda_max: Mapping[str, float],
    trace: Mapping[str, float] | None = None,
    path: str | Path | None = None,
    *,
    trace_stderr: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Any:
    """Bar charts of per-layer ``lambda_max`` (and trace with error bars) of the diagonal blocks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = 2 if trace else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.0 * ncols, 4.0), squeeze=False)
    names = list(lambda_max)
    axes[0, 0].bar(names, [lambda_max[k] for k in names], color="tab:blue")
    axes[0, 0].set_ylabel("lambda_max of the layer block")
    axes[0, 0].set_xlabel("layer")
    axes[0, 0].set_title("per-layer lambda_max")
    if trace:
        err = [trace_stderr[k] for k in names] if trace_stderr else None
        axes[0, 1].bar(names, [trace[k] for k in names], yerr=err, capsize=3, color="tab:orange")
        axes[0, 1].set_ylabel("trace of the layer block")
        axes[0, 1].set_xlabel("layer")
        axes[0, 1].set_title("per-layer trace (+- stderr)")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig
