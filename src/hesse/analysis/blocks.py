"""Per-block curvature: top eigenvalue, trace and spectral density of every parameter block,
and the Jensen-Shannon distance between the block densities ("block heterogeneity").

Zhang et al. (2024) found that the diagonal Hessian blocks of a transformer (embedding,
query, key, value, output, MLP matrices) have spectra that differ much more from each other
than the blocks of a CNN or MLP, and that this heterogeneity is what makes SGD (one learning
rate for all blocks) fall behind Adam. :func:`block_spectra` measures it for any model: it
composes :func:`hesse.top_eigenpairs`, :func:`hesse.spectral_density` and (optionally)
:func:`hesse.trace` on the diagonal sub-operators ``op.block(...)``, puts every density on one
common grid and returns the pairwise Jensen-Shannon distances.

References:
    Zhang, Chen, Ding, Li, Sun, Luo. Why Transformers Need Adam: A Hessian Perspective.
    NeurIPS 2024 (arXiv:2402.16788).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from ..linalg import SpectralDensity, spectral_density, top_eigenpairs, trace
from ..operators.base import LinearOperator
from ..operators.curvature import CurvatureOperator, SubOperator
from .sharpness import _operator

__all__ = ["BlockSpectra", "BlockSpectrum", "block_spectra", "js_distance"]

_NORMALIZE = ("none", "radius")


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance between discrete distributions (last dimension).

    .. math::
        d_{JS}(p, q) = \\sqrt{\\tfrac12 \\mathrm{KL}(p \\,\\|\\, m) + \\tfrac12
        \\mathrm{KL}(q \\,\\|\\, m)}, \\qquad m = \\tfrac12 (p + q),

    with base-2 logarithms, so ``0 <= d_JS <= 1`` (0 iff ``p == q``; 1 for disjoint
    supports); it is a metric (the convention of ``scipy.spatial.distance.jensenshannon`` with
    ``base=2``). ``p`` and ``q`` are non-negative weights (e.g. densities on one uniform grid)
    and are normalised to sum to 1 first; they broadcast against each other.
    """
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if (p < 0).any() or (q < 0).any():
        raise ValueError("js_distance needs non-negative weights; got negative entries.")
    ps, qs = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
    if (ps <= 0).any() or (qs <= 0).any():
        raise ValueError("js_distance needs weights with a positive sum; got an all-zero row.")
    p, q = p / ps, q / qs
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log2(a) - torch.log2(m.clamp_min(1e-300))), 0.0).sum(
            -1
        )

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0.0).sqrt()


@dataclass(frozen=True)
class BlockSpectrum:
    """Curvature of one diagonal block.

    Attributes:
        name: block name.
        params: the parameter names in the block (empty for index blocks).
        n: block size.
        lambda_max: top eigenvalue (:func:`hesse.top_eigenpairs`).
        lambda_max_converged: whether Lanczos met ``tol``.
        trace: trace estimate; ``trace_stderr`` its standard error (from the SLQ probes, or
            from :func:`hesse.trace` when ``trace_matvecs > 0``).
        density: the block's :class:`hesse.SpectralDensity` (its own grid and smoothing).
        num_matvecs: products with the block for this entry.
    """

    name: str
    params: tuple[str, ...]
    n: int
    lambda_max: float
    lambda_max_converged: bool
    trace: float
    trace_stderr: float
    density: SpectralDensity
    num_matvecs: int

    @property
    def radius(self) -> float:
        """Spectral radius estimate ``max(|lambda_max|, |smallest Ritz value|)``."""
        return max(abs(self.lambda_max), float(self.density.nodes.abs().max()))


@dataclass(frozen=True)
class BlockSpectra:
    """Result of :func:`block_spectra`.

    Attributes:
        blocks: one :class:`BlockSpectrum` per block, in the requested order.
        grid: ``(g,)`` the common grid (eigenvalues, or eigenvalues divided by each block's
            spectral radius when ``normalize="radius"``, then in ``[-1, 1]``).
        densities: ``(b, g)`` every block's density re-smoothed on ``grid`` with one width
            ``sigma`` (from its stored quadrature; each integrates to about 1).
        js: ``(b, b)`` pairwise Jensen-Shannon distances (:func:`js_distance`, base 2, in
            ``[0, 1]``) between the rows of ``densities``.
        normalize: ``"none"`` or ``"radius"``.
        sigma: the common smoothing width on ``grid``.
        num_matvecs: products with the full operator, all blocks together.
    """

    blocks: tuple[BlockSpectrum, ...]
    grid: Tensor
    densities: Tensor
    js: Tensor
    normalize: str
    sigma: float
    num_matvecs: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def mean_js(self) -> float:
        """Mean Jensen-Shannon distance over distinct pairs (``nan`` for one block)."""
        b = len(self.blocks)
        if b < 2:
            return float("nan")
        iu = torch.triu_indices(b, b, 1)
        return float(self.js[iu[0], iu[1]].mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no densities on the grid: see :meth:`save`)."""
        return {
            "normalize": self.normalize,
            "sigma": self.sigma,
            "mean_js": self.mean_js,
            "num_matvecs": self.num_matvecs,
            "blocks": [
                {
                    "name": b.name,
                    "params": list(b.params),
                    "n": b.n,
                    "lambda_max": b.lambda_max,
                    "lambda_max_converged": b.lambda_max_converged,
                    "trace": b.trace,
                    "trace_stderr": b.trace_stderr,
                    "radius": b.radius,
                    "num_matvecs": b.num_matvecs,
                }
                for b in self.blocks
            ],
            "js": self.js.tolist(),
            **self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` plus the grid and densities as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        d["grid"] = self.grid.tolist()
        d["densities"] = self.densities.tolist()
        path.write_text(json.dumps(d))
        return path

    def plot(self, path: str | Path | None = None, **kwargs: Any) -> Any:
        """:func:`hesse.plot.plot_block_spectra` of this result."""
        from ..plot import plot_block_spectra

        return plot_block_spectra(self, path, **kwargs)


def _default_blocks(op: CurvatureOperator) -> dict[str, list[str]]:
    return {k: [k] for k, p in op.objective.params.items() if p.ndim >= 2}


def _resolve_blocks(op: LinearOperator, blocks: Any) -> list[tuple[str, tuple[str, ...], Any]]:
    """``[(name, param_names, sub_operator)]`` for the requested blocks."""
    is_curv = isinstance(op, CurvatureOperator)
    if blocks is None:
        if not is_curv:
            raise TypeError(
                "blocks=None needs a curvature operator (or a model); for a plain operator "
                "pass blocks={'name': index_tensor_or_slice, ...}."
            )
        blocks = _default_blocks(op)
        if not blocks:
            raise ValueError("The model has no weight matrices (ndim >= 2); pass blocks=.")
    elif isinstance(blocks, str) or not isinstance(blocks, (Mapping, Sequence)):
        raise TypeError(
            "blocks must be None, a list of parameter/module names, or a dict "
            f"name -> names (or index tensor/slice); got {type(blocks).__name__}."
        )
    elif not isinstance(blocks, Mapping):
        blocks = {str(b): [b] for b in blocks}
    out = []
    n = op.shape[0]
    for name, sel in blocks.items():
        if isinstance(sel, (slice, Tensor, range)):
            idx = torch.arange(n)[sel] if not isinstance(sel, Tensor) else sel.reshape(-1)
            if idx.numel() < 2 or int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(
                    f"Block {name!r}: indices must select at least 2 of the {n} coordinates."
                )
            out.append((str(name), (), SubOperator(op, idx.long(), idx.long())))
            continue
        if not is_curv:
            raise TypeError(
                f"Block {name!r} is given by names; that needs a curvature operator or a "
                "model. For a plain operator pass an index tensor or slice."
            )
        sel = [sel] if isinstance(sel, str) else list(sel)
        sub = op.block(sel)
        if sub.shape[0] < 2:
            raise ValueError(f"Block {name!r} has {sub.shape[0]} parameter(s); need >= 2.")
        slices = op.param_slices()
        names = tuple(k for k in slices if any(k == s or k.startswith(s + ".") for s in sel))
        out.append((str(name), names, sub))
    return out


def block_spectra(
    model_or_op: Any,
    loss_fn: Callable | None = None,
    data: Any = None,
    *,
    blocks: Any = None,
    curvature: str = "hessian",
    normalize: str = "none",
    num_probes: int = 4,
    num_steps: int = 40,
    num_grid: int = 512,
    sigma: float | None = None,
    tol: float = 1e-3,
    num_matvecs: int | None = None,
    trace_matvecs: int = 0,
    generator: torch.Generator | None = None,
    **operator_kwargs: Any,
) -> BlockSpectra:
    """Top eigenvalue, trace and spectral density of each diagonal curvature block, and the
    pairwise Jensen-Shannon distances between the block densities.

    For each block ``b`` (a set of parameters; ``H_bb`` the diagonal block of the Hessian, or
    GGN/Fisher): ``lambda_max(H_bb)`` by :func:`hesse.top_eigenpairs`, the SLQ density
    :math:`\\phi_b` by :func:`hesse.spectral_density`, and ``tr(H_bb)``. The densities are then
    re-smoothed from their stored quadratures on one grid with one Gaussian width ``sigma``,
    and

    .. math:: \\mathrm{JS}_{bc} = d_{JS}(\\phi_b, \\phi_c)

    (:func:`js_distance`: base 2, in ``[0, 1]``). With ``normalize="none"`` the grid is in
    eigenvalue units, spanning all blocks, so blocks whose spectra have different scales are
    far apart. With ``normalize="radius"`` each block's eigenvalues are first divided by its
    spectral radius (``max |lambda|``), which compares the shapes of the spectra only (the
    normalised spectra Zhang et al., 2024, plot in their Figure 3; their ``JS_0`` is the mean
    pairwise JS distance at initialisation, see :attr:`BlockSpectra.mean_js`).

    Cost: per block of size ``n_b``, ``num_probes * min(num_steps, n_b)`` products for the
    density (``min(num_steps, n_b)`` batched passes), about 10-30 for ``lambda_max`` and
    ``trace_matvecs`` for the trace (0: the trace implied by the SLQ probes, a Hutchinson
    estimate, costs nothing more). Each block product is one product with the full operator.

    Args:
        model_or_op: a model (then ``loss_fn`` and ``data`` are required and the operator is
            built with ``curvature`` and ``operator_kwargs``) or a
            :class:`hesse.CurvatureOperator`; any ``LinearOperator``/dense matrix works with
            index blocks.
        blocks: ``None`` (every parameter with ``ndim >= 2``: each weight matrix and
            embedding), a list of parameter names or module prefixes (one block each), or a
            dict ``name -> names`` (a user grouping; several names form one block) or
            ``name -> index tensor/slice`` into the flat parameter vector.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` when given a model.
        normalize: ``"none"`` (default) or ``"radius"``, see above.
        num_probes, num_steps: SLQ budget per block (``num_steps`` is capped at ``n_b``).
        num_grid: points of the common grid.
        sigma: common smoothing width on the grid; default ``1/200`` of the grid span
            (for ``"radius"``: 0.01).
        tol: relative tolerance of ``lambda_max``.
        num_matvecs: product budget of each ``lambda_max`` run (default that of
            :func:`hesse.top_eigenpairs`); a block that does not converge within it is
            flagged in ``lambda_max_converged``.
        trace_matvecs: ``> 0`` estimates each trace with :func:`hesse.trace` (XTrace) using
            that many products instead of the SLQ probes.
        generator: randomness of the probes and Lanczos starts.

    Returns:
        :class:`BlockSpectra` (``to_dict``, ``save``, ``plot``).

    Example:
        >>> A = torch.diag(torch.cat([torch.linspace(0, 1, 50), torch.linspace(0, 9, 50)]))
        >>> r = block_spectra(A.double(), blocks={"a": slice(0, 50), "b": slice(50, 100)},
        ...                   generator=torch.Generator().manual_seed(0))
        >>> round(r.blocks[1].lambda_max, 3), r.js[0, 1] > 0.5
        (9.0, tensor(True))
    """
    normalize = check_choice(normalize, "normalize", _NORMALIZE)
    num_probes = check_int(num_probes, "num_probes")
    num_steps = check_int(num_steps, "num_steps")
    num_grid = check_int(num_grid, "num_grid", minimum=2)
    trace_matvecs = check_int(trace_matvecs, "trace_matvecs", minimum=0)
    if sigma is not None:
        sigma = check_positive(sigma, "sigma")
    check_nonnegative(tol, "tol")
    if (
        isinstance(model_or_op, nn.Module)
        or operator_kwargs
        or not isinstance(model_or_op, LinearOperator)
    ):
        op = _operator(model_or_op, loss_fn, data, curvature, operator_kwargs)
    else:
        op = model_or_op
    start = op.num_matvecs
    results = []
    for name, params, sub in _resolve_blocks(op, blocks):
        n_b = sub.shape[0]
        before = op.num_matvecs
        dens = spectral_density(
            sub, num_probes=num_probes, num_steps=min(num_steps, n_b), generator=generator
        )
        kw = {} if num_matvecs is None else {"num_matvecs": check_int(num_matvecs, "num_matvecs")}
        eig = top_eigenpairs(sub, 1, tol=tol, generator=generator, **kw)
        if trace_matvecs:
            tr = trace(sub, num_matvecs=trace_matvecs, generator=generator)
            tr_val, tr_err = float(tr.estimate), float(tr.stderr)
        else:
            tr_val, tr_err = float(dens.trace), float(dens.trace_stderr)
        results.append(
            BlockSpectrum(
                name=name,
                params=params,
                n=n_b,
                lambda_max=float(eig.eigenvalues[0]),
                lambda_max_converged=bool(eig.converged),
                trace=tr_val,
                trace_stderr=tr_err,
                density=dens,
                num_matvecs=op.num_matvecs - before,
            )
        )
    grid, densities, sig = _common_densities(results, normalize, num_grid, sigma)
    js = js_distance(densities.unsqueeze(1), densities.unsqueeze(0))
    js.fill_diagonal_(0.0)
    return BlockSpectra(
        blocks=tuple(results),
        grid=grid,
        densities=densities,
        js=js,
        normalize=normalize,
        sigma=sig,
        num_matvecs=op.num_matvecs - start,
    )


def _common_densities(
    results: Sequence[BlockSpectrum], normalize: str, num_grid: int, sigma: float | None
) -> tuple[Tensor, Tensor, float]:
    """Every block's density re-smoothed on one grid with one width."""
    scales = [max(r.radius, 1e-300) if normalize == "radius" else 1.0 for r in results]
    lo = min(float(r.density.nodes.min()) / s for r, s in zip(results, scales))
    hi = max(max(float(r.density.nodes.max()), r.lambda_max) / s for r, s in zip(results, scales))
    span = max(hi - lo, 1e-300)
    sig = sigma if sigma is not None else (0.01 if normalize == "radius" else span / 200)
    grid = torch.linspace(lo - 3 * sig, hi + 3 * sig, num_grid, dtype=torch.float64)
    rows = []
    for r, s in zip(results, scales):
        # smoothing the nodes theta / s with width sig on grid == smoothing theta with width
        # s * sig on s * grid, scaled by s (densities of a rescaled variable)
        _, d, _ = r.density.smooth(grid * s, sigma=sig * s)
        rows.append(d.to(torch.float64) * s)
    return grid, torch.stack(rows), float(sig)
