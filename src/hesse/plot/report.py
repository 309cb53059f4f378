"""The figures of an :class:`hesse.report.AnalysisReport`, and of two reports compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .landscape import plot_loss_slice
from .spectrum import _save, plot_eigenvalues, plot_layer_curvature, plot_spectral_density

__all__ = ["plot_comparison", "plot_report"]


def plot_report(report: Any, out: str | Path) -> list[Path]:
    """Draw every figure the report has results for into folder ``out``; returns the files."""
    out = Path(out)
    res, files = report.results, []

    def put(name: str) -> Path:
        files.append(out / name)
        return files[-1]

    top = res.get("top_eigenpairs")
    if "spectral_density" in res:
        plot_spectral_density(res["spectral_density"], put("spectral_density.png"), outliers=top)
        plot_spectral_density(
            res["spectral_density"], put("spectral_density_log.png"), log_scale=True, outliers=top
        )
    if top is not None:
        plot_eigenvalues(top, put("top_eigenvalues.png"))
    layers = res.get("per_layer")
    if layers:
        plot_layer_curvature(
            {k: v["lambda_max"] for k, v in layers.items()},
            {k: v["trace"] for k, v in layers.items()},
            put("per_layer.png"),
            trace_stderr={k: v["trace_stderr"] or 0.0 for k, v in layers.items()},
        )
    if "loss_slice" in res:
        plot_loss_slice(
            res["loss_slice"]["slice"],
            put("loss_slice.png"),
            title="Loss along the top eigenvector vs the quadratic model",
        )
    return files


def plot_comparison(a: Any, b: Any, path: str | Path | None = None, *, labels=("A", "B")) -> Any:
    """Two reports side by side: top eigenvalues, log-density of the spectrum overlaid, and
    the per-layer ``lambda_max`` of each."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13.0, 4.0), layout="constrained")
    ax_e, ax_d, ax_l = (fig.add_subplot(1, 3, i + 1) for i in range(3))
    for rep, lab, col in zip((a, b), labels, ("tab:blue", "tab:orange")):
        top = rep.results.get("top_eigenpairs")
        if top is not None:
            v = top.eigenvalues.double().numpy()
            ax_e.plot(np.arange(1, len(v) + 1), v, "o-", ms=4, color=col, label=lab)
        dens = rep.results.get("spectral_density")
        if dens is not None:
            g, d, e = (t.double().numpy() for t in dens.smooth(log_scale=True))
            ax_d.plot(g, d, color=col, lw=1.2, label=lab)
            ax_d.fill_between(g, d - 2 * e, d + 2 * e, color=col, alpha=0.2, lw=0)
    ax_e.set_xlabel("index")
    ax_e.set_ylabel("eigenvalue")
    ax_e.set_title("top eigenvalues", fontsize=10)
    ax_d.set_yscale("log", nonpositive="clip")
    lims = [line.get_ydata().max() for line in ax_d.get_lines()]
    if lims:
        ax_d.set_ylim(max(lims) * 1e-6, max(lims) * 3)
    ax_d.set_xlabel("log10(eigenvalue) (positive part)")
    ax_d.set_ylabel("density (+-2 stderr)")
    ax_d.set_title("spectral density", fontsize=10)
    la = (a.data.get("learning_rate") or {}).get("per_layer", {})
    lb = (b.data.get("learning_rate") or {}).get("per_layer", {})
    names = sorted(
        set(la) | set(lb),
        key=lambda k: (
            -max(
                (la.get(k) or {}).get("lambda_max") or 0.0,
                (lb.get(k) or {}).get("lambda_max") or 0.0,
            )
        ),
    )[:20][::-1]
    y = np.arange(len(names))
    for off, L, lab, col in ((-0.2, la, labels[0], "tab:blue"), (0.2, lb, labels[1], "tab:orange")):
        ax_l.barh(
            y + off,
            [(L.get(k) or {}).get("lambda_max") or 0.0 for k in names],
            height=0.4,
            color=col,
            label=lab,
        )
    ax_l.set_yticks(y, names, fontsize=8)
    ax_l.set_xlabel("lambda_max of the layer's block")
    ax_l.set_title("per layer (sharpest 20)", fontsize=10)
    for ax in (ax_e, ax_d, ax_l):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)
    return fig
