r"""Pruning with curvature: OBS, OBD and magnitude, global or per layer, weights or rows.

:func:`prune` computes saliencies with :mod:`hesse.compress.saliency` and only then touches
the model: it attaches the masks the way ``torch.nn.utils.prune`` does (``weight_orig``
parameter + ``weight_mask`` buffer, re-applied before every forward), so the removed weights
stay zero through fine-tuning.

For large models OBS also runs on the layer-wise reconstruction Hessian ``H = 2 X^T X`` of each
layer's calibration inputs (``curvature="layerwise"``, :func:`prune_layer_obs`; SparseGPT,
Frantar & Alistarh 2023): no loss curvature and no per-sample gradients, one Cholesky per
layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from .._checks import check_choice, check_finite, check_int, check_positive
from .quantize import _as_matrix, _from_matrix, _inputs_of, inverse_cholesky, layer_hessians
from .saliency import (
    CURVATURES,
    WeightRef,
    block_diagonal,
    block_size_for,
    compressible_weights,
    current_mask,
    damped,
    factor_matrix,
    magnitude_saliency,
    masked_inverse,
    obd_saliency,
    obs_group_saliency,
    obs_masked_update,
    obs_saliency,
    woodbury_inverse_diag,
    woodbury_masked_update,
)

__all__ = ["PruneMethod", "prune", "prune_layer_obs", "sparsity_of", "apply_mask"]

WOODBURY_MIN = 4096  # whole-layer blocks larger than this use the Woodbury form by default


class PruneMethod(str, Enum):
    OBS = "obs"
    OBD = "obd"
    MAGNITUDE = "magnitude"


def sparsity_of(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, float]:
    """Fraction of exactly-zero entries of each compressible weight, plus ``"global"``."""
    out, zeros, total = {}, 0, 0
    for ref in compressible_weights(model, layers):
        z = int((ref.weight.detach() == 0).sum())
        out[ref.name] = z / ref.numel
        zeros += z
        total += ref.numel
    out["global"] = zeros / total
    return out


def apply_mask(ref: WeightRef, mask: Tensor, new_weight: Tensor | None = None) -> None:
    """Attach ``mask`` with the ``torch.nn.utils.prune`` conventions (in place).

    Every module using the weight gets the parameter ``weight_orig`` (the same tensor for
    all of them, so a tied weight stays tied) and its own ``weight_mask`` buffer, and
    recomputes ``weight = weight_orig * weight_mask`` before every forward, so the zeros
    survive fine-tuning and ``torch.nn.utils.prune.remove`` makes them permanent.
    ``new_weight`` (e.g. an OBS-compensated weight) replaces the stored values first, once.
    An existing mask is replaced by ``mask`` (which must already contain it).
    """
    with torch.no_grad():
        if new_weight is not None:
            ref.param.copy_(new_weight)
        for m in ref.modules:
            if hasattr(m, "weight_orig"):
                m.weight_mask.copy_(mask.to(m.weight_mask.dtype))
                m.weight = m.weight_orig * m.weight_mask  # keep the attribute in sync now
            else:
                torch_prune.custom_from_mask(m, "weight", mask.to(ref.param.dtype))


def _units(t: Tensor, structured: bool) -> Tensor:
    """Entries (flat) or rows of a weight-shaped tensor."""
    return t.reshape(t.shape[0], -1) if structured else t.reshape(-1)


def _select(
    sal: dict[str, Tensor],
    cost: dict[str, int],
    need: dict[str, int] | int,
) -> dict[str, Tensor]:
    """Cheapest units to remove (``sal`` is ``inf`` on removed ones) until ``need`` weights go.

    ``need`` is a total (global scope) or a per-layer dict (layer scope). Returns a bool tensor
    per layer marking the newly removed units.
    """
    out = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in sal.items()}
    groups = [[k] for k in sal] if isinstance(need, dict) else [list(sal)]
    for names in groups:
        n_need = need[names[0]] if isinstance(need, dict) else need
        if n_need <= 0:
            continue
        s = torch.cat([sal[k].double().reshape(-1) for k in names])
        c = torch.cat([torch.full((sal[k].numel(),), cost[k], dtype=torch.long) for k in names]).to(
            s.device
        )
        order = torch.argsort(s, stable=True)
        finite = torch.isfinite(s[order])
        csum = torch.cumsum(c[order] * finite, 0)
        k_sel = int(torch.searchsorted(csum, torch.tensor(n_need, device=csum.device))) + 1
        chosen = order[:k_sel][finite[:k_sel]]
        flags = torch.zeros_like(s, dtype=torch.bool)
        flags[chosen] = True
        i = 0
        for k in names:
            n = sal[k].numel()
            out[k] = flags[i : i + n].reshape(sal[k].shape)
            i += n
    return out


def _targets(
    refs: list[WeightRef], masks: dict[str, Tensor], sparsity: float, scope: str
) -> dict[str, int] | int:
    """Weights still to remove to reach ``sparsity`` (per layer, or in total)."""
    removed = {r.name: int((~masks[r.name]).sum()) for r in refs}
    if scope == "layer":
        return {r.name: round(sparsity * r.numel) - removed[r.name] for r in refs}
    total = sum(r.numel for r in refs)
    return round(sparsity * total) - sum(removed.values())


def _remove(mask: Tensor, units: Tensor, structured: bool) -> Tensor:
    m = mask.clone()
    _units(m, structured)[units] = False  # a view of m
    return m


def prune_layer_obs(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    *,
    mask: Tensor | None = None,
    damping: float = 0.01,
    block_size: int | None = 128,
) -> tuple[Tensor, Tensor]:
    r"""Layer-wise OBS pruning of ``W (rows, d_in)`` for the input Hessian ``H`` (SparseGPT).

    Minimises the layer's output reconstruction error on its calibration inputs ``X``
    (``H = 2 X^T X``, damped to :math:`H_\lambda = H + \lambda I`,
    :math:`\lambda` = ``damping * mean(diag H)``), not the loss:

    .. math::
        \min_{M, \hat W} \operatorname{tr}\big((W - \hat W) H_\lambda (W - \hat W)^\top\big)
        \quad\text{s.t.}\quad \hat W_{r,q} = 0 \text{ off } M,\;
        \text{a fraction } \texttt{sparsity} \text{ of every row off } M.

    1. **Mask** (Frantar & Alistarh 2023): one pass over the columns with the upper Cholesky
       factor :math:`U` of :math:`H_\lambda^{-1}` (:func:`inverse_cholesky`), in blocks of
       ``block_size`` columns. At the start of a block every row removes its share of the
       block's columns with the smallest OBS saliency :math:`w_q^2 / U_{qq}^2`
       (:math:`U_{qq}^2 = [(H_{\geq q,\geq q})^{-1}]_{qq}`: the columns before ``q`` are
       fixed); each column is then eliminated with the OBS correction
       :math:`\delta = -\frac{w_q}{U_{qq}} U_{q,>q}` into the later columns of the block, and
       the block's accumulated corrections reach the later blocks in one matrix product
       (lazy updates).
    2. **Weights**: for the chosen mask each row's kept weights are set to the exact
       least-squares optimum :math:`\hat w_F = (H_{FF})^{-1} (H w)_F`
       (:func:`~hesse.compress.saliency.obs_masked_update`), which the sequential pass only
       approximates (it never moves a column after its turn).

    Args:
        W: weights, rows = output channels (float64 internally).
        H: ``(d_in, d_in)`` input second moment ``X^T X`` (any positive scale; PSD).
        sparsity: fraction of each row to remove, in ``[0, 1)``; rows of ``mask`` that are
            already sparser keep their zeros.
        mask: weights already removed (False), kept removed; default none.
        damping: relative damping of ``H`` (> 0).
        block_size: columns per lazy block and mask-selection step (``None``: the whole row
            is ranked once, at the start).

    Returns:
        ``(weights, mask)``: float64 weights (exactly zero off the mask) and the bool mask
        (True = kept), both of ``W``'s shape.

    Cost: one ``d_in^3`` Cholesky, ``rows * d_in^2`` for the pass, and ``rows * d_in^3 / 3``
    for the exact per-row solve (memory ``rows_chunk * d_in^2``).

    References:
        Frantar & Alistarh (2023), SparseGPT: Massive Language Models Can Be Accurately
        Pruned in One-Shot. Frantar & Alistarh (2022), Optimal Brain Compression. Hassibi &
        Stork (1993), Optimal Brain Surgeon.
    """
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not (0.0 <= sparsity < 1.0)
    ):
        raise ValueError(f"Invalid sparsity={sparsity!r}; must lie in [0, 1).")
    damping = check_positive(damping, "damping")
    W = W.detach().double()
    H = H.detach().double().clone()
    rows, d = W.shape
    if H.shape != (d, d):
        raise ValueError(
            f"Shape mismatch: H must be ({d}, {d}) for W {tuple(W.shape)}, got {tuple(H.shape)}."
        )
    step = d if block_size is None else check_int(block_size, "block_size")
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device).bool()
    W0 = W * keep
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H += damping * torch.diagonal(H).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = inverse_cholesky(H)
    Wk = W0.clone()
    Wk[:, dead] = 0.0  # inputs that are always zero: their weights do nothing
    # every row ends with at least round(sparsity * d) zeros (more if it had more already)
    target = torch.clamp_min(
        torch.full((rows,), round(sparsity * d), device=W.device), (~keep).sum(1)
    )
    done = torch.zeros(rows, dtype=torch.long, device=W.device)
    for i1 in range(0, d, step):
        i2 = min(i1 + step, d)
        W1, U1 = Wk[:, i1:i2].clone(), U[i1:i2, i1:i2]
        sal = W1.pow(2) / torch.diagonal(U1).pow(2)
        old = ~keep[:, i1:i2]
        sal[old] = -float("inf")  # already removed: first in line
        quota = torch.div(target * i2 + d // 2, d, rounding_mode="floor") - done
        quota = torch.maximum(quota.clamp(0, i2 - i1), old.sum(1))
        rank = torch.argsort(torch.argsort(sal, dim=1, stable=True), dim=1)
        drop = rank < quota.unsqueeze(1)
        keep[:, i1:i2] = ~drop
        done += drop.sum(1)
        E = torch.zeros_like(W1)
        for i in range(i2 - i1):
            err = torch.where(drop[:, i], W1[:, i], torch.zeros_like(W1[:, i])) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E[:, i] = err
        Wk[:, i1:i2] = W1
        Wk[:, i2:] -= E @ U[i1:i2, i2:]
    out = torch.empty_like(W0)
    chunk = max(1, 2**24 // (d * d))  # rows per batched solve (~128 MiB of float64 blocks)
    for r in range(0, rows, chunk):
        sl = slice(r, r + chunk)
        out[sl] = obs_masked_update(W0[sl], H.expand(W0[sl].shape[0], d, d), keep[sl])
    return out, keep


def prune(
    model: nn.Module,
    loss_fn: Callable | None = None,
    data: Any = None,
    sparsity: float = 0.7,
    *,
    method: str | PruneMethod = "obs",
    scope: str = "global",
    structured: bool | str = False,
    curvature: str = "ggn",
    block_size: int | None = 128,
    num_steps: int = 16,
    damping: float = 1e-2,
    recompute: bool = False,
    woodbury: bool | None = None,
    layers: Sequence[str] | None = None,
    chunk_size: int = 256,
    **obd_kwargs: Any,
) -> dict[str, Tensor]:
    r"""Prune ``model`` in place to ``sparsity`` and return the masks.

    * ``"magnitude"`` removes the smallest :math:`|w_q|` (the baseline).
    * ``"obd"`` removes the smallest :math:`\tfrac12 H_{qq} w_q^2` (one shot).
    * ``"obs"`` removes the smallest :math:`w_q^2 / (2[H^{-1}]_{qq})` and moves the remaining
      weights by the optimal correction :math:`\delta = -H_{FF}^{-1} H_{FR} w_R`, iteratively:
      ``num_steps`` rounds, each removing an equal share, re-ranking with the updated weights
      and the inverse of the curvature restricted to the weights still present.

    The curvature of each weight is block diagonal: exact GGN (``curvature="ggn"``, default)
    or empirical Fisher (``"fisher"``) blocks of ``block_size`` consecutive entries (whole
    rows, i.e. the incoming weights of ``block_size / row`` units; ``None`` = the whole layer
    block), damped by ``damping * mean(diag)``. Saliencies are loss increases of one
    objective, so a global ranking across layers is meaningful.

    ``curvature="layerwise"`` (OBS only, ``scope="layer"``) is the fast path for large
    models: instead of the loss curvature, each layer's output reconstruction Hessian
    ``H = 2 X^T X`` of its calibration inputs (:func:`~hesse.compress.layer_inputs_hessian`,
    collected by forward hooks), and :func:`prune_layer_obs` (SparseGPT: a row-wise OBS pass
    with the Cholesky factor of ``H^-1`` in lazy blocks of ``block_size`` columns, then the
    exact least-squares weights for the chosen mask). It minimises each layer's output
    error on the calibration data, not the loss, so saliencies of different layers are not
    comparable (no global ranking). Layers are pruned in order, each seeing the inputs the
    already-pruned layers produce; ``loss_fn``, ``num_steps``, ``recompute``, ``woodbury``
    and ``chunk_size`` are not used.

    Cost (OBS): building the blocks is ``N C n s`` multiply-adds (``N`` samples, ``C``
    outputs, ``n`` weights, ``s`` block size); each step factors the ``n / s`` blocks
    (``n s^2``). Memory ``n s``. Biases and normalisation layers are never pruned.

    Args:
        model: network with Linear/Conv layers (pruned in place).
        loss_fn: the loss (not needed for ``"magnitude"``; ``None`` with a Hugging Face
            model means the loss it trains with, see :class:`hesse.Objective`).
        data: ``(X, y)`` or an iterable of batches (not needed for ``"magnitude"``).
        sparsity: fraction of weights to remove, in ``[0, 1)``. Weights already masked count.
        method: ``"obs"`` (default), ``"obd"`` or ``"magnitude"``.
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (``sparsity`` in each).
        structured: ``False`` (single weights) or ``"rows"`` (whole rows: output units /
            channels; OBS then uses the group saliency
            :math:`\tfrac12 w_Q^\top ([H^{-1}]_{QQ})^{-1} w_Q` and needs ``block_size`` of at
            least one row).
        curvature: ``"ggn"``, ``"fisher"`` or ``"layerwise"`` for OBS; OBD also takes
            ``"hessian"``.
        block_size: OBS block size (entries); ``None`` for whole-layer blocks. With
            ``curvature="layerwise"``: columns per lazy block (``None``: all at once).
        num_steps: OBS rounds.
        damping: relative damping of the OBS blocks (> 0).
        recompute: rebuild the curvature at the current weights before every OBS round.
        woodbury: for whole-layer blocks, keep the ``r x n`` square-root factor ``U`` and
            invert ``lambda I + U^T U`` by Woodbury (rank-``r`` updates of
            ``(lambda I)^-1``: ``O(r^2 n)`` time, ``O(r n)`` memory, no ``n x n`` matrix) -- the
            choice for large layers with ``r < n`` (``r = N`` for the empirical Fisher,
            ``N C`` for the GGN). Default: on for whole-layer blocks of more than 4096
            weights.
        layers: module names to prune (default every Linear/Conv layer).
        chunk_size: samples per batched Jacobian when building the curvature.
        **obd_kwargs: ``exact_max``, ``num_matvecs``, ``generator`` for OBD with the Hessian.

    Returns:
        ``{weight name: mask}`` (1 = kept), the ``weight_mask`` buffers now on the layers.

    Raises:
        ValueError: invalid options, or OBS blocks that are not positive definite.

    Example:
        >>> masks = prune(model, nn.CrossEntropyLoss(), (X, y), 0.7)  # doctest: +SKIP
        >>> sparsity_of(model)["global"]   # doctest: +SKIP
        0.7

    References:
        Hassibi & Stork (1993), Second order derivatives for network pruning: Optimal Brain
        Surgeon. NeurIPS 5. Singh & Alistarh (2020), WoodFisher. NeurIPS 33.
    """
    method = check_choice(method, "method", [m.value for m in PruneMethod])
    scope = check_choice(scope, "scope", ("global", "layer"))
    if structured not in (False, True, "rows"):
        raise ValueError(f"Invalid structured={structured!r}; expected False or 'rows'.")
    structured = bool(structured)
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not (0.0 <= sparsity < 1.0)
    ):
        raise ValueError(f"Invalid sparsity={sparsity!r}; must lie in [0, 1).")
    if method != "magnitude" and data is None:
        raise ValueError(
            f"method={method!r} needs data (and loss_fn, or loss_fn=None for a Hugging Face "
            "model's own loss); only 'magnitude' needs neither."
        )
    num_steps = check_int(num_steps, "num_steps")
    damping = check_positive(damping, "damping")
    if method == "obs":
        check_choice(curvature, "curvature", (*CURVATURES, "layerwise"))
    if method == "obd" and curvature == "layerwise":
        raise ValueError(
            "curvature='layerwise' is an option of method='obs' (OBD takes 'ggn', 'fisher' or "
            "'hessian')."
        )
    layerwise = method == "obs" and curvature == "layerwise"  # magnitude ignores curvature
    if layerwise and scope != "layer":
        raise ValueError(
            "curvature='layerwise' ranks weights by each layer's own output error, which is "
            "not comparable across layers; pass scope='layer' (every layer pruned to "
            "the sparsity)."
        )
    if layerwise and structured:
        raise NotImplementedError(
            "curvature='layerwise' prunes single weights; structured='rows' needs a loss "
            "curvature ('ggn' or 'fisher')."
        )
    unknown = set(obd_kwargs) - {"exact_max", "num_matvecs", "generator"}
    if unknown or (obd_kwargs and method != "obd"):
        raise TypeError(
            f"prune() got unexpected keyword arguments {sorted(obd_kwargs)} for method="
            f"{method!r}; exact_max, num_matvecs and generator are options of method='obd'."
        )
    refs = compressible_weights(model, layers)
    masks = {r.name: current_mask(r) for r in refs}
    cost = {r.name: (r.numel // r.rows if structured else 1) for r in refs}

    if method in ("magnitude", "obd"):
        if method == "magnitude":
            sal = magnitude_saliency(model, layers=layers)
        else:
            sal = obd_saliency(
                model, loss_fn, data, curvature=curvature, layers=layers, **obd_kwargs
            )
        if structured:
            sal = {k: _row_sum(v) for k, v in sal.items()}
        else:
            sal = {k: v.reshape(-1) for k, v in sal.items()}
        chosen = _select(sal, cost, _targets(refs, masks, sparsity, scope))
        for r in refs:
            masks[r.name] = _remove(masks[r.name], chosen[r.name], structured)
            apply_mask(r, masks[r.name])
        return {r.name: r.module.weight_mask.detach().clone() for r in refs}

    if layerwise:
        for r, H in layer_hessians(model, refs, _inputs_of(data)):
            W = check_finite(_as_matrix(r), f"the weights of {r.name}")
            check_finite(H, f"the calibration inputs of {r.name}")
            Wn, keep = prune_layer_obs(
                W,
                H,
                sparsity,
                mask=_as_matrix(r, masks[r.name]),
                damping=damping,
                block_size=block_size,
            )
            new = _from_matrix(r, Wn).to(r.param.dtype)
            apply_mask(r, _from_matrix(r, keep), new_weight=new)
        return {r.name: r.module.weight_mask.detach().clone() for r in refs}

    return _prune_obs(
        model,
        loss_fn,
        data,
        refs,
        masks,
        cost,
        sparsity,
        scope,
        structured,
        curvature,
        block_size,
        num_steps,
        damping,
        recompute,
        chunk_size,
        woodbury,
    )


def _row_sum(s: Tensor) -> Tensor:
    rows = s.reshape(s.shape[0], -1)
    alive = torch.isfinite(rows).any(1)
    total = torch.where(torch.isfinite(rows), rows, torch.zeros_like(rows)).sum(1)
    return torch.where(alive, total, torch.full_like(total, float("inf")))


def _prune_obs(
    model,
    loss_fn,
    data,
    refs,
    masks,
    cost,
    sparsity,
    scope,
    structured,
    curvature,
    block_size,
    num_steps,
    damping,
    recompute,
    chunk_size,
    woodbury,
) -> dict[str, Tensor]:
    sizes = {r.name: block_size_for(r, block_size) for r in refs}
    # Woodbury (factor rows instead of an n x n block) for whole-layer blocks of large layers
    wb = {r.name: bool(woodbury) if woodbury is not None else r.numel > WOODBURY_MIN for r in refs}
    wb = {k: v and sizes[k] == next(r.numel for r in refs if r.name == k) for k, v in wb.items()}
    if structured:
        if any(wb.values()):
            raise NotImplementedError(
                "structured='rows' OBS uses dense blocks; pass block_size (e.g. 128) or "
                "woodbury=False."
            )
        for r in refs:
            row = r.numel // r.rows
            if sizes[r.name] % row:
                raise ValueError(
                    f"structured='rows' with OBS needs block_size >= one row ({row} entries of "
                    f"{r.name}); got block_size={block_size}."
                )
    W = {r.name: r.weight.detach().double().reshape(-1, sizes[r.name]) for r in refs}
    M = {r.name: masks[r.name].reshape(-1, sizes[r.name]) for r in refs}
    W = {k: W[k] * M[k] for k in W}
    Hd: dict[str, Tensor] = {}
    Uf: dict[str, tuple[Tensor, float]] = {}

    def build() -> None:
        dense_refs = [r for r in refs if not wb[r.name]]
        wood_refs = [r for r in refs if wb[r.name]]
        if dense_refs:
            H = block_diagonal(
                model,
                loss_fn,
                data,
                dense_refs,
                curvature,
                block_size=block_size,
                chunk_size=chunk_size,
            )
            for k, h in H.items():
                Hd[k] = damped(h.double(), damping)[0]
        if wood_refs:
            U = factor_matrix(model, loss_fn, data, wood_refs, curvature, chunk_size=chunk_size)
            for k, u in U.items():
                u = u.double()
                lam = damping * float(u.pow(2).sum() / u.shape[1])
                Uf[k] = (u, max(lam, 1e-30))

    build()
    final = _targets(refs, masks, sparsity, scope)
    for step in range(1, num_steps + 1):
        if recompute and step > 1:
            for r in refs:
                with torch.no_grad():
                    r.param.copy_((W[r.name] * M[r.name]).reshape(r.param.shape).to(r.param.dtype))
            build()
        # weights to remove by the end of this step, counted from the start
        removed_now = {k: int((~M[k]).sum()) for k in M}
        if isinstance(final, dict):
            init = {r.name: round(sparsity * r.numel) - final[r.name] for r in refs}
            need: dict[str, int] | int = {
                k: init[k] + round(final[k] * step / num_steps) - removed_now[k] for k in M
            }
        else:
            init_total = round(sparsity * sum(r.numel for r in refs)) - final
            need = init_total + round(final * step / num_steps) - sum(removed_now.values())
        sal = {}
        for r in refs:
            k = r.name
            if wb[k]:
                u, lam = Uf[k]
                d = woodbury_inverse_diag(u, lam, M[k][0])
                s = W[k][0].pow(2) / (2 * d)
                sal[k] = torch.where(M[k][0], s, torch.full_like(s, float("inf")))
                continue
            Hinv = masked_inverse(Hd[k], M[k])
            if structured:
                row = r.numel // r.rows
                sal[k] = obs_group_saliency(W[k], Hinv, row, M[k]).reshape(-1)
            else:
                sal[k] = obs_saliency(W[k], Hinv, M[k]).reshape(-1)
        chosen = _select(sal, cost, need)
        for r in refs:
            k = r.name
            full = M[k].reshape(r.param.shape)
            newm = _remove(full, chosen[k], structured).reshape(M[k].shape)
            if bool((newm != M[k]).any()):
                if wb[k]:
                    u, lam = Uf[k]
                    W[k] = woodbury_masked_update(W[k][0], u, lam, newm[0]).unsqueeze(0)
                else:
                    W[k] = obs_masked_update(W[k], Hd[k], newm)
            M[k] = newm
    out = {}
    for r in refs:
        k = r.name
        mask = M[k].reshape(r.param.shape)
        apply_mask(r, mask, new_weight=(W[k] * M[k]).reshape(r.param.shape).to(r.param.dtype))
        out[k] = r.module.weight_mask.detach().clone()
    return out
