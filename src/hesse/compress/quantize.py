r"""Weight quantization: round-to-nearest and the layer-wise second-order (OBS/GPTQ) quantizer.

Both use the same grid: per output row (channel), asymmetric, ``2^bits`` levels spanning
``[min(w, 0), max(w, 0)]`` of the row, so zero is exactly representable and a pruned weight
stays zero.

The second-order quantizer solves, layer by layer, the OBS problem for the layer's output
reconstruction error on calibration inputs ``X`` (``N x d_in``):

.. math::
    \min_{\hat W \in \text{grid}} \lVert (W - \hat W) X^\top \rVert_F^2, \qquad
    H = 2 X^\top X \;(\text{per row, shared}),

quantizing one input column at a time and moving the not-yet-quantized columns by the OBS
correction :math:`\delta = -\frac{w_q - \hat w_q}{[H^{-1}]_{qq}} H^{-1}_{q,:}`. With the upper
Cholesky factor :math:`U` of :math:`H^{-1}` the successive inverses of the remaining blocks
are the rows of :math:`U`, so the whole pass is one Cholesky and ``d_in`` rank-1 updates
(Frantar et al. 2022, GPTQ; Frantar & Alistarh 2022, OBC).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int, check_positive
from ..operators.kfac import KFACUse
from .saliency import WeightRef, compressible_weights

__all__ = [
    "QuantMethod",
    "QuantizeResult",
    "quantize",
    "quantize_rtn",
    "quantize_obs",
    "quantization_grid",
    "layer_inputs_hessian",
    "layer_hessians",
]


class QuantMethod(str, Enum):
    OBS = "obs"
    RTN = "rtn"


def _check_bits(bits: Any, name: str = "bits") -> int:
    return check_int(bits, name, minimum=1, maximum=16)


def quantization_grid(
    W: Tensor, bits: int, shrink: float | Tensor = 1.0
) -> tuple[Tensor, Tensor, int]:
    """Per-row asymmetric grid ``(scale (rows, 1), zero (rows, 1), maxq)`` for a 2-D ``W``.

    The grid has ``2^bits`` levels from ``shrink * min(w, 0)`` to ``shrink * max(w, 0)`` of each
    row (``shrink`` < 1 clips the extremes), so 0 is always a level.
    """
    bits = _check_bits(bits)
    maxq = 2**bits - 1
    lo = W.min(1, keepdim=True).values.clamp_max(0) * shrink
    hi = W.max(1, keepdim=True).values.clamp_min(0) * shrink
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale)
    return scale, zero, maxq


def _q(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    return (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero) * scale


def _shrinks(grid: str, num_grid: int, dtype: torch.dtype) -> Tensor:
    grid = check_choice(grid, "grid", ("minmax", "search"))
    if grid == "minmax":
        return torch.ones(1, dtype=dtype)
    num_grid = check_int(num_grid, "num_grid", minimum=2)
    return torch.linspace(1.0, 0.3, num_grid, dtype=dtype)


def _best_per_row(W: Tensor, Qs: Tensor, H: Tensor | None) -> Tensor:
    """Pick, row by row, the candidate (first dim of ``Qs``) with the smallest error."""
    D = W.unsqueeze(0) - Qs
    err = ((D @ H) * D).sum(-1) if H is not None else D.pow(2).sum(-1)  # (c, rows)
    best = err.argmin(0)
    return Qs[best, torch.arange(W.shape[0], device=W.device)]


def quantize_rtn(W: Tensor, bits: int, *, grid: str = "minmax", num_grid: int = 16) -> Tensor:
    """Round every entry of ``W`` (2-D, rows = output channels) to its row's grid.

    ``grid="minmax"`` (default, the classic baseline) spans each row's range;
    ``grid="search"`` picks per row the clipping (``num_grid`` candidates) with the smallest
    weight error ``||w - q||^2``.
    """
    W = W.detach()
    Qs = torch.stack(
        [_q(W, *quantization_grid(W, bits, float(s))) for s in _shrinks(grid, num_grid, W.dtype)]
    )
    return _best_per_row(W, Qs, None)


def inverse_cholesky(H: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``; ``H`` positive definite).

    Row ``i`` of ``U`` divided by ``U_ii`` is the OBS correction of eliminating column ``i``
    into the columns after it, and ``U_ii^2 = [(H_{>=i, >=i})^{-1}]_ii``: the inverses of
    all trailing blocks from one factorisation (Frantar et al. 2022).
    """
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        raise ValueError(
            "The damped layer Hessian is not positive definite; increase damping (got a "
            f"failed Cholesky at column {int(info)} of {H.shape[0]})."
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _nearest_plane(W: Tensor, U: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """GPTQ/OBS pass over the columns of ``W`` with ``U = chol(H^-1)`` (upper)."""
    W = W.clone()
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        w = W[:, i]
        q = _q(w.unsqueeze(1), scale, zero, maxq).squeeze(1)
        Q[:, i] = q
        err = (w - q) / U[i, i]
        W[:, i + 1 :] -= err.unsqueeze(1) * U[i, i + 1 :].unsqueeze(0)
    return Q


def _refine(
    W: Tensor, Q: Tensor, H: Tensor, scale: Tensor, zero: Tensor, maxq: int, passes: int
) -> Tensor:
    """Coordinate descent on the grid for ``tr((W - Q) H (W - Q)^T)`` (never increases it)."""
    Q = Q.clone()
    R = (W - Q) @ H
    h = torch.diagonal(H)
    for _ in range(passes):
        for j in range(H.shape[0]):
            if h[j] <= 0:
                continue
            qn = _q((Q[:, j] + R[:, j] / h[j]).unsqueeze(1), scale, zero, maxq).squeeze(1)
            step = qn - Q[:, j]
            Q[:, j] = qn
            R -= step.unsqueeze(1) * H[j].unsqueeze(0)
    return Q


def quantize_obs(
    W: Tensor,
    H: Tensor,
    bits: int,
    *,
    damping: float = 0.01,
    act_order: bool = True,
    grid: str = "search",
    num_grid: int = 16,
    refine: int = 4,
) -> Tensor:
    r"""Second-order (OBS/GPTQ) quantization of ``W (rows, d_in)`` for input Hessian ``H``.

    Minimises the layer output error :math:`\operatorname{tr}((W - Q) H (W - Q)^\top)` over
    per-row grids: the OBS column pass (Cholesky form), then ``refine`` passes of exact
    coordinate descent on the same objective (each can only lower it). With
    ``grid="search"`` the pass runs for ``num_grid`` clippings of the grid at once and every
    row keeps the one with the smallest output error (``"minmax"``: the RTN grid only). The
    round-to-nearest solution is always one of the candidates, so the output error is never
    larger than RTN's.

    Args:
        W: weights, rows = output channels.
        H: ``(d_in, d_in)`` input second moment (``X^T X`` up to scale; PSD).
        bits: grid bits.
        damping: ``H + damping * mean(diag H) * I`` for the column pass (> 0).
        act_order: quantize columns by decreasing ``H_qq`` (helps at low bits).
        grid: ``"search"`` (default) or ``"minmax"``.
        num_grid: clipping candidates for ``grid="search"``.
        refine: coordinate-descent passes (0 = plain GPTQ).

    Returns:
        Quantized weights (float64), same shape as ``W``; every row on its own grid.

    Cost: one ``d_in^3`` Cholesky and ``num_grid * rows * d_in^2 * (1 + refine)``.

    References:
        Frantar, Ashkboos, Hoefler & Alistarh (2022), GPTQ. Frantar & Alistarh (2022),
        Optimal Brain Compression. Hassibi & Stork (1993), OBS.
    """
    damping = check_positive(damping, "damping")
    refine = check_int(refine, "refine", minimum=0)
    W = W.detach().double()
    H = H.detach().double().clone()
    H_true = H.clone()
    d = H.shape[0]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = (
        torch.argsort(torch.diagonal(H), descending=True)
        if act_order
        else torch.arange(d, device=H.device)
    )
    Hp = H[perm][:, perm]
    Hp += damping * torch.diagonal(Hp).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = inverse_cholesky(Hp)
    shrinks = _shrinks(grid, num_grid, W.dtype)
    grids = [quantization_grid(W, bits, float(s)) for s in shrinks]
    c, rows = len(grids), W.shape[0]
    scale = torch.cat([g[0] for g in grids])
    zero = torch.cat([g[1] for g in grids])
    maxq = grids[0][2]
    Wp = W[:, perm].clone()
    Wp[:, dead[perm]] = 0.0
    Qp = _nearest_plane(Wp.repeat(c, 1), U, scale, zero, maxq)
    Q = torch.empty_like(Qp)
    Q[:, perm] = Qp
    # round-to-nearest on the min-max grid is one more candidate: never worse than RTN
    s1, z1, _ = grids[0] if float(shrinks[0]) == 1.0 else quantization_grid(W, bits)
    Q = torch.cat([Q, _q(W, s1, z1, maxq)])
    scale, zero = torch.cat([scale, s1]), torch.cat([zero, z1])
    if refine:
        Q = _refine(W.repeat(c + 1, 1), Q, H_true, scale, zero, maxq, refine)
    return _best_per_row(W, Q.reshape(c + 1, rows, d), H_true)


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` did.

    Attributes:
        method: ``"obs"`` or ``"rtn"``.
        bits: ``{weight name: bits}``.
        layer_error: ``{weight name: ||(W - Q) X^T||_F^2 / ||W X^T||_F^2}`` on the
            calibration inputs each layer saw when it was quantized.
        num_weights: ``{weight name: entries}``.
        size_bits: total bits of the quantized weights (biases and grids not counted).
        converged: always ``True`` (the quantizers are direct methods).
    """

    method: str
    bits: dict[str, int]
    layer_error: dict[str, float]
    num_weights: dict[str, int]
    size_bits: int
    converged: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


def _inputs_of(data: Any) -> list[Any]:
    if isinstance(data, Tensor):
        return [data]
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and (isinstance(data[0], Tensor))
    ):
        return [data[0]]
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(
            "data must be inputs X, an (X, y) pair or an iterable of (X, y) batches; got "
            f"{type(data).__name__}."
        ) from None
    if not batches:
        raise ValueError("data is empty: expected at least one batch of calibration inputs.")
    out = []
    for b in batches:
        if isinstance(b, Mapping):  # a Hugging Face batch: the model's keyword inputs
            out.append({k: v for k, v in b.items() if k != "labels"})
        else:
            out.append(b[0] if isinstance(b, (tuple, list)) else b)
    return out


def _transposed(ref: WeightRef) -> bool:
    """HF ``Conv1D`` stores ``(in, out)``: its quantization matrix is the transpose."""
    kinds = {u.kind for u in ref.layer.uses if u.kind != "embedding"}
    if len(kinds) > 1 and "conv1d_hf" in kinds:
        raise NotImplementedError(
            f"{ref.name} is used both as an HF Conv1D (in, out) and as a Linear/Conv "
            "(out, in) weight; quantize cannot pick one orientation for it."
        )
    return kinds == {"conv1d_hf"}


def _as_matrix(ref: WeightRef, t: Tensor | None = None) -> Tensor:
    """The weight (or a weight-shaped ``t``, e.g. its mask) as ``(out, in)`` rows (one grid
    per output channel)."""
    W = ref.weight.detach() if t is None else t
    return W.T if _transposed(ref) else W.reshape(W.shape[0], -1)


def _from_matrix(ref: WeightRef, Q: Tensor) -> Tensor:
    """Inverse of :func:`_as_matrix`: ``(out, in)`` rows back to the parameter's shape."""
    return (Q.T if _transposed(ref) else Q).reshape(ref.param.shape)


def layer_inputs_hessian(model: nn.Module, ref: WeightRef, inputs: Sequence[Any]) -> Tensor:
    r"""``sum_n x_n x_n^T`` over the input rows of the weight's use (float64).

    The rows are the registry's (:class:`hesse.operators.kfac.KFACUse`: every leading
    dimension, strided patches for convolutions).

    A weight with several uses (found by identity: GPT-2's ``wte`` / ``lm_head``, the LM
    workload's ``tok`` / ``head``) is compressed once, for all of them, as the output layer
    (rows = vocabulary entries, one grid per row). Each use ``u`` has its own Hessian
    :math:`H_u`: the output layer's is :math:`X^\top X` of its inputs (the final hidden
    states); the lookup use has no input covariance (its inputs are one-hot indices), and its
    output error :math:`\sum_v n_v \lVert \Delta W_v \rVert^2` (``n_v`` lookups of row ``v``)
    would need a per-row Hessian ``n_v I``, which the shared-``H`` solvers replace by the
    mean count: :math:`H_u = \bar n I`. The uses' outputs live in different spaces (logits,
    the residual stream), so their raw errors are not comparable; the returned ``H`` is the
    sum of the uses' *relative* output errors,

    .. math::
        H = \sum_u \frac{H_u}{\operatorname{tr}(W H_u W^\top)},

    each use's Hessian divided by its output energy at the current weights (on the LM's tied
    embedding the plain sum would let the output layer's term outweigh the lookup's 800
    times, and OBS pruning would end worse than magnitude). A single use returns
    :math:`X^\top X` itself.
    """
    uses = [KFACUse(u.name, u.module, with_bias=False) for u in ref.layer.uses]
    acc: list[list[Tensor]] = [[] for _ in uses]
    handles = []
    for i, use in enumerate(uses):

        def hook(mod: nn.Module, args: tuple, _out: Any, use: KFACUse = use, i: int = i) -> None:
            rows = use.input_rows(args[0])
            if use.kind == "embedding":
                d = ref.layer.weight.shape[1]
                n = rows.numel() / ref.layer.weight.shape[0]
                acc[i].append(n * torch.eye(d, dtype=torch.float64, device=rows.device))
            else:
                X = rows.double()
                acc[i].append(X.T @ X)

        handles.append(use.module.register_forward_hook(hook))
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for X in inputs:
                if isinstance(X, Mapping):
                    model(**X)
                elif isinstance(X, (tuple, list)):
                    model(*X)
                else:
                    model(X)
    finally:
        for h in handles:
            h.remove()
        for m, t in was.items():
            m.training = t
    Hs = [torch.stack(a).sum(0) for a in acc if a]
    if len(Hs) == 1:
        return Hs[0]
    W = _as_matrix(ref).double()
    energy = [float(torch.trace(W @ H @ W.T)) for H in Hs]
    if min(energy) <= 0:  # a zero weight (or inputs): no scale to compare; plain sum
        return torch.stack(Hs).sum(0)
    return torch.stack([H / e for H, e in zip(Hs, energy)]).sum(0)


def layer_hessians(
    model: nn.Module, refs: Sequence[WeightRef], inputs: Sequence[Any], sequential: bool = True
) -> Iterator[tuple[WeightRef, Tensor]]:
    """Yield ``(ref, layer_inputs_hessian(model, ref, inputs))`` for each weight in order.

    With ``sequential=True`` each ``H`` is collected when it is asked for, i.e. after the
    caller changed the weights yielded before it (layer-wise compression in order, each layer
    seeing the inputs the already-compressed layers produce); otherwise all of them first.
    """
    if sequential:
        for r in refs:
            yield r, layer_inputs_hessian(model, r, inputs)
    else:
        Hs = [layer_inputs_hessian(model, r, inputs) for r in refs]
        yield from zip(refs, Hs)


def _write(ref: WeightRef, Q: Tensor) -> None:
    """Write the quantized matrix once (a tied weight is one tensor) and refresh every
    masked use."""
    target = ref.param
    with torch.no_grad():
        target.copy_(_from_matrix(ref, Q).to(target.dtype))
        for m in ref.modules:
            if hasattr(m, "weight_mask"):
                m.weight = target * m.weight_mask


def quantize(
    model: nn.Module,
    data: Any,
    bits: int | Mapping[str, int] = 4,
    *,
    method: str | QuantMethod = "obs",
    layers: Sequence[str] | None = None,
    damping: float = 0.01,
    act_order: bool = True,
    grid: str | None = None,
    num_grid: int = 16,
    refine: int = 4,
    sequential: bool = True,
) -> QuantizeResult:
    """Quantize the weights of every Linear/Conv/HF Conv1D layer in place (fake quantization).

    A weight tied between modules is quantized once, with the calibration inputs of all its
    uses (see :func:`layer_inputs_hessian`).

    Weights are replaced by their dequantized grid values (per-row asymmetric ``bits``-bit
    grid, see :func:`quantization_grid`); biases stay in floating point.

    * ``"rtn"``: round to nearest (the baseline).
    * ``"obs"``: the layer-wise second-order quantizer :func:`quantize_obs` with
      ``H = 2 X^T X`` from the calibration inputs ``X`` of each layer.

    With ``sequential=True`` (default) layers are quantized in order and each sees the inputs
    produced by the already-quantized layers before it (errors do not compound unseen).

    Args:
        model: network (modified in place).
        data: calibration inputs: ``X``, ``(X, y)`` or an iterable of batches.
        bits: bits for every layer, or ``{weight name | module name: bits}`` (e.g. from
            :func:`allocate_bits`); layers missing from a dict are left alone.
        method: ``"obs"`` (default) or ``"rtn"``.
        layers: module names to quantize (default every Linear/Conv layer).
        damping: relative damping of ``H`` for ``"obs"``.
        act_order: ``"obs"`` quantizes columns by decreasing ``H_qq``.
        grid: ``"minmax"`` or ``"search"`` (per-row clipping search: by output error for
            ``"obs"``, by weight error for ``"rtn"``); default ``"search"`` for ``"obs"`` and
            ``"minmax"`` (the classic baseline) for ``"rtn"``.
        num_grid: clipping candidates for ``grid="search"``.
        refine: coordinate-descent passes after the OBS column pass (``"obs"`` only).
        sequential: collect each layer's inputs after quantizing the layers before it.

    Returns:
        :class:`QuantizeResult` with the relative output error of each layer.

    Example:
        >>> r = quantize(model, X_calib, bits=3, method="obs")   # doctest: +SKIP
        >>> r.layer_error                                        # doctest: +SKIP
    """
    method = check_choice(method, "method", [m.value for m in QuantMethod])
    damping = check_positive(damping, "damping")
    refs = compressible_weights(model, layers)
    if isinstance(bits, Mapping):
        per: dict[str, int] = {}
        known = {r.name for r in refs} | {r.module_name for r in refs}
        unknown = [k for k in bits if k not in known]
        if unknown:
            raise ValueError(f"bits names {unknown} match no layer; layers: {sorted(known)}.")
        for r in refs:
            b = bits.get(r.name, bits.get(r.module_name))
            if b is not None:
                per[r.name] = _check_bits(b, f"bits[{r.name!r}]")
        refs = [r for r in refs if r.name in per]
    else:
        b = _check_bits(bits)
        per = {r.name: b for r in refs}
    errors: dict[str, float] = {}
    for r, H in layer_hessians(model, refs, _inputs_of(data), sequential):
        W = check_finite(_as_matrix(r), f"the weights of {r.name}")
        check_finite(H, f"the calibration inputs of {r.name}")
        if method == "rtn":
            Q = quantize_rtn(W.double(), per[r.name], grid=grid or "minmax", num_grid=num_grid)
        else:
            Q = quantize_obs(
                W,
                H,
                per[r.name],
                damping=damping,
                act_order=act_order,
                grid=grid or "search",
                num_grid=num_grid,
                refine=refine,
            )
        D = W.double() - Q
        num = torch.trace(D @ H @ D.T)
        den = torch.trace(W.double() @ H @ W.double().T)
        errors[r.name] = float(num / den) if float(den) > 0 else 0.0
        _write(r, Q)
    return QuantizeResult(
        method=method,
        bits=per,
        layer_error=errors,
        num_weights={r.name: r.numel for r in refs},
        size_bits=sum(per[r.name] * r.numel for r in refs),
    )
