"""Square-root factors of per-layer curvature: ``C = sum_rows u u^T`` (GGN or empirical Fisher).

For a weight ``W`` (flattened, ``n`` entries) of a model ``f`` and a loss
``L = sum_i c_i l(f(x_i), y_i)`` (``c_i = 1/N`` for ``reduction="mean"``, ``1`` for ``"sum"``):

.. math::
    G_{WW} = \\sum_i c_i\\, J_i^T \\nabla_f^2 l_i\\, J_i = \\sum_i (S_i J_i)^T (S_i J_i),
    \\qquad F_{WW} = \\sum_i c_i\\, g_i g_i^T, \\quad g_i = J_i^T \\nabla_f l_i,

with ``J_i = d f(x_i) / d W`` and ``S_i`` a square root of ``c_i`` times the output Hessian of
the per-sample loss (``C x C``, by autograd, so any loss works; negative eigenvalues of a
non-convex loss are clipped to 0). The factor rows ``U_i = S_i J_i`` are produced a chunk of
samples at a time (``torch.func``: ``vmap`` over samples of ``jacrev``), so memory stays at
``chunk_size * C * n`` and the dense ``n x n`` matrix is never needed: callers accumulate the
diagonal blocks they want, or keep ``U`` itself for a Woodbury inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int
from ..objective import Objective
from ._layers import WeightRef

CURVATURES = ("ggn", "fisher")

__all__ = ["CURVATURES", "factor_chunks", "block_diagonal", "diagonal", "factor_matrix"]


def _per_sample_loss(loss_fn: Callable) -> Callable[[Tensor, Tensor], Tensor]:
    def single(f: Tensor, y: Tensor) -> Tensor:
        return loss_fn(f.unsqueeze(0), y.unsqueeze(0))

    return single


def factor_chunks(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    refs: Sequence[WeightRef],
    curvature: str = "ggn",
    *,
    chunk_size: int = 256,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{weight name: U (r, n)}`` for successive chunks of samples (see module doc).

    ``sum over chunks of U^T U`` is the exact GGN (``curvature="ggn"``) or empirical Fisher
    (``"fisher"``) block of the listed weights under the loss's normalisation.
    """
    curvature = check_choice(curvature, "curvature", CURVATURES)
    chunk_size = check_int(chunk_size, "chunk_size")
    ob = Objective(model, loss_fn, data, params=[r.param_name for r in refs])
    names = [r.param_name for r in refs]
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    fixed.update(dict(model.named_buffers()))
    params = {k: ob.params[k].detach() for k in names}
    single = _per_sample_loss(loss_fn)

    def f_single(p: dict[str, Tensor], x: Any) -> Tensor:
        args = tuple(t.unsqueeze(0) for t in x) if isinstance(x, tuple) else (x.unsqueeze(0),)
        return torch.func.functional_call(model, {**fixed, **p}, args).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(f_single), in_dims=(None, 0))
    with torch.no_grad(), ob.mode():
        for X, y, w in ob.batches():
            B = int(y.shape[0])
            c = 1.0 / ob.N if ob.reduction == "mean" else w  # single() is a per-sample mean
            for s in range(0, B, chunk_size):
                xs = (
                    tuple(t[s : s + chunk_size] for t in X)
                    if isinstance(X, (tuple, list))
                    else X[s : s + chunk_size]
                )
                ys = y[s : s + chunk_size]
                F = ob.forward(xs)
                shape_out = F.shape[1:]
                Ff = F.reshape(F.shape[0], -1)

                def loss_flat(f: Tensor, yy: Tensor, _shape=shape_out) -> Tensor:
                    return single(f.reshape(_shape), yy)

                if curvature == "ggn":
                    Hs = torch.func.vmap(torch.func.hessian(loss_flat))(Ff, ys) * c
                    evals, evecs = torch.linalg.eigh(Hs)
                    S = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)).transpose(-1, -2)
                else:
                    S = (torch.func.vmap(torch.func.grad(loss_flat))(Ff, ys) * c**0.5).unsqueeze(1)
                xs_t = tuple(xs) if isinstance(xs, (tuple, list)) else xs
                J = jac(params, xs_t)  # name -> (b, C_out..., *shape)
                out = {}
                for ref in refs:
                    Jn = J[ref.param_name].reshape(Ff.shape[0], Ff.shape[1], -1)
                    out[ref.name] = torch.einsum("brc,bcn->brn", S, Jn).reshape(-1, Jn.shape[-1])
                yield out


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
    a row, i.e. the incoming weights of ``s / row`` output units). ``block_size=None`` gives the
    whole layer block. Cost: ``N C n s`` multiply-adds per weight, memory ``n s``.
    """
    sizes = {r.name: block_size_for(r, block_size) for r in refs}
    blocks: dict[str, Tensor] = {}
    for U in factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size):
        for name, u in U.items():
            s = sizes[name]
            ub = u.reshape(u.shape[0], -1, s)
            contrib = torch.einsum("rbi,rbj->bij", ub, ub)
            if name in blocks:
                blocks[name] += contrib
            else:
                blocks[name] = contrib
    for name, b in blocks.items():
        check_finite(b, f"the curvature blocks of {name}")
    return blocks


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
    diag: dict[str, Tensor] = {}
    for U in factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size):
        for name, u in U.items():
            d = u.pow(2).sum(0)
            diag[name] = diag[name] + d if name in diag else d
    for name, d in diag.items():
        check_finite(d, f"the curvature diagonal of {name}")
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
    """The whole factor ``U (r, n)`` with ``C = U^T U`` (for a Woodbury inverse).

    ``r = N`` for the empirical Fisher and ``N * C`` for the GGN, so this is the memory-cheap
    representation when ``r < n`` (rank-``r`` updates of ``lambda I``).
    """
    parts: dict[str, list[Tensor]] = {r.name: [] for r in refs}
    for U in factor_chunks(model, loss_fn, data, refs, curvature, chunk_size=chunk_size):
        for name, u in U.items():
            parts[name].append(u)
    out = {k: torch.cat(v) for k, v in parts.items()}
    for name, u in out.items():
        check_finite(u, f"the curvature factor of {name}")
    return out
