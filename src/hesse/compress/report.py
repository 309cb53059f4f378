"""Compression report: accuracy and loss vs sparsity (pruning) and vs bits (quantization).

:func:`compression_report` runs every method at every level on a fresh copy of the model (the
model passed in is never changed) and returns a :class:`CompressionReport`, which renders as
a Markdown table, saves as JSON, and plots with :func:`hesse.plot.plot_compression`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice
from .prune import PruneMethod, prune, sparsity_of
from .quantize import QuantMethod, quantize
from .sensitivity import allocate_bits, layer_sensitivity

__all__ = ["CompressionReport", "compression_report", "evaluate"]

SCHEMA_VERSION = "hesse.compress/1"
METRICS = ("accuracy", "perplexity", "loss")


def _concat(data: Any) -> tuple[Any, Tensor]:
    from ..testing.checks import concat_data

    return concat_data(data)


def _is_mean_cross_entropy(loss_fn: Callable) -> bool:
    from ..func import OutputLoss

    if isinstance(loss_fn, OutputLoss):
        return loss_fn.kind == "ce" and loss_fn.reduction == "mean"
    return isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean"


def evaluate(model: nn.Module, loss_fn: Callable, data: Any) -> dict[str, float | None]:
    """``{"loss", "accuracy", "perplexity"}`` of ``model`` on ``data`` in eval mode.

    Accuracy is the argmax match rate when targets are class indices of ``(N, C)`` outputs;
    perplexity is ``exp(loss)`` for a mean cross-entropy (per token for a language model);
    ``None`` where they do not apply.
    """
    X, y = _concat(data)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*X) if isinstance(X, tuple) else model(X)
            loss = float(loss_fn(out, y))
    finally:
        model.train(was)
    acc = None
    if not y.dtype.is_floating_point and out.ndim == 2 and y.ndim == 1:
        acc = float((out.argmax(1) == y).double().mean())
    ppl = math.exp(min(loss, 700.0)) if _is_mean_cross_entropy(loss_fn) else None
    return {"loss": loss, "accuracy": acc, "perplexity": ppl}


def _f(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass(frozen=True)
class CompressionReport:
    """Accuracy/loss of a model after each compression method at each level.

    Attributes:
        name: model name.
        dense: ``{"loss", "accuracy"}`` of the uncompressed model.
        pruning: rows ``{"method", "sparsity", "loss", "accuracy", "seconds"}``.
        quantization: rows ``{"method", "bits", "loss", "accuracy", "layer_error",
            "seconds"}`` (``layer_error``: relative output error of each layer).
        mixed: rows ``{"method", "average_bits", "bits" (per layer), "size_bits", "loss",
            "accuracy"}`` from HAWQ-v2 sensitivity + exact bit allocation.
        settings: the options used.
        converged: every run finished.
        metric: the headline number of the tables and plots: ``"accuracy"`` (classifiers),
            ``"perplexity"`` (language models) or ``"loss"``.
    """

    name: str
    dense: dict[str, float | None]
    pruning: list[dict[str, Any]] = field(default_factory=list)
    quantization: list[dict[str, Any]] = field(default_factory=list)
    mixed: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    converged: bool = True
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        return json.loads(json.dumps(d, default=_f), parse_constant=lambda _: None)

    def to_markdown(self) -> str:
        """The report as Markdown tables."""

        def fmt(v: Any) -> str:
            return "-" if v is None else f"{v:.4f}"

        key = self.metric
        base = self.dense.get(key)

        def cell(r: dict[str, Any]) -> str:
            v = r.get(key)
            rel = f" {v / base - 1:+.1%}" if key == "perplexity" and v is not None and base else ""
            return f"{fmt(v)}{rel}" + ("" if key == "loss" else f" ({fmt(r['loss'])})")

        what = f"test {key}" + ("" if key == "loss" else " (loss)")
        lines = [f"# Compression report: {self.name}", ""]
        lines.append(
            f"Dense model: {key} {fmt(base)}"
            + ("" if key == "loss" else f", loss {fmt(self.dense['loss'])}")
            + "."
        )
        if self.pruning:
            methods = list(dict.fromkeys(r["method"] for r in self.pruning))
            levels = sorted({r["sparsity"] for r in self.pruning})
            lines += ["", f"## Pruning (no fine-tuning): {what}", ""]
            lines.append("| sparsity | " + " | ".join(methods) + " |")
            lines.append("|---" * (len(methods) + 1) + "|")
            for s in levels:
                cells = []
                for m in methods:
                    r = next(r for r in self.pruning if r["method"] == m and r["sparsity"] == s)
                    cells.append(cell(r))
                lines.append(f"| {s:.2f} | " + " | ".join(cells) + " |")
        if self.quantization:
            methods = list(dict.fromkeys(r["method"] for r in self.quantization))
            levels = sorted({r["bits"] for r in self.quantization}, reverse=True)
            lines += ["", f"## Quantization: {what}; worst layer output error", ""]
            lines.append("| bits | " + " | ".join(methods) + " |")
            lines.append("|---" * (len(methods) + 1) + "|")
            for b in levels:
                cells = []
                for m in methods:
                    r = next(r for r in self.quantization if r["method"] == m and r["bits"] == b)
                    worst = max(r["layer_error"].values())
                    cells.append(f"{cell(r)}; {worst:.3g}")
                lines.append(f"| {b} | " + " | ".join(cells) + " |")
        if self.mixed:
            lines += ["", "## Mixed precision (HAWQ-v2 sensitivity, exact allocation)", ""]
            lines.append(f"| method | average bits | bits per layer | {key} | loss |")
            lines.append("|---|---|---|---|---|")
            for r in self.mixed:
                per = ", ".join(f"{k}:{v}" for k, v in r["bits"].items())
                lines.append(
                    f"| {r['method']} | {r['average_bits']:.2f} | {per} | "
                    f"{fmt(r.get(key))} | {fmt(r['loss'])} |"
                )
        return "\n".join(lines) + "\n"

    def save(self, out: str | Path, *, plot: bool = True) -> list[Path]:
        """Write ``compress.json``, ``compress.md`` and (with matplotlib) ``compress.png``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "compress.json", out / "compress.md"]
        files[0].write_text(json.dumps(self.to_dict(), indent=2))
        files[1].write_text(self.to_markdown())
        if plot:
            from ..plot.compress import plot_compression

            files.append(out / "compress.png")
            plot_compression(self, files[-1], metric=self.metric)
        return files


def compression_report(
    model: nn.Module,
    loss_fn: Callable,
    train: Any,
    test: Any = None,
    *,
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9),
    prune_methods: Sequence[str] = ("magnitude", "obd", "obs"),
    bits: Sequence[int] = (2, 3, 4, 8),
    quant_methods: Sequence[str] = ("rtn", "obs"),
    average_bits: Sequence[float] = (3.0,),
    scope: str = "global",
    prune_kwargs: dict[str, Any] | None = None,
    quantize_kwargs: dict[str, Any] | None = None,
    name: str = "model",
    metric: str = "accuracy",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> CompressionReport:
    """Compress copies of ``model`` with every method at every level; measure on ``test``.

    Pruning is one-shot (no fine-tuning) with :func:`hesse.compress.prune`; quantization uses
    :func:`hesse.compress.quantize` with ``train`` as calibration data; mixed precision takes
    :func:`layer_sensitivity` (HAWQ-v2) on ``train``, :func:`allocate_bits` at each
    ``average_bits`` budget, and quantizes with each of ``quant_methods``.

    Args:
        model: the trained model (not modified).
        loss_fn: its loss.
        train: curvature / calibration data (``(X, y)`` or batches).
        test: evaluation data (default ``train``).
        sparsities: pruning levels in ``[0, 1)``.
        prune_methods: subset of ``("magnitude", "obd", "obs")``.
        bits: uniform bit widths.
        quant_methods: subset of ``("rtn", "obs")``.
        average_bits: mixed-precision budgets (bits per weight); empty to skip.
        scope: pruning scope, ``"global"`` or ``"layer"``.
        prune_kwargs, quantize_kwargs: extra options for :func:`prune` / :func:`quantize`.
        name: label for the report.
        metric: headline number of the tables: ``"accuracy"`` (default), ``"perplexity"``
            (``exp`` of a mean cross-entropy: language models) or ``"loss"``; every row
            records all three where they apply.
        generator: randomness of the Hutchinson traces in the sensitivity.
        progress: print one line per run to stderr.

    Returns:
        :class:`CompressionReport`.
    """
    metric = check_choice(metric, "metric", METRICS)
    for m in prune_methods:
        check_choice(m, "prune method", [x.value for x in PruneMethod])
    for m in quant_methods:
        check_choice(m, "quantization method", [x.value for x in QuantMethod])
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ValueError(f"Invalid sparsity {s!r}; every level must lie in [0, 1).")
    test = train if test is None else test
    prune_kwargs = dict(prune_kwargs or {})
    quantize_kwargs = dict(quantize_kwargs or {})

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    dense = evaluate(model, loss_fn, test)
    if dense[metric] is None:
        raise ValueError(
            f"metric={metric!r} does not apply to this model and loss (accuracy needs class "
            "labels of (N, C) outputs, perplexity a mean cross-entropy); pass metric='loss'."
        )
    pruning, quantization, mixed = [], [], []
    for method in prune_methods:
        for s in sparsities:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            prune(m, loss_fn, train, float(s), method=method, scope=scope, **prune_kwargs)
            row = {"method": method, "sparsity": float(s), **evaluate(m, loss_fn, test)}
            row["measured_sparsity"] = sparsity_of(m)["global"]
            row["seconds"] = time.perf_counter() - t0
            pruning.append(row)
            log(f"prune {method} {s:.2f}: {metric} {row[metric]}, loss {row['loss']:.4f}")
    for method in quant_methods:
        for b in bits:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            res = quantize(m, train, int(b), method=method, **quantize_kwargs)
            row = {"method": method, "bits": int(b), **evaluate(m, loss_fn, test)}
            row["layer_error"] = dict(res.layer_error)
            row["seconds"] = time.perf_counter() - t0
            quantization.append(row)
            log(f"quantize {method} {b} bits: {metric} {row[metric]}")
    if average_bits and quant_methods:
        sens = layer_sensitivity(model, loss_fn, train, tuple(bits), generator=generator)
        for avg in average_bits:
            alloc = allocate_bits(sens, average_bits=float(avg))
            for method in quant_methods:
                m = copy.deepcopy(model)
                res = quantize(m, train, alloc.bits, method=method, **quantize_kwargs)
                row = {
                    "method": method,
                    "average_bits": res.size_bits / sum(res.num_weights.values()),
                    "budget_average_bits": float(avg),
                    "bits": dict(alloc.bits),
                    "size_bits": res.size_bits,
                    **evaluate(m, loss_fn, test),
                }
                mixed.append(row)
                log(f"mixed {method} {avg} bits/weight: {alloc.bits} {metric} {row[metric]}")
    return CompressionReport(
        name=name,
        metric=metric,
        dense=dense,
        pruning=pruning,
        quantization=quantization,
        mixed=mixed,
        settings={
            "scope": scope,
            "prune_kwargs": {k: repr(v) for k, v in prune_kwargs.items()},
            "quantize_kwargs": {k: repr(v) for k, v in quantize_kwargs.items()},
        },
    )
