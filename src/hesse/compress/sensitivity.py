r"""Layer sensitivity to quantization (HAWQ-v2) and exact mixed-precision bit allocation.

HAWQ-v2 (Dong et al. 2020) scores layer ``l`` at ``b`` bits by

.. math::
    \Omega_l(b) = \frac{\operatorname{tr}(H_{ll})}{n_l}\,\lVert Q_b(W_l) - W_l \rVert_2^2,

the mean Hessian eigenvalue of the layer block times the squared quantization perturbation;
:math:`\tfrac12 \Omega_l(b)` is the second-order loss increase of a perturbation of that size
in a random direction. :func:`allocate_bits` then minimises :math:`\sum_l \Omega_l(b_l)` subject
to :math:`\sum_l n_l b_l \le` budget, exactly (a multiple-choice knapsack solved on its Pareto
frontier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_int
from .quantize import quantize_rtn
from .saliency import compressible_weights, diagonal

__all__ = [
    "SensitivityResult",
    "BitAllocation",
    "layer_sensitivity",
    "allocate_bits",
    "spearman",
]


@dataclass(frozen=True)
class SensitivityResult:
    """Per-layer quantization sensitivity (HAWQ-v2).

    Attributes:
        layers: weight names, in model order.
        bits: the bit widths scored.
        num_weights: ``{layer: n_l}``.
        mean_trace: ``{layer: tr(H_ll) / n_l}``.
        trace_stderr: ``{layer: standard error of mean_trace}`` (0 when exact).
        perturbation: ``{layer: {bits: ||Q_b(W) - W||^2}}`` (round to nearest, min-max grid).
        sensitivity: ``{layer: {bits: mean_trace * perturbation}}``.
        measured: ``{layer: {bits: actual loss increase}}`` when ``measure=True``, else ``None``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_matvecs: curvature products used.
        converged: every trace is exact or has a finite standard error.
    """

    layers: list[str]
    bits: tuple[int, ...]
    num_weights: dict[str, int]
    mean_trace: dict[str, float]
    trace_stderr: dict[str, float]
    perturbation: dict[str, dict[int, float]]
    sensitivity: dict[str, dict[int, float]]
    measured: dict[str, dict[int, float]] | None
    curvature: str
    num_matvecs: int
    converged: bool

    def ranking(self, bits: int) -> list[str]:
        """Layers from most to least sensitive at ``bits``."""
        return sorted(self.layers, key=lambda k: -self.sensitivity[k][bits])

    def rank_correlation(self, bits: int | None = None) -> float:
        """Spearman correlation of ``sensitivity`` with ``measured`` (over layers at ``bits``,
        or over every (layer, bits) pair when ``bits`` is ``None``)."""
        if self.measured is None:
            raise ValueError("No measured loss increases: call layer_sensitivity(measure=True).")
        keys = [(k, b) for k in self.layers for b in (self.bits if bits is None else (bits,))]
        return spearman(
            [self.sensitivity[k][b] for k, b in keys], [self.measured[k][b] for k, b in keys]
        )


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"spearman needs two sequences of equal length >= 2; got {len(a)}, {len(b)}."
        )
    return float(spearmanr(a, b).statistic)


def _loss(model: nn.Module, loss_fn: Callable, data: Any) -> float:
    from ..objective import Objective

    return float(Objective(model, loss_fn, data, check_determinism=False).loss())


def layer_sensitivity(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    bits: Sequence[int] = (2, 3, 4, 8),
    *,
    curvature: str = "hessian",
    exact_max: int = 2048,
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
    measure: bool = False,
) -> SensitivityResult:
    r"""HAWQ-v2 sensitivity of every Linear/Conv weight: mean Hessian trace x perturbation.

    The trace of each layer's diagonal block is exact for layers with at most ``exact_max``
    weights (``n_l`` Hessian-vector products with unit vectors) and otherwise Hutchinson's
    estimate with ``num_matvecs`` Rademacher probes from ``generator``
    (:func:`hesse.linalg.hutchinson_trace`). ``curvature="ggn"`` uses the exact GGN diagonal
    instead (cheap, PSD). The perturbation is round-to-nearest on the per-row min-max grid.

    Args:
        model, loss_fn, data: as for :class:`hesse.HessianOperator`.
        bits: bit widths to score.
        curvature: ``"hessian"`` (default) or ``"ggn"``.
        exact_max: largest layer whose trace is computed exactly.
        num_matvecs: Hutchinson probes for larger layers.
        generator: randomness for the probes.
        layers: module names (default every Linear/Conv layer).
        measure: also quantize each layer alone (RTN) and record the actual loss increase
            (one loss evaluation per layer and bit width).

    Returns:
        :class:`SensitivityResult`.

    References:
        Dong, Yao, Arfeen, Gholami, Mahoney & Keutzer (2020), HAWQ-V2: Hessian Aware
        trace-Weighted Quantization of Neural Networks. NeurIPS 33.
    """
    curvature = check_choice(curvature, "curvature", ("hessian", "ggn"))
    bits = tuple(check_int(b, "bits", minimum=1, maximum=16) for b in bits)
    if not bits:
        raise ValueError("bits is empty: give at least one bit width, e.g. bits=(2, 4, 8).")
    refs = compressible_weights(model, layers)
    mean_trace, stderr = {}, {}
    used = 0
    converged = True
    if curvature == "ggn":
        diag = diagonal(model, loss_fn, data, refs, "ggn")
        for r in refs:
            mean_trace[r.name] = float(diag[r.name].sum()) / r.numel
            stderr[r.name] = 0.0
    else:
        from ..linalg import exact_diagonal, hutchinson_trace
        from ..operators import curvature_operator

        for r in refs:
            op = curvature_operator("hessian", model, loss_fn, data, params=[r.param_name])
            if r.numel <= exact_max:
                res = exact_diagonal(op)
                tr, se = float(res.estimate.sum()), 0.0
            else:
                res = hutchinson_trace(op, num_matvecs, generator=generator)
                tr, se = float(res.estimate), float(res.stderr)
                converged = converged and bool(torch.isfinite(res.stderr))
            used += res.num_matvecs
            mean_trace[r.name] = tr / r.numel
            stderr[r.name] = se / r.numel
    perturbation: dict[str, dict[int, float]] = {}
    for r in refs:
        W = r.weight.detach()
        W2 = W.reshape(W.shape[0], -1).double()
        perturbation[r.name] = {b: float((quantize_rtn(W2, b) - W2).pow(2).sum()) for b in bits}
    sens = {k: {b: mean_trace[k] * perturbation[k][b] for b in bits} for k in perturbation}
    measured = None
    if measure:
        base = _loss(model, loss_fn, data)
        measured = {}
        for r in refs:
            measured[r.name] = {}
            orig = r.param.detach().clone()
            try:
                for b in bits:
                    W = r.weight.detach()
                    Q = quantize_rtn(W.reshape(W.shape[0], -1).double(), b)
                    with torch.no_grad():
                        r.param.copy_(Q.reshape(orig.shape).to(orig.dtype))
                        if hasattr(r.module, "weight_mask"):
                            r.module.weight = r.param * r.module.weight_mask
                    measured[r.name][b] = _loss(model, loss_fn, data) - base
                    with torch.no_grad():
                        r.param.copy_(orig)
            finally:
                with torch.no_grad():
                    r.param.copy_(orig)
                    if hasattr(r.module, "weight_mask"):
                        r.module.weight = r.param * r.module.weight_mask
    return SensitivityResult(
        layers=[r.name for r in refs],
        bits=bits,
        num_weights={r.name: r.numel for r in refs},
        mean_trace=mean_trace,
        trace_stderr=stderr,
        perturbation=perturbation,
        sensitivity=sens,
        measured=measured,
        curvature=curvature,
        num_matvecs=used,
        converged=converged,
    )


# -- bit allocation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BitAllocation:
    """An exact solution of ``min sum_l cost_l(b_l)  s.t.  sum_l n_l b_l <= budget_bits``.

    Attributes:
        bits: ``{layer: bits}``.
        size_bits: ``sum_l n_l b_l`` of the solution (always ``<= budget_bits``).
        budget_bits: the budget.
        objective: ``sum_l cost_l(b_l)`` of the solution.
        frontier: the Pareto frontier ``((size_bits, objective), ...)`` of all allocations,
            sizes increasing, objectives decreasing (every optimal trade-off).
        converged: ``True`` (the solver is exact).
    """

    bits: dict[str, int]
    size_bits: int
    budget_bits: int
    objective: float
    frontier: tuple[tuple[int, float], ...]
    converged: bool = True


def allocate_bits(
    sensitivity: SensitivityResult | Mapping[str, Mapping[int, float]],
    budget_bits: int | None = None,
    *,
    average_bits: float | None = None,
    num_weights: Mapping[str, int] | None = None,
) -> BitAllocation:
    r"""Mixed precision: the bit width of each layer minimising total sensitivity under a budget.

    .. math::
        \min_{b_l \in B_l} \sum_l \Omega_l(b_l) \quad \text{s.t.} \quad
        \sum_l n_l b_l \le \text{budget}

    solved exactly by dynamic programming over Pareto-optimal partial allocations (layer by
    layer, keeping only allocations not beaten in both size and objective). The frontier has
    at most as many points as distinct sizes, so this is fast for any realistic network.

    Args:
        sensitivity: a :class:`SensitivityResult` or ``{layer: {bits: cost}}``.
        budget_bits: total bits for the weights (an int), or
        average_bits: the budget as bits per weight (``floor(average * sum n_l)``).
        num_weights: ``{layer: n_l}`` (taken from a :class:`SensitivityResult`).

    Returns:
        :class:`BitAllocation` (``size_bits <= budget_bits`` always).

    Raises:
        ValueError: no budget / both budgets / a budget below the smallest allocation.

    Example:
        >>> a = allocate_bits({"a": {2: 9.0, 4: 1.0}, "b": {2: 2.0, 4: 1.0}}, 12,
        ...                   num_weights={"a": 2, "b": 2})
        >>> a.bits, a.size_bits, a.objective
        ({'a': 4, 'b': 2}, 12, 3.0)
    """
    if isinstance(sensitivity, SensitivityResult):
        table = sensitivity.sensitivity
        num_weights = num_weights or sensitivity.num_weights
    else:
        table = {k: dict(v) for k, v in sensitivity.items()}
    if num_weights is None:
        raise ValueError("num_weights is required when sensitivity is a plain mapping.")
    layers = list(table)
    if not layers:
        raise ValueError("sensitivity is empty.")
    missing = [k for k in layers if k not in num_weights]
    if missing:
        raise ValueError(f"num_weights has no entry for {missing}.")
    total = sum(int(num_weights[k]) for k in layers)
    if (budget_bits is None) == (average_bits is None):
        raise ValueError("Give exactly one of budget_bits (total bits) or average_bits.")
    if average_bits is not None:
        if (
            isinstance(average_bits, bool)
            or not isinstance(average_bits, (int, float))
            or (average_bits <= 0)
        ):
            raise ValueError(f"Invalid average_bits={average_bits!r}; must be > 0.")
        budget = int(average_bits * total)
    else:
        budget = check_int(budget_bits, "budget_bits", minimum=0)
    # Pareto DP: states (size, objective, choices)
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for k in layers:
        n = int(num_weights[k])
        opts = sorted(table[k].items())
        if not opts:
            raise ValueError(f"No bit widths for layer {k!r}.")
        cand = [
            (s + n * int(b), v + float(c), ch + (int(b),))
            for s, v, ch in states
            for b, c in opts
            if s + n * int(b) <= budget
        ]
        cand.sort(key=lambda t: (t[0], t[1]))
        states = []
        best = float("inf")
        for t in cand:
            if t[1] < best:
                states.append(t)
                best = t[1]
        if not states:
            smallest = sum(int(num_weights[j]) * min(table[j]) for j in layers)
            raise ValueError(
                f"Budget {budget} bits is below the smallest allocation ({smallest} bits, "
                "every layer at its fewest bits)."
            )
    size, obj, choice = states[-1]
    return BitAllocation(
        bits=dict(zip(layers, choice)),
        size_bits=size,
        budget_bits=budget,
        objective=obj,
        frontier=tuple((s, v) for s, v, _ in states),
    )
