"""Plots of sharpness tracking: lambda_max against 2/lr, the edge-of-stability ratio, per layer.

matplotlib is imported inside each function. Inputs are a
:class:`hesse.SharpnessTracker`, its ``history`` (a list of records), or a dict
``label -> tracker/history`` to compare runs (e.g. several learning rates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_sharpness", "plot_sharpness_vs_batch_size"]


def _history(obj: Any) -> list[Any]:
    hist = getattr(obj, "history", obj)
    if not isinstance(hist, Sequence):
        raise TypeError(
            "Expected a SharpnessTracker, a list of SharpnessRecord, or a dict of them; got "
            f"{type(obj).__name__}."
        )
    return list(hist)


def _save(fig: Any, path: str | Path | None, dpi: int = 120) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def plot_sharpness(
    tracker: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    show_loss: bool = True,
    log_scale: bool = False,
) -> Any:
    """Plot ``lambda_max`` over training with the stability limit ``2 / lr``.

    Panels: (1) ``lambda_max`` per check (solid) and ``2 / lr`` (dashed, same colour);
    per-layer ``lambda_max`` (thin) when tracked, ``lambda_min`` when tracked; (2) the ratio
    ``lr * lambda_max / 2`` with the limit 1 (and the preconditioned ratio when tracked);
    (3) the measurement-batch loss (``show_loss``).

    Args:
        tracker: a :class:`hesse.SharpnessTracker`, its ``history``, or a dict
            ``label -> tracker/history`` (one colour per run).
        path: write a PNG here.
        title: figure title.
        show_loss: add the loss panel when losses were recorded.
        log_scale: logarithmic ``lambda_max`` axis.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    runs = (
        {str(k): _history(v) for k, v in tracker.items()}
        if isinstance(tracker, Mapping)
        else {"": _history(tracker)}
    )
    has_loss = show_loss and any(r.loss is not None for h in runs.values() for r in h)
    has_ratio = any(
        r.ratio is not None or r.precond_ratio is not None for h in runs.values() for r in h
    )
    npanels = 1 + has_ratio + has_loss
    fig = Figure(figsize=(7.0, 2.6 * npanels + 0.4), layout="constrained")
    axes = fig.subplots(npanels, 1, sharex=True, squeeze=False)[:, 0]
    ax_l = axes[0]
    ax_r = axes[1] if has_ratio else None
    ax_loss = axes[-1] if has_loss else None
    for i, (label, hist) in enumerate(runs.items()):
        if not hist:
            continue
        color = f"C{i % 10}"
        steps = [r.step for r in hist]
        lam = [r.lambda_max for r in hist]
        ax_l.plot(steps, lam, color=color, lw=1.8, label=f"{label} $\\lambda_{{max}}$".strip())
        lrs = [r.lr for r in hist]
        if all(lr is not None for lr in lrs):
            ax_l.plot(
                steps,
                [2.0 / lr for lr in lrs],
                color=color,
                ls="--",
                lw=1.0,
                label=f"{label} 2/lr".strip(),
            )
        if hist[0].layer_lambda_max:
            for name in hist[0].layer_lambda_max:
                ax_l.plot(
                    steps,
                    [r.layer_lambda_max[name] for r in hist],
                    color=color,
                    lw=0.7,
                    alpha=0.6,
                    ls=":",
                    label=f"{label} layer {name}".strip(),
                )
        if hist[0].lambda_min is not None:
            ax_l.plot(
                steps,
                [r.lambda_min for r in hist],
                color=color,
                lw=0.8,
                alpha=0.7,
                ls="-.",
                label=f"{label} $\\lambda_{{min}}$".strip(),
            )
        if ax_r is not None:
            if hist[0].ratio is not None:
                ax_r.plot(
                    steps,
                    [r.ratio for r in hist],
                    color=color,
                    lw=1.5,
                    label=f"{label} lr $\\lambda_{{max}}$/2".strip(),
                )
            if hist[0].precond_ratio is not None:
                ax_r.plot(
                    steps,
                    [r.precond_ratio for r in hist],
                    color=color,
                    lw=1.0,
                    ls="--",
                    label=f"{label} preconditioned".strip(),
                )
        if ax_loss is not None and hist[0].loss is not None:
            ax_loss.plot(steps, [r.loss for r in hist], color=color, lw=1.2, label=label or None)
    ax_l.set_ylabel(r"sharpness $\lambda_{max}$")
    if log_scale:
        ax_l.set_yscale("log")
    ax_l.legend(fontsize=7, frameon=False, ncol=2)
    if ax_r is not None:
        ax_r.axhline(1.0, color="k", lw=0.8, ls="--")
        ax_r.set_ylabel("edge-of-stability ratio")
        ax_r.legend(fontsize=7, frameon=False, ncol=2)
    if ax_loss is not None:
        ax_loss.set_ylabel("loss (measurement batch)")
        ax_loss.set_yscale("log")
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "Sharpness during training", fontsize=11)
    _save(fig, path)
    return fig


def plot_sharpness_vs_batch_size(
    batch_sizes: Sequence[int],
    lambda_max: Sequence[float],
    path: str | Path | None = None,
    *,
    errors: Sequence[float] | None = None,
    extra: Mapping[str, Sequence[float]] | None = None,
    title: str | None = None,
) -> Any:
    """Final sharpness against batch size (log2 x axis), e.g. for the SGD-noise experiment.

    Args:
        batch_sizes: x values.
        lambda_max: final ``lambda_max`` per batch size (mean over seeds).
        errors: optional error bars (e.g. std over seeds).
        extra: more metrics to plot on a second axis (e.g. ``{"trace": [...]}``).
        path: write a PNG here.
    """
    from matplotlib.figure import Figure

    ncols = 1 + bool(extra)
    fig = Figure(figsize=(4.8 * ncols, 3.8), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    axes[0].errorbar(batch_sizes, lambda_max, yerr=errors, marker="o", capsize=3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel(r"final $\lambda_{max}$")
    if extra:
        for i, (name, vals) in enumerate(extra.items()):
            axes[1].plot(batch_sizes, vals, marker="s", color=f"C{i + 1}", label=name)
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("batch size")
        axes[1].legend(frameon=False)
    fig.suptitle(title or "Smaller batches end in flatter minima", fontsize=11)
    _save(fig, path)
    return fig
