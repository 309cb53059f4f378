"""Plots of loss slices (1-D and 2-D) with the quadratic model overlaid.

matplotlib is imported inside each function, so ``import hesse`` never needs it.
Each function takes a result object, draws on ``ax`` (or a new figure), writes a PNG when
``path`` is given, and returns the matplotlib ``Figure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_loss_slice", "plot_loss_surface_2d"]


def _figure(ax: Any, figsize: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)  # fixed margins: a layout engine costs ~0.5 s per figure
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.14, top=0.9)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: str | Path | None, dpi: int = 120) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})


def plot_loss_slice(
    result: Any,
    path: str | Path | None = None,
    *,
    ax: Any = None,
    title: str | None = None,
    show_quadratic: bool = True,
) -> Any:
    """Plot a :class:`hesse.analysis.LossSlice`: the loss and its quadratic model vs ``alpha``.

    Args:
        result: a ``LossSlice`` (from :func:`hesse.analysis.loss_slice`).
        path: write a PNG here (parent folders are created).
        ax: draw on this matplotlib axes instead of a new figure.
        title: figure title (default names the direction and ``d^T H d``).
        show_quadratic: overlay ``L0 + a g.d + a^2/2 d^T H d``.

    Returns:
        The matplotlib ``Figure``.
    """
    fig, ax = _figure(ax, (5.5, 4.0))
    a = result.alphas.detach().cpu().numpy()
    ax.plot(a, result.losses.detach().cpu().numpy(), color="C0", lw=2, label="loss")
    if show_quadratic:
        q = result.quadratic.detach().cpu().numpy()
        ax.plot(a, q, color="C1", ls="--", lw=1.5, label="quadratic model")
        lo = min(float(result.losses.min()), result.loss0)
        hi = float(result.losses.max())
        pad = 0.15 * max(hi - lo, 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
    ax.axvline(0.0, color="0.6", lw=0.8)
    norm = f"{result.direction_norm:.3g}"
    ax.set_xlabel(r"$\alpha$  (step along direction, $\|d\|$ = " + norm + ")")
    ax.set_ylabel("loss")
    if title is None:
        kind = {"top": "top eigenvector", "random": "random (filter-normalised)"}.get(
            result.direction_kind, "given direction"
        )
        title = f"Loss slice along {kind}: $d^T H d$ = {result.curvature:.4g}"
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    _save(fig, path)
    return fig


def plot_loss_surface_2d(
    result: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    levels: int = 25,
    show_quadratic: bool = True,
) -> Any:
    """Contour plot of a :class:`hesse.analysis.LossSurface2D`, with the quadratic model.

    Left panel: the loss surface; right panel (``show_quadratic``): the quadratic model on the
    same colour levels, so where they differ is where the Taylor model breaks down.

    Returns:
        The matplotlib ``Figure``.
    """
    import numpy as np
    from matplotlib.figure import Figure

    A = result.alphas.detach().cpu().numpy()
    B = result.betas.detach().cpu().numpy()
    L = result.losses.detach().cpu().numpy()
    Q = result.quadratic.detach().cpu().numpy()
    ncols = 2 if show_quadratic else 1
    fig = Figure(figsize=(5.0 * ncols, 4.2), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    lv = np.linspace(L.min(), L.max(), levels)
    cs = axes[0].contourf(A, B, L.T, levels=lv, cmap="viridis")
    axes[0].contour(A, B, L.T, levels=lv, colors="k", linewidths=0.3)
    axes[0].set_title("loss", fontsize=10)
    if show_quadratic:
        axes[1].contourf(A, B, np.clip(Q, L.min(), L.max()).T, levels=lv, cmap="viridis")
        axes[1].contour(A, B, Q.T, levels=lv, colors="k", linewidths=0.3)
        axes[1].set_title("quadratic model", fontsize=10)
    for ax in axes:
        ax.plot([0], [0], marker="*", color="w", ms=10, mec="k")
        ax.set_xlabel(r"$\alpha$ ($d_1$)")
        ax.set_ylabel(r"$\beta$ ($d_2$)")
    fig.colorbar(cs, ax=axes, shrink=0.9, label="loss")
    if title is None:
        kind = {"top": "top-2 eigenvectors", "random": "random (filter-normalised)"}.get(
            result.direction_kind, "given directions"
        )
        title = f"Loss surface along {kind}"
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return fig
