"""Loss landscapes: 1-D and 2-D slices of the loss with the quadratic model overlaid.

A slice evaluates the exact loss on a line (or plane) through the current parameters,

.. math::
    L(\\theta_0 + \\alpha d) \\quad\\text{and}\\quad
    L(\\theta_0 + \\alpha d_1 + \\beta d_2),

next to the second-order Taylor model built from the gradient ``g`` and the Hessian ``H`` at
``theta_0``,

.. math::
    q(\\alpha) = L_0 + \\alpha\\, g^\\top d + \\tfrac{1}{2}\\alpha^2\\, d^\\top H d .

Directions are the top Hessian eigenvectors (where the quadratic model is sharpest) or
filter-normalised random directions (Li et al., 2018), which make slices of networks that
differ only by a per-filter rescaling comparable.

Cost: one gradient and one (1-D) or two (2-D) Hessian-vector products for the quadratic model,
plus one loss evaluation per grid point. Parameters are perturbed in place and restored
bit-exactly afterwards (also on error or interrupt).

References:
    Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets.
    NeurIPS 2018.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int, check_positive
from ..objective import Objective, resolve_params
from ..operators.base import LinearOperator
from ..operators.curvature import HessianOperator

__all__ = [
    "LossSlice",
    "LossSurface2D",
    "loss_slice",
    "loss_surface_2d",
    "random_direction",
    "perturbed_parameters",
]


@dataclass(frozen=True)
class LossSlice:
    """A 1-D slice ``L(theta_0 + alpha d)`` and its quadratic model.

    Attributes:
        alphas: ``(P,)`` step lengths along ``direction``.
        losses: ``(P,)`` exact losses at ``theta_0 + alpha d``.
        quadratic: ``(P,)`` the model ``L0 + alpha g.d + alpha^2 / 2 d^T H d``.
        loss0: ``L(theta_0)``.
        slope: ``g^T d``.
        curvature: ``d^T H d`` (or ``d^T C d`` for the curvature operator ``C`` given).
        direction: ``(n,)`` the direction used.
        direction_norm: ``||d||``.
        num_matvecs: curvature products used (0 if the curvature was given as a number).
        num_evaluations: loss evaluations (grid points).
        direction_kind: ``"given"``, ``"top"`` or ``"random"``.
        eigenvalue: the eigenvalue when ``direction_kind == "top"``, else ``None``.
    """

    alphas: Tensor
    losses: Tensor
    quadratic: Tensor
    loss0: float
    slope: float
    curvature: float
    direction: Tensor
    direction_norm: float
    num_matvecs: int
    num_evaluations: int
    direction_kind: str = "given"
    eigenvalue: float | None = None

    @property
    def max_quadratic_error(self) -> float:
        """``max |losses - quadratic|`` over the slice."""
        return float((self.losses - self.quadratic).abs().max())


@dataclass(frozen=True)
class LossSurface2D:
    """A 2-D slice ``L(theta_0 + alpha d_1 + beta d_2)`` and its quadratic model.

    Attributes:
        alphas: ``(P,)`` coordinates along ``directions[:, 0]``.
        betas: ``(Q,)`` coordinates along ``directions[:, 1]``.
        losses: ``(P, Q)`` with ``losses[i, j] = L(theta_0 + alphas[i] d_1 + betas[j] d_2)``.
        quadratic: ``(P, Q)`` the model ``L0 + c^T g_D + c^T C_D c / 2`` with ``c = (a, b)``.
        loss0: ``L(theta_0)``.
        slopes: ``(2,)`` ``D^T g``.
        curvature: ``(2, 2)`` ``D^T H D``.
        directions: ``(n, 2)``.
        num_matvecs, num_evaluations, direction_kind, eigenvalues: as in :class:`LossSlice`.
    """

    alphas: Tensor
    betas: Tensor
    losses: Tensor
    quadratic: Tensor
    loss0: float
    slopes: Tensor
    curvature: Tensor
    directions: Tensor
    num_matvecs: int
    num_evaluations: int
    direction_kind: str = "given"
    eigenvalues: Tensor | None = None


# -- parameter perturbation ------------------------------------------------------------------


@contextlib.contextmanager
def perturbed_parameters(params: Mapping[str, Tensor]) -> Iterator[Callable[[Tensor], None]]:
    """Context manager yielding ``set(delta)``: parameters become ``theta_0 + delta``.

    ``delta`` is flat ``(n,)`` in the order of ``params``. On exit (normal, error or
    interrupt) every parameter is restored bit-exactly to ``theta_0``.
    """
    plist = list(params.values())
    saved = [p.detach().clone() for p in plist]

    def set_delta(delta: Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p, p0 in zip(plist, saved):
                m = p.numel()
                p.copy_(p0 + delta[i : i + m].view_as(p))
                i += m

    try:
        yield set_delta
    finally:
        with torch.no_grad():
            for p, p0 in zip(plist, saved):
                p.copy_(p0)


# -- directions --------------------------------------------------------------------------------


def random_direction(
    model: nn.Module,
    *,
    params: Any = None,
    normalization: str = "filter",
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A Gaussian random direction, normalised per filter like the weights (Li et al., 2018).

    For every parameter with ``ndim >= 2`` (Linear rows, Conv output channels) each filter
    ``d_i`` (a slice along dim 0) is rescaled to the norm of the matching weight filter,
    ``d_i <- d_i / ||d_i|| * ||w_i||``. One-dimensional parameters (biases, norm scales) get
    zero (``ignore_1d=True``, as in the paper) or the norm of the parameter.

    Args:
        model: the model; the direction is flat in ``model.named_parameters()`` order.
        params: parameter subset (see :func:`hesse.objective.resolve_params`).
        normalization: ``"filter"`` (default), ``"layer"`` (whole tensor to ``||w||``) or
            ``"none"`` (plain unit-variance Gaussian).
        ignore_1d: zero out 1-D parameters (filter/layer normalisation only).
        generator: randomness (``torch.Generator``); global RNG if ``None``.

    Returns:
        ``(n,)`` tensor of the parameters' dtype and device.
    """
    norm = check_choice(normalization, "normalization", ("filter", "layer", "none"))
    chosen = resolve_params(model, params)
    parts = []
    for p in chosen.values():
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device)
        w = p.detach()
        if norm == "none":
            pass
        elif p.ndim <= 1:
            d = torch.zeros_like(d) if ignore_1d else d * (w.norm() / d.norm().clamp_min(1e-30))
        elif norm == "layer":
            d = d * (w.norm() / d.norm().clamp_min(1e-30))
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            d = d * (wn / dn).reshape(-1, *([1] * (d.ndim - 1)))
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def _top_directions(op: LinearOperator, k: int, generator: torch.Generator | None):
    try:
        from ..linalg.eigen import top_eigenpairs
    except ImportError as e:  # pragma: no cover - depends on the linalg module landing
        raise NotImplementedError(
            "direction='top' needs hesse.top_eigenpairs (hesse.linalg); pass an explicit "
            "direction tensor instead."
        ) from e
    res = top_eigenpairs(op, k=k, which="largest", generator=generator)
    return res.eigenvectors, res.eigenvalues


def _as_flat(direction: Any, n: int, dtype: torch.dtype, device: torch.device, names) -> Tensor:
    if isinstance(direction, Mapping):
        missing = [k for k in names if k not in direction]
        if missing:
            raise ValueError(f"direction dict lacks parameters {missing[:5]}.")
        direction = torch.cat([torch.as_tensor(direction[k]).reshape(-1) for k in names])
    if not isinstance(direction, Tensor):
        raise TypeError(
            "direction must be a flat tensor (n,), a name -> tensor dict, 'top' or 'random'; "
            f"got {type(direction).__name__}."
        )
    if direction.ndim != 1 or direction.shape[0] != n:
        raise ValueError(
            f"Shape mismatch: expected a direction of shape ({n},), got {tuple(direction.shape)}."
        )
    direction = direction.to(dtype=dtype, device=device)
    check_finite(direction, "the direction")
    if not bool(direction.any()):
        raise ValueError("direction is all zeros; a slice needs a nonzero direction.")
    return direction


def _grid(radius: float, num_points: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    check_positive(radius, "radius")
    check_int(num_points, "num_points", minimum=2)
    return torch.linspace(-radius, radius, num_points, dtype=dtype, device=device)


def _curvature_products(
    curvature: Any, hessian: Callable[[], LinearOperator], D: Tensor
) -> tuple[Tensor, int]:
    """``D^T C D`` for ``D`` of shape ``(n, k)`` and the curvature products it cost."""
    k = D.shape[1]
    if curvature is None:
        curvature = hessian()
    if isinstance(curvature, LinearOperator):
        before = curvature.num_matvecs
        CD = curvature.matmat(D)
        return D.T @ CD, curvature.num_matvecs - before
    if isinstance(curvature, (int, float)) and not isinstance(curvature, bool) and k == 1:
        return torch.tensor([[float(curvature)]], dtype=D.dtype, device=D.device), 0
    if isinstance(curvature, Tensor):
        C = curvature.to(dtype=D.dtype, device=D.device)
        if C.shape == (k, k):
            return C, 0
        if C.ndim == 2 and C.shape[0] == C.shape[1] == D.shape[0]:
            return D.T @ (C @ D), k
    raise TypeError(
        "curvature must be None (exact Hessian), a LinearOperator, a dense (n, n) tensor, "
        f"or the value d^T H d ({k} x {k}); got {type(curvature).__name__}."
    )


def loss_slice(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    direction: Any = "top",
    *,
    radius: float = 1.0,
    num_points: int = 41,
    curvature: Any = None,
    params: Any = None,
    generator: torch.Generator | None = None,
    **objective_kwargs: Any,
) -> LossSlice:
    """The loss along a line through the current parameters, with its quadratic model.

    .. math::
        \\ell(\\alpha) = L(\\theta_0 + \\alpha d), \\qquad
        q(\\alpha) = L_0 + \\alpha\\, g^\\top d + \\tfrac12 \\alpha^2\\, d^\\top H d,
        \\qquad \\alpha \\in [-r, r].

    ``L`` is the objective of :class:`hesse.Objective` (exact mean/sum over all of ``data``,
    eval mode by default). Parameters are restored exactly afterwards.

    Cost: ``num_points`` loss evaluations, one gradient and one curvature product (plus a
    Lanczos run for ``direction="top"``).

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`.
        direction: a flat ``(n,)`` tensor or a ``name -> tensor`` dict (used as is, not
            normalised); ``"top"`` for the unit top Hessian eigenvector (by
            :func:`hesse.top_eigenpairs`); ``"random"`` for a filter-normalised random
            direction (:func:`random_direction`).
        radius: the slice covers ``alpha`` in ``[-radius, radius]``.
        num_points: grid points (>= 2); use an odd number to include ``alpha = 0``.
        curvature: ``None`` for the exact Hessian; a ``LinearOperator`` (e.g. a
            :class:`hesse.GGNOperator`) or dense ``(n, n)`` tensor for another curvature; or
            the number ``d^T H d`` if already known.
        params: parameter subset.
        generator: randomness for ``"random"`` directions and the Lanczos start.
        **objective_kwargs: passed to :class:`hesse.Objective` (``weight_decay``,
            ``train_mode``, ...).

    Returns:
        :class:`LossSlice`.

    Raises:
        ValueError: bad ``radius``/``num_points``, a zero direction or a shape mismatch.
        NonFiniteError: the loss is NaN/inf at the centre.

    Example:
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> X, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
        >>> s = loss_slice(model, nn.MSELoss(), (X, y), torch.ones(3, dtype=torch.float64))
        >>> bool(torch.allclose(s.losses, s.quadratic))   # MSE of a linear model is quadratic
        True

    References:
        Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
    """
    kind = "given"
    eigenvalue = None
    holder: dict[str, HessianOperator] = {}

    def hessian() -> HessianOperator:
        if "H" not in holder:
            holder["H"] = HessianOperator(model, loss_fn, data, params=params, **objective_kwargs)
        return holder["H"]

    objective = Objective(model, loss_fn, data, params=params, **objective_kwargs)
    alphas = _grid(radius, num_points, objective.dtype, objective.device)
    extra_matvecs = 0
    if isinstance(direction, str):
        kind = check_choice(direction, "direction", ("top", "random"))
        if kind == "random":
            direction = random_direction(model, params=params, generator=generator)
        else:
            H = hessian()
            before = H.num_matvecs
            vecs, vals = _top_directions(H, 1, generator)
            extra_matvecs = H.num_matvecs - before
            direction, eigenvalue = vecs[:, 0], float(vals[0])
    d = _as_flat(direction, objective.n, objective.dtype, objective.device, objective.names)

    loss0, g = objective.value_and_grad()
    C, used = _curvature_products(curvature, hessian, d.unsqueeze(1))
    slope, curv = g @ d, C[0, 0]
    quadratic = loss0 + alphas * slope + 0.5 * alphas**2 * curv

    losses = torch.empty_like(alphas)
    with perturbed_parameters(objective.params) as set_delta:
        for i, a in enumerate(alphas):
            set_delta(a * d)
            losses[i] = objective.loss()
    return LossSlice(
        alphas=alphas,
        losses=losses,
        quadratic=quadratic.detach(),
        loss0=float(loss0),
        slope=float(slope),
        curvature=float(curv),
        direction=d,
        direction_norm=float(d.norm()),
        num_matvecs=used + extra_matvecs,
        num_evaluations=int(num_points),
        direction_kind=kind,
        eigenvalue=eigenvalue,
    )


def loss_surface_2d(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    directions: Any = "top",
    *,
    radius: float | Sequence[float] = 1.0,
    num_points: int | Sequence[int] = 21,
    curvature: Any = None,
    params: Any = None,
    generator: torch.Generator | None = None,
    **objective_kwargs: Any,
) -> LossSurface2D:
    """The loss on a plane through the current parameters, with its quadratic model.

    .. math::
        \\ell(\\alpha, \\beta) = L(\\theta_0 + \\alpha d_1 + \\beta d_2), \\qquad
        q(c) = L_0 + c^\\top D^\\top g + \\tfrac12 c^\\top D^\\top H D\\, c, \\quad
        c = (\\alpha, \\beta).

    Cost: ``P * Q`` loss evaluations, one gradient, two curvature products (plus a Lanczos
    run for ``directions="top"``).

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`.
        directions: ``"top"`` (the two top Hessian eigenvectors, orthonormal), ``"random"``
            (two independent filter-normalised random directions), an ``(n, 2)`` tensor, or a
            pair of flat tensors / name -> tensor dicts.
        radius: half-width of the grid, one number or ``(r_alpha, r_beta)``.
        num_points: grid points per axis, one int or ``(P, Q)``.
        curvature: ``None`` (exact Hessian), a ``LinearOperator``, a dense ``(n, n)`` tensor,
            or the ``(2, 2)`` matrix ``D^T H D``.
        params, generator, **objective_kwargs: as in :func:`loss_slice`.

    Returns:
        :class:`LossSurface2D`.
    """
    ra, rb = (radius, radius) if isinstance(radius, (int, float)) else tuple(radius)
    pa, pb = (num_points, num_points) if isinstance(num_points, int) else tuple(num_points)
    objective = Objective(model, loss_fn, data, params=params, **objective_kwargs)
    alphas = _grid(ra, pa, objective.dtype, objective.device)
    betas = _grid(rb, pb, objective.dtype, objective.device)
    holder: dict[str, HessianOperator] = {}

    def hessian() -> HessianOperator:
        if "H" not in holder:
            holder["H"] = HessianOperator(model, loss_fn, data, params=params, **objective_kwargs)
        return holder["H"]

    kind, eigenvalues, extra = "given", None, 0
    if isinstance(directions, str):
        kind = check_choice(directions, "directions", ("top", "random"))
        if kind == "random":
            directions = [
                random_direction(model, params=params, generator=generator) for _ in range(2)
            ]
        else:
            H = hessian()
            before = H.num_matvecs
            vecs, eigenvalues = _top_directions(H, 2, generator)
            extra = H.num_matvecs - before
            directions = [vecs[:, 0], vecs[:, 1]]
    if isinstance(directions, Tensor) and directions.ndim == 2:
        if directions.shape[1] != 2:
            raise ValueError(
                f"Shape mismatch: expected directions of shape (n, 2), got "
                f"{tuple(directions.shape)}."
            )
        directions = [directions[:, 0], directions[:, 1]]
    if not isinstance(directions, (list, tuple)) or len(directions) != 2:
        raise TypeError(
            "directions must be 'top', 'random', an (n, 2) tensor or a pair of directions."
        )
    D = torch.stack(
        [
            _as_flat(x, objective.n, objective.dtype, objective.device, objective.names)
            for x in directions
        ],
        dim=1,
    )
    loss0, g = objective.value_and_grad()
    C, used = _curvature_products(curvature, hessian, D)
    C = 0.5 * (C + C.T)
    slopes = D.T @ g
    A, B = torch.meshgrid(alphas, betas, indexing="ij")
    quadratic = (
        loss0
        + A * slopes[0]
        + B * slopes[1]
        + 0.5 * (A * A * C[0, 0] + 2 * A * B * C[0, 1] + B * B * C[1, 1])
    )
    losses = torch.empty_like(A)
    with perturbed_parameters(objective.params) as set_delta:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                set_delta(a * D[:, 0] + b * D[:, 1])
                losses[i, j] = objective.loss()
    return LossSurface2D(
        alphas=alphas,
        betas=betas,
        losses=losses,
        quadratic=quadratic.detach(),
        loss0=float(loss0),
        slopes=slopes.detach(),
        curvature=C.detach(),
        directions=D,
        num_matvecs=used + extra,
        num_evaluations=pa * pb,
        direction_kind=kind,
        eigenvalues=None if eigenvalues is None else eigenvalues.detach(),
    )
