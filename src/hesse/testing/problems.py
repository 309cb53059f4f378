"""Classic unconstrained test problems: Rosenbrock, Himmelblau and the More-Garbow-Hillstrom set.

Every problem is a smooth ``f: R^n -> R`` written in torch (differentiable, any floating dtype),
with its standard starting point and its published minimum value ``f*`` (and the other local
minima values the literature reports). Most MGH problems are nonlinear least squares,
``f(x) = sum_i r_i(x)^2``.

:func:`minimize` runs any :mod:`hesse.optim` (or ``torch.optim``) optimizer on a problem with a
scipy-like stopping rule, which is what the tests and ``benchmarks/optimizers.py`` use.

References:
    J. J. More, B. S. Garbow, K. E. Hillstrom (1981), Testing unconstrained optimization
    software, ACM TOMS 7(1):17-41. Nocedal & Wright (2006), Numerical Optimization.
    D. M. Himmelblau (1972), Applied Nonlinear Programming.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Problem",
    "MinimizeResult",
    "rosenbrock",
    "himmelblau",
    "mgh_problems",
    "get_problem",
    "minimize",
]


@dataclass(frozen=True)
class Problem:
    """A test function with its standard start and published minimum.

    Attributes:
        name: short identifier (``"rosenbrock"``, ``"beale"``, ...).
        n: number of variables.
        fn: ``x (n,) -> f(x)`` scalar tensor, differentiable.
        x0: standard starting point.
        f_star: published global (or reported) minimum value.
        other_minima: other local minimum values a method may legitimately stop at.
        reference: where ``f_star`` comes from.
    """

    name: str
    n: int
    fn: Callable[[Tensor], Tensor]
    x0: tuple[float, ...]
    f_star: float
    other_minima: tuple[float, ...] = ()
    reference: str = "More, Garbow & Hillstrom (1981)"
    x_star: tuple[float, ...] | None = field(default=None)

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def start(self, dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
        """A fresh leaf tensor at the standard starting point (``requires_grad=True``)."""
        return torch.tensor(self.x0, dtype=dtype, device=device).requires_grad_(True)

    def solved(self, f: float, *, rtol: float = 1e-6, atol: float = 1e-10) -> bool:
        """``f`` reached ``f*`` (or one of ``other_minima``) to ``rtol`` (relative) + ``atol``.

        Published values are truncated to 6 significant digits, so a nonzero target also
        counts as reached within one unit of its 6th digit (MGH's Freudenstein-Roth
        ``48.9842`` is ``48.98425368...``, Kowalik-Osborne ``3.07505e-4`` is
        ``3.0750560e-4``) when that is looser than ``rtol``.
        """
        for t in (self.f_star, *self.other_minima):
            tol = rtol * abs(t) + atol
            if t != 0.0:
                tol = max(tol, 10 ** (math.floor(math.log10(abs(t))) - 5))
            if abs(f - t) <= tol:
                return True
        return False


def _ls(res: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        r = res(x)
        return (r * r).sum()

    return f


def _c(x: Tensor, values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def _idx(x: Tensor, m: int, start: int = 1) -> Tensor:
    return torch.arange(start, start + m, dtype=x.dtype, device=x.device)


# -- the problems (numbering of More, Garbow & Hillstrom 1981) ----------------------------


def rosenbrock(n: int = 2) -> Problem:
    """Extended Rosenbrock (chained form of N&W): ``sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``.

    Start ``(-1.2, 1, -1.2, 1, ...)``; ``f* = 0`` at ``x = 1``. For ``n >= 4`` the chained
    form also has a local minimum near ``x = (-1, 1, ..., 1)`` with ``f ~ 3.98662``.
    """
    if n < 2:
        raise ValueError(f"Invalid n={n!r}; must be >= 2.")

    def f(x: Tensor) -> Tensor:
        return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()

    x0 = tuple(-1.2 if i % 2 == 0 else 1.0 for i in range(n))
    other = (3.9866238,) if n >= 4 else ()
    return Problem(
        f"rosenbrock{n}d" if n != 2 else "rosenbrock",
        n,
        f,
        x0,
        0.0,
        other,
        "Nocedal & Wright (2006), eq. (2.22)",
        (1.0,) * n,
    )


def himmelblau() -> Problem:
    """Himmelblau: ``(x^2 + y - 11)^2 + (x + y^2 - 7)^2``, four global minima with ``f* = 0``.

    Start ``(0, 0)`` (a common choice; the function has a local maximum near
    ``(-0.27, -0.92)``).
    """

    def f(x: Tensor) -> Tensor:
        return (x[0] ** 2 + x[1] - 11) ** 2 + (x[0] + x[1] ** 2 - 7) ** 2

    return Problem("himmelblau", 2, f, (0.0, 0.0), 0.0, (), "Himmelblau (1972)")


def _freudenstein_roth(x: Tensor) -> Tensor:
    return torch.stack(
        [
            -13.0 + x[0] + ((5.0 - x[1]) * x[1] - 2.0) * x[1],
            -29.0 + x[0] + ((x[1] + 1.0) * x[1] - 14.0) * x[1],
        ]
    )


def _powell_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([1e4 * x[0] * x[1] - 1.0, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def _brown_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2.0])


def _beale(x: Tensor) -> Tensor:
    i = _idx(x, 3)
    return _c(x, [1.5, 2.25, 2.625]) - x[0] * (1.0 - x[1] ** i)


def _jennrich_sampson(x: Tensor) -> Tensor:
    i = _idx(x, 10)
    return 2.0 + 2.0 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def _helical_valley(x: Tensor) -> Tensor:
    t = torch.atan(x[1] / x[0]) / (2 * math.pi) + torch.where(x[0] < 0, 0.5, 0.0)
    r = torch.sqrt(x[0] ** 2 + x[1] ** 2)
    return torch.stack([10.0 * (x[2] - 10.0 * t), 10.0 * (r - 1.0), x[2]])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def _bard(x: Tensor) -> Tensor:
    u = _idx(x, 15)
    v = 16.0 - u
    w = torch.minimum(u, v)
    return _c(x, _BARD_Y) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = [
    0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989,
    0.3521, 0.2420, 0.1295, 0.0540, 0.0175, 0.0044, 0.0009,
]  # fmt: skip


def _gaussian(x: Tensor) -> Tensor:
    t = (8.0 - _idx(x, 15)) / 2.0
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2.0) - _c(x, _GAUSS_Y)


_MEYER_Y = [
    34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744,
    8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872,
]  # fmt: skip


def _meyer(x: Tensor) -> Tensor:
    t = 45.0 + 5.0 * _idx(x, 16)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _c(x, _MEYER_Y)


def _box3d(x: Tensor) -> Tensor:
    t = 0.1 * _idx(x, 10)
    return (
        torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10.0 * t))
    )


def _powell_singular(x: Tensor) -> Tensor:
    return torch.stack(
        [
            x[0] + 10.0 * x[1],
            math.sqrt(5.0) * (x[2] - x[3]),
            (x[1] - 2.0 * x[2]) ** 2,
            math.sqrt(10.0) * (x[0] - x[3]) ** 2,
        ]
    )


def _wood(x: Tensor) -> Tensor:
    return torch.stack(
        [
            10.0 * (x[1] - x[0] ** 2),
            1.0 - x[0],
            math.sqrt(90.0) * (x[3] - x[2] ** 2),
            1.0 - x[2],
            math.sqrt(10.0) * (x[1] + x[3] - 2.0),
            (x[1] - x[3]) / math.sqrt(10.0),
        ]
    )


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def _kowalik_osborne(x: Tensor) -> Tensor:
    u = _c(x, _KO_U)
    return _c(x, _KO_Y) - x[0] * (u * u + u * x[1]) / (u * u + u * x[2] + x[3])


def _brown_dennis(x: Tensor) -> Tensor:
    t = _idx(x, 20) / 5.0
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OSB1_Y = [
    0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751,
    0.718, 0.685, 0.658, 0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490,
    0.478, 0.467, 0.457, 0.448, 0.438, 0.431, 0.424, 0.420, 0.414, 0.411, 0.406,
]  # fmt: skip


def _osborne1(x: Tensor) -> Tensor:
    t = 10.0 * (_idx(x, 33) - 1.0)
    return _c(x, _OSB1_Y) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def _biggs_exp6(x: Tensor) -> Tensor:
    t = 0.1 * _idx(x, 13)
    y = torch.exp(-t) - 5.0 * torch.exp(-10.0 * t) + 3.0 * torch.exp(-4.0 * t)
    return (
        x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y
    )


def _watson(x: Tensor) -> Tensor:
    n = x.numel()
    t = _idx(x, 29) / 29.0
    j = torch.arange(n, dtype=x.dtype, device=x.device)
    powers = t[:, None] ** j[None, :]  # t^(j) for j = 0..n-1
    s1 = (powers[:, :-1] * (j[1:] * x[1:])[None, :]).sum(1)  # sum_{j>=2} (j-1) x_j t^(j-2)
    s2 = (powers * x[None, :]).sum(1)
    return torch.cat([s1 - s2 * s2 - 1.0, x[:1], (x[1] - x[0] ** 2 - 1.0).reshape(1)])


def _extended_powell(x: Tensor) -> Tensor:
    a, b, c, d = x[0::4], x[1::4], x[2::4], x[3::4]
    return torch.cat(
        [a + 10.0 * b, math.sqrt(5.0) * (c - d), (b - 2.0 * c) ** 2, math.sqrt(10.0) * (a - d) ** 2]
    )


def _penalty1(x: Tensor) -> Tensor:
    return torch.cat([math.sqrt(1e-5) * (x - 1.0), ((x * x).sum() - 0.25).reshape(1)])


def _variably_dimensioned(x: Tensor) -> Tensor:
    j = _idx(x, x.numel())
    s = (j * (x - 1.0)).sum()
    return torch.cat([x - 1.0, s.reshape(1), (s * s).reshape(1)])


def _trigonometric(x: Tensor) -> Tensor:
    n = x.numel()
    i = _idx(x, n)
    return n - torch.cos(x).sum() + i * (1.0 - torch.cos(x)) - torch.sin(x)


def _brown_almost_linear(x: Tensor) -> Tensor:
    n = x.numel()
    return torch.cat([x[:-1] + x.sum() - (n + 1.0), (torch.prod(x) - 1.0).reshape(1)])


def _broyden_tridiagonal(x: Tensor) -> Tensor:
    z = torch.zeros(1, dtype=x.dtype, device=x.device)
    left = torch.cat([z, x[:-1]])
    right = torch.cat([x[1:], z])
    return (3.0 - 2.0 * x) * x - left - 2.0 * right + 1.0


def _linear_full_rank(x: Tensor, m: int) -> Tensor:
    n = x.numel()
    s = x.sum()
    return torch.cat([x - 2.0 * s / m - 1.0, (-2.0 * s / m - 1.0).expand(m - n)])


def mgh_problems() -> list[Problem]:
    """The More-Garbow-Hillstrom problems shipped here, with standard starts and published ``f*``.

    Numbers in the names follow the paper. Published values (MGH 1981, Table/Appendix):
    Beale 0, Wood 0, Powell singular 0, Helical valley 0, Freudenstein-Roth 0 or 48.9842,
    Kowalik-Osborne 3.07505e-4, Brown-Dennis 85822.2, Bard 8.21487e-3, Gaussian 1.12793e-8,
    Meyer 87.9458, Jennrich-Sampson 124.362, Osborne 1 5.46489e-5, Biggs EXP6 5.65565e-3 or 0,
    Watson (n=6) 2.28767e-3, Penalty I (n=4) 2.24997e-5, Box 3-D 0, Brown almost-linear 0
    or 1, Linear full rank ``m - n``.
    """
    P = Problem
    return [
        rosenbrock(2),
        P(
            "freudenstein_roth",
            2,
            _ls(_freudenstein_roth),
            (0.5, -2.0),
            0.0,
            (48.9842,),
            x_star=(5.0, 4.0),
        ),  # fmt: skip
        P("powell_badly_scaled", 2, _ls(_powell_badly_scaled), (0.0, 1.0), 0.0),
        P("brown_badly_scaled", 2, _ls(_brown_badly_scaled), (1.0, 1.0), 0.0),
        P("beale", 2, _ls(_beale), (1.0, 1.0), 0.0, (), x_star=(3.0, 0.5)),
        P("jennrich_sampson", 2, _ls(_jennrich_sampson), (0.3, 0.4), 124.362),
        P("helical_valley", 3, _ls(_helical_valley), (-1.0, 0.0, 0.0), 0.0),
        P("bard", 3, _ls(_bard), (1.0, 1.0, 1.0), 8.21487e-3, (17.4286,)),
        P("gaussian", 3, _ls(_gaussian), (0.4, 1.0, 0.0), 1.12793e-8),
        P("meyer", 3, _ls(_meyer), (0.02, 4000.0, 250.0), 87.9458),
        P("box3d", 3, _ls(_box3d), (0.0, 10.0, 20.0), 0.0),
        P("powell_singular", 4, _ls(_powell_singular), (3.0, -1.0, 0.0, 1.0), 0.0),
        P("wood", 4, _ls(_wood), (-3.0, -1.0, -3.0, -1.0), 0.0),
        P(
            "kowalik_osborne",
            4,
            _ls(_kowalik_osborne),
            (0.25, 0.39, 0.415, 0.39),
            3.07505e-4,
            (1.02734e-3,),
        ),  # fmt: skip
        P("brown_dennis", 4, _ls(_brown_dennis), (25.0, 5.0, -5.0, -1.0), 85822.2),
        P("osborne1", 5, _ls(_osborne1), (0.5, 1.5, -1.0, 0.01, 0.02), 5.46489e-5),
        P("biggs_exp6", 6, _ls(_biggs_exp6), (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), 5.65565e-3, (0.0,)),
        P("watson6", 6, _ls(_watson), (0.0,) * 6, 2.28767e-3),
        P("extended_rosenbrock10", 10, lambda x: _ls(_ext_rosen)(x), (-1.2, 1.0) * 5, 0.0),
        P("extended_powell8", 8, _ls(_extended_powell), (3.0, -1.0, 0.0, 1.0) * 2, 0.0),
        P("penalty1_4", 4, _ls(_penalty1), (1.0, 2.0, 3.0, 4.0), 2.24997e-5),
        P(
            "variably_dimensioned8",
            8,
            _ls(_variably_dimensioned),
            tuple(1.0 - j / 8 for j in range(1, 9)),
            0.0,
        ),  # fmt: skip
        P("trigonometric5", 5, _ls(_trigonometric), (0.2,) * 5, 0.0),
        P("brown_almost_linear5", 5, _ls(_brown_almost_linear), (0.5,) * 5, 0.0, (1.0,)),
        P("broyden_tridiagonal6", 6, _ls(_broyden_tridiagonal), (-1.0,) * 6, 0.0),
        P("linear_full_rank5_10", 5, _ls(lambda x: _linear_full_rank(x, 10)), (1.0,) * 5, 5.0),
    ]


def _ext_rosen(x: Tensor) -> Tensor:
    odd, even = x[0::2], x[1::2]
    return torch.cat([10.0 * (even - odd**2), 1.0 - odd])


def get_problem(name: str) -> Problem:
    """Look a problem up by name (``"rosenbrock"``, ``"rosenbrock5d"``, ``"himmelblau"``, MGH)."""
    if name == "himmelblau":
        return himmelblau()
    if name.startswith("rosenbrock") and name.endswith("d") and name[10:-1].isdigit():
        return rosenbrock(int(name[10:-1]))
    for p in mgh_problems():
        if p.name == name:
            return p
    names = ["himmelblau", "rosenbrock<n>d"] + [p.name for p in mgh_problems()]
    raise ValueError(f"Invalid name={name!r}; expected one of {', '.join(names)}.")


@dataclass(frozen=True)
class MinimizeResult:
    """Outcome of :func:`minimize`.

    Attributes:
        x: final point; f: its value; grad_norm: its gradient norm (the stopping norm).
        converged: the gradient test was met within ``max_iters``.
        iterations: ``step`` calls; func_evals: closure calls (including the stopping tests'
            evaluations when the optimizer does not count them itself: see ``counters``).
        counters: the optimizer's own counters (``hesse.optim``), else ``{}``.
        seconds: wall time.
    """

    x: Tensor
    f: float
    grad_norm: float
    converged: bool
    iterations: int
    func_evals: int
    counters: dict[str, int]
    seconds: float


def minimize(
    problem: Problem | Callable[[Tensor], Tensor],
    optimizer: Callable[..., torch.optim.Optimizer],
    x0: Tensor | None = None,
    *,
    gtol: float = 1e-5,
    norm: float = math.inf,
    max_iters: int = 1000,
    dtype: torch.dtype = torch.float64,
    until: Callable[[float], bool] | None = None,
    **kwargs: Any,
) -> MinimizeResult:
    """Minimise ``problem`` with ``optimizer([x], **kwargs)``, one ``step`` per iteration.

    Stops when ``||grad f(x)||_norm <= gtol`` (scipy's rule: ``norm=inf`` as ``BFGS``'s
    ``gtol``; Nocedal & Wright use ``norm=2``) or after ``max_iters`` steps. The gradient test
    uses the value the optimizer already computed when it exposes ``state["g"]`` (hesse
    optimizers), so it costs no extra evaluation. ``until(f)`` returning true also stops
    (e.g. ``until=problem.solved``).
    """
    fn = problem.fn if isinstance(problem, Problem) else problem
    if x0 is None:
        if not isinstance(problem, Problem):
            raise TypeError("x0 is required when problem is a plain function.")
        x = problem.start(dtype)
    else:
        x = x0.detach().clone().to(dtype).requires_grad_(True)
    opt = optimizer([x], **kwargs)
    evals = [0]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = fn(x)
        loss.backward()
        evals[0] += 1
        return loss

    def grad_norm() -> tuple[float, float]:
        st = opt.state.get(x, {})
        if "g" in st and "x" in st and torch.equal(st["x"], x.detach().reshape(-1)):
            return float(torch.linalg.vector_norm(st["g"], norm)), float(st["loss"])
        loss = closure()
        return float(torch.linalg.vector_norm(x.grad, norm)), float(loss.detach())

    t0 = time.perf_counter()
    it = 0
    gn, fv = grad_norm()
    while gn > gtol and it < max_iters and not (until is not None and until(fv)):
        opt.step(closure)
        it += 1
        gn, fv = grad_norm()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        f = float(fn(x))
    counters = dict(getattr(opt, "counters", {}) or {})
    return MinimizeResult(x.detach().clone(), f, gn, gn <= gtol, it, evals[0], counters, seconds)
