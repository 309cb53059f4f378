"""Plots of a compression report: accuracy (or loss) vs sparsity and vs bits, per method.

matplotlib is imported inside the function. The input is a
:class:`hesse.compress.CompressionReport` (or its ``to_dict()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_compression"]

_STYLE = {
    "obs": ("C0", "o"),
    "obd": ("C1", "s"),
    "magnitude": ("C3", "v"),
    "rtn": ("C3", "v"),
}


def plot_compression(
    report: Any,
    path: str | Path | None = None,
    *,
    metric: str | None = None,
    title: str | None = None,
) -> Any:
    """Two panels: ``metric`` vs sparsity for each pruning method, and vs bits for each
    quantization method (mixed-precision points as stars), with the dense model dashed.

    Args:
        report: a :class:`~hesse.compress.CompressionReport` or its ``to_dict()``.
        path: write a PNG here.
        metric: ``"accuracy"``, ``"perplexity"`` or ``"loss"`` (default: the report's own
            ``metric``, accuracy for reports without one).
        title: figure title (default: the report's name).

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    for key in ("dense", "pruning", "quantization"):
        if key not in d:
            raise TypeError(f"Expected a CompressionReport or its to_dict(); missing {key!r}.")
    metric = d.get("metric", "accuracy") if metric is None else metric
    if metric not in ("accuracy", "perplexity", "loss"):
        raise ValueError(f"Invalid metric={metric!r}; expected 'accuracy', 'perplexity' or 'loss'.")
    panels = [k for k in ("pruning", "quantization") if d.get(k)] or ["pruning"]
    fig = Figure(figsize=(5.2 * len(panels), 4.0), constrained_layout=True)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    dense = d["dense"].get(metric)
    for ax, panel in zip(axes, panels):
        rows = d.get(panel) or []
        xkey = "sparsity" if panel == "pruning" else "bits"
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r[xkey], r.get(metric)) for r in rows if r["method"] == method)
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            color, marker = _STYLE.get(method, (None, "o"))
            label = {
                "obs": "OBS" if panel == "pruning" else "OBS (second order)",
                "obd": "OBD",
                "magnitude": "magnitude",
                "rtn": "round to nearest",
            }.get(method, method)
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
        if panel == "quantization":
            for r in d.get("mixed") or []:
                if r.get(metric) is None:
                    continue
                color, _ = _STYLE.get(r["method"], (None, "*"))
                ax.plot(
                    [r["average_bits"]],
                    [r[metric]],
                    marker="*",
                    markersize=12,
                    linestyle="none",
                    color=color,
                    label=f"{r['method']} mixed ({r['average_bits']:.2f} bits avg)",
                )
            ax.invert_xaxis()
        if dense is not None:
            ax.axhline(dense, color="k", linestyle="--", linewidth=1, label="dense")
        per_layer = (d.get("settings") or {}).get("scope") == "layer"
        sparsity = "sparsity of every layer" if per_layer else "global sparsity"
        ax.set_xlabel(sparsity if panel == "pruning" else "bits per weight")
        ax.set_ylabel("test " + metric)
        ax.set_title("pruning, no fine-tuning" if panel == "pruning" else "quantization")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title if title is not None else d.get("name", ""))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
