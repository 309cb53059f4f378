r"""Saliencies: the predicted loss increase of removing weights (no model is modified here).

Around a minimum the loss change of a weight perturbation :math:`\delta` is modelled by the
quadratic :math:`\Delta L \approx \tfrac12 \delta^\top H \delta` (the gradient term is
dropped), with :math:`H` the Hessian, the GGN or the empirical Fisher. Removing weight
:math:`q` means :math:`\delta_q = -w_q`:

* **OBD** (LeCun, Denker & Solla 1990) keeps the other weights fixed and uses the diagonal:
  :math:`s_q = \tfrac12 H_{qq} w_q^2`.
* **OBS** (Hassibi & Stork 1993) lets the other weights move to compensate; the optimal move
  and its cost are

  .. math::
      \delta = -\frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q, \qquad
      s_q = \frac{w_q^2}{2\,[H^{-1}]_{qq}},

  and for a group :math:`Q` (a row of ``W``) :math:`s_Q = \tfrac12 w_Q^\top ([H^{-1}]_{QQ})^{-1}
  w_Q`, :math:`\delta = -H^{-1} E_Q ([H^{-1}]_{QQ})^{-1} w_Q`.

Weights already removed are handled by restricting :math:`H` to the free weights: the masked
matrix :math:`A = M H M + (I - M)` (``M`` the diagonal 0/1 mask) has
:math:`A^{-1} = (H_{FF})^{-1}` on the free block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int, check_positive
from ..objective import Objective
from ..operators import curvature_operator
from ..operators.kfac import KFACLayer, kfac_layers, weight_gradient_factors

__all__ = [
    "CURVATURES",
    "WeightRef",
    "compressible_weights",
    "current_mask",
    "block_diagonal",
    "diagonal",
    "factor_matrix",
    "magnitude_saliency",
    "obd_saliency",
    "obs_saliency",
    "obs_single_update",
    "curvature_diagonal",
    "curvature_blocks",
    "masked_inverse",
    "obs_group_saliency",
    "obs_masked_update",
    "damped",
]


# -- which weights: the K-FAC layer registry ----------------------------------------------------

# "fisher" is the empirical Fisher (per loss row); the factory's names are accepted too and
# mean the same as everywhere in hesse ("fisher_exact" == the GGN for these losses)
CURVATURES = ("ggn", "fisher", "fisher_exact", "fisher_empirical")
_SAME = {"fisher_exact": "ggn", "fisher_empirical": "fisher"}
_COMPRESSIBLE = ("linear", "conv", "conv1d_hf")


@dataclass(frozen=True)
class WeightRef:
    """One compressible weight tensor and every module that uses it.

    Found by :func:`hesse.operators.kfac.kfac_layers` (by tensor identity), so a weight tied
    between modules (GPT-2's ``wte`` embedding and ``lm_head``) is one ref: it is pruned and
    quantized once, consistently for all its uses.

    Attributes:
        name: ``"<module>.weight"`` of its first module (the name in an unpruned model).
        module_name: qualified name of the first module using it.
        module: that module.
        param_name: the trainable parameter behind it (``"<module>.weight_orig"`` once the
            layer carries a pruning mask), as in ``model.named_parameters()``.
        layer: the registry entry (all uses, their kinds and input rows).
    """

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    layer: KFACLayer

    @property
    def modules(self) -> list[nn.Module]:
        return [u.module for u in self.layer.uses]

    @property
    def module_names(self) -> list[str]:
        return [u.name for u in self.layer.uses]

    @property
    def weight(self) -> Tensor:
        """Effective weight (``weight_orig * weight_mask`` for a pruned layer)."""
        return self.module.weight

    @property
    def param(self) -> Tensor:
        return self.layer.weight

    @property
    def rows(self) -> int:
        return int(self.param.shape[0])

    @property
    def numel(self) -> int:
        return self.param.numel()


def compressible_weights(model: nn.Module, layers: Sequence[str] | None = None) -> list[WeightRef]:
    """Weights used by a Linear, ConvNd or HF ``Conv1D`` layer, in ``named_parameters`` order.

    A weight tied to an Embedding (input/output embeddings) is included once, through its
    output-layer use; embeddings alone, biases and normalisation parameters are never
    compressed.

    Args:
        model: the network.
        layers: module names to keep (any module using the weight; default: all).

    Raises:
        ValueError: a requested name is not such a module, or there is none at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    found = [
        layer
        for layer in kfac_layers(model, [n for n, _ in model.named_parameters()])[0]
        if any(u.kind in _COMPRESSIBLE for u in layer.uses)
    ]
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        known = {u.name for layer in found for u in layer.uses}
        missing = [s for s in layers if s not in known]
        if missing:
            raise ValueError(
                f"No Linear/Conv layer named {missing}; compressible layers: {sorted(known)}."
            )
        found = [x for x in found if any(u.name in set(layers) for u in x.uses)]
    if not found:
        raise ValueError(
            "The model has no Linear/Conv layer to compress (supported: nn.Linear, "
            "nn.Conv1d/2d/3d with groups=1, Hugging Face Conv1D)."
        )
    out = []
    for layer in found:
        if not layer.weight.requires_grad:
            continue
        prefix = f"{layer.name}." if layer.name else ""
        out.append(WeightRef(f"{prefix}weight", layer.name, layer.module, layer.weight_name, layer))
    if not out:
        raise ValueError("Every compressible weight has requires_grad=False.")
    return out


def current_mask(ref: WeightRef) -> Tensor:
    """The mask already on the weight (all ones if it carries none), as a bool tensor."""
    m = ref.module
    if hasattr(m, "weight_mask"):
        return m.weight_mask.detach().bool().clone()
    return torch.ones_like(m.weight, dtype=torch.bool)


def factor_chunks(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    refs: Sequence[WeightRef],
    curvature: str = "ggn",
    *,
    chunk_size: int = 256,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{weight name: U (r, n)}`` per chunk of samples with ``sum U^T U`` the exact GGN
    (``"ggn"``) or empirical Fisher (``"fisher"``, per loss row) block of each weight, under
    the loss's normalisation (:func:`hesse.operators.kfac.weight_gradient_factors`)."""
    curvature = check_choice(curvature, "curvature", CURVATURES)
    curvature = _SAME.get(curvature, curvature)
    chunk_size = check_int(chunk_size, "chunk_size")
    ob = Objective(
        model,
        loss_fn,
        data,
        params=[r.param_name for r in refs],
        micro_batch_size=chunk_size,
        check_determinism=False,
    )
    names = {r.param_name: r.name for r in refs}
    for U in weight_gradient_factors(ob, [r.layer for r in refs], curvature):
        yield {names[k]: u for k, u in U.items()}


def block_size_for(ref: WeightRef, block_size: int | None) -> int:
    """Largest block (dividing ``numel``) of whole rows, or of whole row pieces, <= ``block_size``.

    ``None`` means the whole weight (one exact layer block).
    """
    n, rows = ref.numel, ref.rows
    if block_size is None or block_size >= n:
        return n
    row = n // rows
    if block_size >= row:
        k = max(d for d in range(1, rows + 1) if rows % d == 0 and d * row <= block_size)
        return k * row
    return max(d for d in range(1, row + 1) if row % d == 0 and d <= block_size)


def block_diagonal(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    refs: Sequence[WeightRef],
    curvature: str = "ggn",
    *,
    block_size: int | None = 128,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Exact diagonal blocks ``(num_blocks, s, s)`` of each weight's curvature.

    Blocks are consecutive entries of the flattened weight (whole rows when ``s`` is at least
    a row). ``block_size=None`` gives the whole layer block. Cost: ``r n s`` multiply-adds
    per weight (``r`` factor rows), memory ``n s``.
    """
    sizes = {r.name: block_size_for(r, block_size) for r in refs}

    def block(name: str, u: Tensor) -> Tensor:
        ub = u.reshape(u.shape[0], -1, sizes[name])
        return torch.einsum("rbi,rbj->bij", ub, ub)

    chunks = factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size)
    return _sum_over_chunks(chunks, block, "the curvature blocks")


def _sum_over_chunks(chunks: Iterator[dict[str, Tensor]], fn: Callable, what: str) -> dict:
    """``{name: sum over chunks of fn(name, U)}``, checked finite."""
    out: dict[str, Tensor] = {}
    for U in chunks:
        for name, u in U.items():
            c = fn(name, u)
            out[name] = out[name] + c if name in out else c
    for name, t in out.items():
        check_finite(t, f"{what} of {name}")
    return out


def diagonal(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    refs: Sequence[WeightRef],
    curvature: str = "ggn",
    *,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Exact diagonal of the GGN / empirical Fisher of each weight, shaped like the weight."""
    chunks = factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size)
    diag = _sum_over_chunks(chunks, lambda _, u: u.pow(2).sum(0), "the curvature diagonal")
    return {r.name: diag[r.name].reshape(r.param.shape) for r in refs}


def factor_matrix(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    refs: Sequence[WeightRef],
    curvature: str = "fisher",
    *,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """The whole factor ``U (r, n)`` with ``C = U^T U`` (for a Woodbury inverse)."""
    parts: dict[str, list[Tensor]] = {r.name: [] for r in refs}
    for U in factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size):
        for name, u in U.items():
            parts[name].append(u)
    out = {k: torch.cat(v) for k, v in parts.items()}
    for name, u in out.items():
        check_finite(u, f"the curvature factor of {name}")
    return out


# -- dense OBS algebra (pure functions on tensors) --------------------------------------------


def obs_single_update(w: Tensor, H_inv: Tensor, q: int) -> tuple[Tensor, Tensor]:
    r"""OBS for one weight: returns ``(saliency, delta)`` with ``w + delta`` having ``w_q = 0``.

    .. math:: s_q = \frac{w_q^2}{2 [H^{-1}]_{qq}}, \qquad
              \delta = -\frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q

    ``s_q`` equals ``0.5 * delta @ H @ delta`` exactly, the smallest quadratic-model loss
    increase over all ``delta`` with ``delta_q = -w_q``.

    Args:
        w: ``(n,)`` weights.
        H_inv: ``(n, n)`` inverse curvature.
        q: index of the weight to remove.

    Example:
        >>> H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> s, d = obs_single_update(torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...                          torch.linalg.inv(H), 0)
        >>> float(s), d.tolist()   # w2 moves to 1.5; cost 0.5*d^T H d = 0.75
        (0.75, [-1.0, 0.5])
    """
    hqq = H_inv[q, q]
    delta = -(w[q] / hqq) * H_inv[:, q]
    return w[q] ** 2 / (2 * hqq), delta


def damped(H: Tensor, damping: float) -> tuple[Tensor, float]:
    """``H + lambda I`` with ``lambda = damping * mean(diag H)`` (over all blocks)."""
    lam = damping * float(torch.diagonal(H, dim1=-2, dim2=-1).mean().clamp_min(1e-30))
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return H + lam * eye, lam


def masked_inverse(H: Tensor, mask: Tensor) -> Tensor:
    """``(H_FF)^-1`` on the free entries (``mask`` True), identity on removed ones; batched.

    Args:
        H: ``(b, s, s)`` positive definite blocks.
        mask: ``(b, s)`` bool, True = weight still present.
    """
    m = mask.to(H.dtype)
    A = H * m.unsqueeze(-1) * m.unsqueeze(-2)
    A = A + torch.diag_embed(1 - m)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        raise ValueError("The damped curvature block is not positive definite; increase damping.")
    return torch.cholesky_inverse(L)


def obs_saliency(w: Tensor, H_inv: Tensor, mask: Tensor | None = None) -> Tensor:
    """OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` per entry (``inf`` for removed ones); batched.

    Args:
        w: ``(b, s)`` weights per block.
        H_inv: ``(b, s, s)`` inverse of the (masked) curvature blocks.
        mask: ``(b, s)`` bool, True = present.
    """
    d = torch.diagonal(H_inv, dim1=-2, dim2=-1)
    s = w.pow(2) / (2 * d)
    if mask is not None:
        s = torch.where(mask, s, torch.full_like(s, float("inf")))
    return s


def obs_group_saliency(w: Tensor, H_inv: Tensor, group: int, mask: Tensor | None = None) -> Tensor:
    """OBS saliency of groups of ``group`` consecutive entries: ``0.5 w_Q^T ([H^-1]_QQ)^-1 w_Q``.

    Args:
        w: ``(b, s)``; ``s`` a multiple of ``group``.
        H_inv: ``(b, s, s)``.
        group: entries per group (a row of the weight).
        mask: ``(b, s)`` bool; a group counts as removed when all its entries are.

    Returns:
        ``(b, s // group)`` saliencies (``inf`` for removed groups).
    """
    b, s = w.shape
    k = s // group
    Hb = H_inv.reshape(b, k, group, k, group)
    idx = torch.arange(k, device=w.device)
    D = Hb[:, idx, :, idx, :].permute(1, 0, 2, 3)  # (b, k, g, g)
    wg = w.reshape(b, k, group, 1)
    sal = 0.5 * (wg * torch.linalg.solve(D, wg)).sum((-1, -2))
    if mask is not None:
        alive = mask.reshape(b, k, group).any(-1)
        sal = torch.where(alive, sal, torch.full_like(sal, float("inf")))
    return sal


def obs_masked_update(w: Tensor, H: Tensor, new_mask: Tensor) -> Tensor:
    r"""Weights after removing everything outside ``new_mask`` with the optimal OBS correction.

    Solves :math:`\min_\delta \tfrac12 \delta^\top H \delta` subject to
    :math:`(w + \delta)_q = 0` for every removed ``q``: the free weights move by
    :math:`\delta_F = H_{FF}^{-1} H_{FR} w_R` (``R`` the removed set). For a single removed
    weight this is :func:`obs_single_update`; batched over blocks.

    Args:
        w: ``(b, s)`` current weights.
        H: ``(b, s, s)`` damped curvature blocks (positive definite).
        new_mask: ``(b, s)`` bool, True = kept.

    Returns:
        ``(b, s)`` new weights, exactly zero outside ``new_mask``.
    """
    m = new_mask.to(H.dtype)
    removed = w * (1 - m)
    rhs = m * (H @ removed.unsqueeze(-1)).squeeze(-1)
    A = H * m.unsqueeze(-1) * m.unsqueeze(-2) + torch.diag_embed(1 - m)
    delta = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)
    return m * (w + delta)


# -- curvature of a model's weights -----------------------------------------------------------

_DIAG_CURVATURES = (*CURVATURES, "hessian")


def curvature_diagonal(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "ggn",
    layers: Sequence[str] | None = None,
    exact_max: int = 4096,
    num_matvecs: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Diagonal of the curvature of every compressible weight, shaped like the weight.

    ``"ggn"`` and ``"fisher"`` (empirical) diagonals are exact, from per-sample square-root
    factors (cost about ``C`` per-sample gradients per sample). The ``"hessian"`` diagonal is
    exact (``n`` Hessian-vector products of the layer block) for layers with at most
    ``exact_max`` weights, else a Hutchinson estimate (Bekas et al. 2007) with
    ``num_matvecs`` Rademacher probes from ``generator``.
    """
    curvature = check_choice(curvature, "curvature", _DIAG_CURVATURES)
    refs = compressible_weights(model, layers)
    if curvature != "hessian":
        return diagonal(model, loss_fn, data, refs, curvature, chunk_size=chunk_size)
    from ..linalg import exact_diagonal, hutchinson_diagonal

    out = {}
    for ref in refs:
        op = curvature_operator("hessian", model, loss_fn, data, params=[ref.param_name])
        if ref.numel <= exact_max:
            d = exact_diagonal(op).estimate
        else:
            d = hutchinson_diagonal(op, num_matvecs, generator=generator).estimate
        out[ref.name] = d.reshape(ref.param.shape)
    return out


def curvature_blocks(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "ggn",
    block_size: int | None = 128,
    layers: Sequence[str] | None = None,
    chunk_size: int = 256,
) -> dict[str, Tensor]:
    """Exact diagonal blocks ``(num_blocks, s, s)`` of the GGN / empirical Fisher of each weight.

    A block holds ``s`` consecutive entries of the flattened weight: whole rows (the incoming
    weights of ``s / row`` units) whenever ``block_size`` is at least one row.
    ``block_size=None`` gives each layer's whole block (``n x n``).
    """
    refs = compressible_weights(model, layers)
    if block_size is not None:
        check_int(block_size, "block_size")
    return block_diagonal(
        model, loss_fn, data, refs, curvature, block_size=block_size, chunk_size=chunk_size
    )


def magnitude_saliency(
    model: nn.Module, *, layers: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """``w_q^2`` for every compressible weight (``inf`` where already removed)."""
    out = {}
    for ref in compressible_weights(model, layers):
        w = ref.weight.detach()
        out[ref.name] = torch.where(current_mask(ref), w.pow(2), torch.full_like(w, float("inf")))
    return out


def obd_saliency(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "ggn",
    layers: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Tensor]:
    r"""OBD saliency :math:`\tfrac12 H_{qq} w_q^2` of every compressible weight.

    Args:
        model, loss_fn, data: as for :class:`hesse.HessianOperator`.
        curvature: ``"ggn"`` (default, exact diagonal), ``"fisher"`` (empirical, exact) or
            ``"hessian"`` (exact for small layers, else Hutchinson; see
            :func:`curvature_diagonal`).
        layers: module names (default every Linear/Conv layer).
        **kwargs: ``exact_max``, ``num_matvecs``, ``generator``, ``chunk_size``.

    Returns:
        ``{weight name: saliency shaped like the weight}``; ``inf`` where already removed.

    References:
        LeCun, Denker & Solla (1990), Optimal Brain Damage. NeurIPS 2.
    """
    diag = curvature_diagonal(model, loss_fn, data, curvature=curvature, layers=layers, **kwargs)
    out = {}
    for ref in compressible_weights(model, layers):
        w = ref.weight.detach()
        s = 0.5 * diag[ref.name] * w.pow(2)
        out[ref.name] = torch.where(current_mask(ref), s, torch.full_like(s, float("inf")))
    return out


def layer_obs_saliency(ref: WeightRef, H: Tensor, mask: Tensor, damping: float = 1e-4) -> Tensor:
    """OBS saliencies of one weight from its curvature blocks ``H`` (shaped like the weight)."""
    check_positive(damping, "damping")
    s = H.shape[-1]
    Hd, _ = damped(H.double(), damping)
    w = ref.weight.detach().double().reshape(-1, s)
    m = mask.reshape(-1, s)
    return obs_saliency(w, masked_inverse(Hd, m), m).reshape(ref.param.shape)


__all__ += ["layer_obs_saliency", "block_size_for"]


# -- Woodbury form for large layers: H = lambda I + U^T U with r = rows(U) < n ----------------


def _woodbury_factor(U: Tensor, lam: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(Um, L)``: masked factor and Cholesky of ``lambda I_r + Um Um^T``."""
    Um = U * mask.to(U.dtype).unsqueeze(0)
    K = Um @ Um.T
    K.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(K)
    if bool(info > 0):
        raise ValueError("The Woodbury capacitance matrix is not positive definite.")
    return Um, L


def woodbury_inverse_diag(U: Tensor, lam: float, mask: Tensor) -> Tensor:
    r"""Diagonal of :math:`(H_{FF})^{-1}` for :math:`H = \lambda I + U^\top U`, by Woodbury.

    .. math::
        (\lambda I + U_F^\top U_F)^{-1} = \lambda^{-1}\left(I - U_F^\top
        (\lambda I_r + U_F U_F^\top)^{-1} U_F\right)

    Cost ``O(r^2 n + r^3)`` and memory ``O(r n)`` instead of ``O(n^2)``: the OBS inverse of a
    large layer from ``r`` factor rows (per-sample gradients for the empirical Fisher) as
    rank-``r`` updates of :math:`(\lambda I)^{-1}` (Singh & Alistarh 2020, WoodFisher).
    Entries outside ``mask`` get ``1 / lambda``.

    Args:
        U: ``(r, n)`` factor.
        lam: damping ``lambda > 0``.
        mask: ``(n,)`` bool, True = free.
    """
    Um, L = _woodbury_factor(U, lam, mask)
    Z = torch.linalg.solve_triangular(L, Um, upper=False)
    return (1.0 - Z.pow(2).sum(0)) / lam


def woodbury_masked_update(w: Tensor, U: Tensor, lam: float, new_mask: Tensor) -> Tensor:
    """:func:`obs_masked_update` for ``H = lambda I + U^T U`` without forming ``H``.

    Args:
        w: ``(n,)`` weights.
        U: ``(r, n)`` factor.
        lam: damping.
        new_mask: ``(n,)`` bool, True = kept.
    """
    m = new_mask.to(w.dtype)
    removed = w * (1 - m)
    b = m * (U.T @ (U @ removed))  # (H w_R)_F; lambda I does not couple F and R
    Um, L = _woodbury_factor(U, lam, new_mask)
    t = torch.cholesky_solve((Um @ b).unsqueeze(1), L).squeeze(1)
    delta = (b - Um.T @ t) / lam
    return m * (w + delta)


__all__ += ["woodbury_inverse_diag", "woodbury_masked_update"]
