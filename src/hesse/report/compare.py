"""Two analysis reports side by side (before vs after training, two checkpoints, ...)."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_reports", "comparison_markdown"]

# (label, path into report.data)
_QUANTITIES = [
    ("loss", ("loss",)),
    ("gradient norm", ("gradient_norm",)),
    ("lambda_max", ("eigenvalues", "top", 0)),
    ("lambda_min", ("eigenvalues", "lambda_min")),
    ("trace (XTrace)", ("trace", "xtrace")),
    ("near-null fraction", ("spectrum", "near_null_fraction")),
    ("negative fraction", ("spectrum", "negative_fraction")),
    ("effective rank", ("spectrum", "effective_rank")),
    ("condition number", ("spectrum", "condition_number_positive")),
    ("max stable lr", ("learning_rate", "max_stable_lr")),
    ("recommended lr", ("learning_rate", "recommended_lr")),
]


def _get(d: Any, path: tuple) -> Any:
    for p in path:
        try:
            d = d[p]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def compare_reports(a: Any, b: Any) -> list[dict[str, Any]]:
    """Rows ``{"quantity", "a", "b", "change", "ratio"}`` for every number both reports hold
    (``a``, ``b``: :class:`AnalysisReport` or their ``data`` dicts); per-layer
    ``lambda_max`` rows are named ``"layer NAME lambda_max"``."""
    da, db = getattr(a, "data", a), getattr(b, "data", b)
    items = list(_QUANTITIES)
    la = _get(da, ("learning_rate", "per_layer")) or {}
    lb = _get(db, ("learning_rate", "per_layer")) or {}
    items += [
        (f"layer {k} lambda_max", ("learning_rate", "per_layer", k, "lambda_max"))
        for k in la
        if k in lb
    ]
    rows = []
    for label, path in items:
        x, y = _get(da, path), _get(db, path)
        if x is None and y is None:
            continue
        change = y - x if x is not None and y is not None else None
        ratio = y / x if change is not None and x != 0 else None
        row = {"quantity": label, "a": x, "b": y, "change": change, "ratio": ratio}
        if label == "condition number":  # '> X' when only a lower bound is known
            flag = ("spectrum", "condition_number_is_lower_bound")
            row["a_lower_bound"], row["b_lower_bound"] = bool(_get(da, flag)), bool(_get(db, flag))
            if row["a_lower_bound"] or row["b_lower_bound"]:
                row["change"] = row["ratio"] = None  # differences of bounds mean nothing
        rows.append(row)
    return rows


def comparison_markdown(a: Any, b: Any, labels: tuple[str, str] = ("A", "B")) -> str:
    def g(x: Any) -> str:
        return "-" if x is None else f"{x:.4g}"

    lines = [
        f"| quantity | {labels[0]} | {labels[1]} | change | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in compare_reports(a, b):
        va = ("> " if r.get("a_lower_bound") else "") + g(r["a"])
        vb = ("> " if r.get("b_lower_bound") else "") + g(r["b"])
        lines.append(f"| {r['quantity']} | {va} | {vb} | {g(r['change'])} | {g(r['ratio'])} |")
    return "\n".join(lines) + "\n"
