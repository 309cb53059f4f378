"""Quasi-Newton methods: BFGS, DFP, L-BFGS (strong Wolfe line search) and SR1 (trust region).

All four follow the closure contract of :mod:`hesse.optim`; one ``step(closure)`` is one
iteration. References: Nocedal & Wright, *Numerical Optimization* (2nd ed., 2006), chapters
6 (BFGS, DFP, SR1) and 7.2 (L-BFGS); Powell (1978) for damped updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from ..linalg.solve import cg_solve
from ._base import SecondOrderOptimizer
from ._line_search import strong_wolfe
from ._trust_region import solve_dense_subproblem

__all__ = ["BFGS", "DFP", "LBFGS", "SR1"]

_SAFEGUARDS = ("skip", "damp")


def _check_wolfe(c1: float, c2: float) -> None:
    check_positive(c1, "c1")
    check_positive(c2, "c2")
    if not c1 < c2 < 1.0:
        raise ValueError(f"Invalid c1={c1!r}, c2={c2!r}; strong Wolfe needs 0 < c1 < c2 < 1.")


class _LineSearchQuasiNewton(SecondOrderOptimizer):
    """Shared iteration of the line-search quasi-Newton methods.

    Subclasses implement ``_direction(g) -> d`` (``d = -H g``), ``_update(s, y, Bs)`` and
    ``_reset()``; ``_initial_rule`` picks the first trial step.
    """

    _shared = (
        "line_search_fn",
        "c1",
        "c2",
        "max_evals",
        "tolerance_grad",
        "curvature_safeguard",
    )
    _initial_rule = "interpolate"

    def _validate(self, group: dict[str, Any]) -> None:
        if group["line_search_fn"] not in (None, "strong_wolfe"):
            raise ValueError(
                f"Invalid line_search_fn={group['line_search_fn']!r}; expected 'strong_wolfe' "
                "or None (fixed step lr)."
            )
        _check_wolfe(group["c1"], group["c2"])
        check_int(group["max_evals"], "max_evals")
        check_nonnegative(group["tolerance_grad"], "tolerance_grad")
        check_choice(group["curvature_safeguard"], "curvature_safeguard", _SAFEGUARDS)

    def _direction(self, g: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, s: Tensor, y: Tensor, Bs: Tensor | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _reset(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _safeguard(self, s: Tensor, y: Tensor, Bs: Tensor | None) -> Tensor | None:
        """Return the ``y`` to use, or ``None`` to skip the update (``s^T y`` too small)."""
        sy, ss, yy = torch.stack([s.dot(y), s.dot(s), y.dot(y)]).tolist()  # one sync
        if self._hp("curvature_safeguard") == "damp" and Bs is not None:
            sBs = float(s.dot(Bs))
            if sBs > 0 and sy < 0.2 * sBs:  # Powell (1978) damping: s^T y_damped = 0.2 s^T B s
                theta = 0.8 * sBs / (sBs - sy)
                y = theta * y + (1.0 - theta) * Bs
                sy, yy = float(s.dot(y)), float(y.dot(y))
        if not math.isfinite(sy) or not math.isfinite(yy) or sy <= 1e-10 * math.sqrt(ss * yy):
            self._st["skipped_updates"] = self._st.get("skipped_updates", 0) + 1
            return None
        return y

    def _iterate(self, closure: Callable[[], Any]) -> Tensor:
        st = self._st
        x, loss, g = self._cached_point(closure)
        f = float(loss)
        tol = self._hp("tolerance_grad")
        if tol > 0 and float(g.abs().max()) <= tol:
            return loss
        scale = self._scale()
        vec_scale = isinstance(scale, Tensor)
        d = self._direction(g)
        if vec_scale:
            d = d * scale
        dphi0 = float(g.dot(d))
        if dphi0 == 0.0 and not bool(g.any()):  # stationary point: nothing to do
            return loss
        if not math.isfinite(dphi0) or dphi0 >= 0:  # lost descent: restart from -g
            self._reset()
            st["restarts"] += 1
            d = -g * scale if vec_scale else -g
            dphi0 = float(g.dot(d))
            if not dphi0 < 0:  # zero (stationary point) or non-finite gradient: nothing to do
                return loss
        lr = 1.0 if vec_scale else scale
        if self._hp("line_search_fn") is None:
            t = lr
            x_new = torch.add(x, d, alpha=t)
            self._vec.set_(x_new)
            ev, g_new = self._evaluate(closure)
            if not math.isfinite(ev.f) or not bool(torch.isfinite(g_new).all()):
                self._vec.set_(x)
                self._reset()
                st["restarts"] += 1
                return loss
            f_new = ev.f
        else:
            if self._initial_rule == "interpolate":
                # Nocedal & Wright (3.60), as scipy: first trial from the last decrease
                f_prev = st.get("f_prev", f + 0.5 * float(g.norm()))
                t1 = 1.01 * 2.0 * (f - f_prev) / dphi0
                t1 = min(1.0, t1) if math.isfinite(t1) and t1 > 0 else 1.0
            else:  # first iteration 1/||g||_1 (as torch.optim.LBFGS), then 1
                t1 = min(1.0, 1.0 / float(g.abs().sum())) if "f_prev" not in st else 1.0
            res = strong_wolfe(
                self._phi(closure, x, d),
                f,
                dphi0,
                t1 * lr,
                c1=self._hp("c1"),
                c2=self._hp("c2"),
                max_evals=self._hp("max_evals"),
            )
            if res.alpha == 0.0 or res.g is None:  # no decrease along d: restart from -g
                self._vec.set_(x)
                self._reset()
                st["restarts"] += 1
                st.pop("f_prev", None)
                return loss
            t = res.alpha
            x_new = torch.add(x, d, alpha=t)
            last = getattr(self, "_last_trial", None)
            if last is None or last[0] != t:  # else the parameters are already at x_new
                self._vec.set_(x_new)
            self._last_trial = None
            f_new, g_new = res.f, res.g
        s = x_new - x
        y = g_new - g
        Bs = None if vec_scale else (-t) * g  # B_k s = -t g_k since d = -H_k g_k
        y_used = self._safeguard(s, y, Bs)
        if y_used is not None:
            self._update(s, y_used, Bs)
        st["f_prev"] = f
        self._accept(x_new, f_new, g_new)
        return loss


class _DenseInverseQN(_LineSearchQuasiNewton):
    """Quasi-Newton with a dense inverse-Hessian approximation ``H`` (``n x n``): the shared
    skeleton of BFGS and DFP (constructor, direction, reset, initial scaling); each
    implements only its ``_update``."""

    _shared = _LineSearchQuasiNewton._shared + ("scale_initial",)

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        line_search_fn: str | None = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evals: int = 25,
        tolerance_grad: float = 0.0,
        curvature_safeguard: str = "skip",
        scale_initial: bool = False,
    ):
        defaults = dict(
            lr=lr,
            line_search_fn=line_search_fn,
            c1=c1,
            c2=c2,
            max_evals=max_evals,
            tolerance_grad=tolerance_grad,
            curvature_safeguard=curvature_safeguard,
            scale_initial=scale_initial,
        )
        super().__init__(params, defaults)

    def _H(self) -> Tensor | None:
        return self._st.get("H")

    def _direction(self, g: Tensor) -> Tensor:
        H = self._H()
        return -g if H is None else -(H @ g)

    def _reset(self) -> None:
        self._st.pop("H", None)

    def _initial_H(self, s: Tensor, y: Tensor) -> Tensor:
        n = s.numel()
        gamma = float(s.dot(y)) / float(y.dot(y)) if self._hp("scale_initial") else 1.0
        return torch.eye(n, dtype=s.dtype, device=s.device) * gamma

    def inverse_hessian_approximation(self) -> Tensor:
        """The current dense ``H`` (inverse-Hessian approximation), ``(n, n)``."""
        H = self._H()
        if H is None:
            return torch.eye(self._vec.n, dtype=self._vec.dtype, device=self._vec.device)
        return H.clone()


class BFGS(_DenseInverseQN):
    """BFGS with a dense inverse-Hessian approximation and a strong Wolfe line search.

    .. math::
        H_{k+1} = (I - \\rho_k s_k y_k^\\top) H_k (I - \\rho_k y_k s_k^\\top)
                  + \\rho_k s_k s_k^\\top, \\qquad \\rho_k = 1 / (y_k^\\top s_k).

    Each step::

        g = grad f(x);  d = -H g                      (d = -g on the first step / restart)
        t = strong_wolfe(f, x, d, t0=min(1, 2.02 (f - f_prev) / g^T d))
        s = t d;  y = grad f(x + s) - g;  x += s
        update H with (s, y) unless s^T y <= 0 (skip, or Powell-damp y)

    Cost per step: one line search (usually one evaluation), ``O(n^2)`` memory and time.

    Args:
        params: parameters or parameter groups.
        lr: multiplier of the first trial step (1.0 is right for quasi-Newton).
        line_search_fn: ``"strong_wolfe"`` or ``None`` (fixed step ``lr``, no search).
        c1, c2: Wolfe constants (``0 < c1 < c2 < 1``).
        max_evals: evaluations allowed per line search.
        tolerance_grad: the step does nothing once ``max|g| <= tolerance_grad``.
        curvature_safeguard: ``"skip"`` the update when ``s^T y`` is not positive, or
            ``"damp"`` it (Powell 1978).
        scale_initial: scale ``H_0 = (s^T y / y^T y) I`` before the first update
            (Nocedal & Wright eq. 6.20); scipy does not.

    Example:
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = BFGS([x])
        >>> def closure():
        ...     opt.zero_grad(); loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward(); return loss
        >>> for _ in range(60): _ = opt.step(closure)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True

    References:
        Nocedal & Wright (2006), Algorithm 6.1.
    """

    def _update(self, s: Tensor, y: Tensor, Bs: Tensor | None) -> None:
        st = self._st
        H = st.get("H")
        if H is None:
            H = self._initial_H(s, y)
        sy = float(s.dot(y))
        Hy = H @ y
        yHy = float(y.dot(Hy))
        rho = 1.0 / sy
        # in place, O(n^2) memory traffic: H += c s s^T - rho (Hy s^T + s Hy^T)
        H.addr_(s, s, alpha=(1.0 + rho * yHy) * rho)
        H.addr_(Hy, s, alpha=-rho)
        H.addr_(s, Hy, alpha=-rho)
        st["H"] = H


class DFP(_DenseInverseQN):
    """Davidon-Fletcher-Powell with a dense inverse-Hessian approximation and strong Wolfe.

    .. math::
        H_{k+1} = H_k - \\frac{H_k y_k y_k^\\top H_k}{y_k^\\top H_k y_k}
                  + \\frac{s_k s_k^\\top}{y_k^\\top s_k}.

    Same step, arguments and cost as :class:`BFGS` (only the update differs), except the
    default ``c2 = 0.1``: DFP corrects bad curvature estimates far more slowly than BFGS
    (Nocedal & Wright, Section 6.1) and needs a more accurate line search (Fletcher 1987);
    with ``c2 = 0.9`` it takes ~700 iterations on Rosenbrock instead of ~25.

    References:
        Davidon (1959); Fletcher & Powell (1963); Nocedal & Wright (2006), eq. (6.15).
    """

    def __init__(self, params: Any, lr: float = 1.0, *, c2: float = 0.1, **kwargs: Any):
        super().__init__(params, lr, c2=c2, **kwargs)

    def _update(self, s: Tensor, y: Tensor, Bs: Tensor | None) -> None:
        st = self._st
        H = st.get("H")
        if H is None:
            H = self._initial_H(s, y)
        Hy = H @ y
        yHy = float(y.dot(Hy))
        if not yHy > 0:
            st["skipped_updates"] = st.get("skipped_updates", 0) + 1
            return
        H.addr_(Hy, Hy, alpha=-1.0 / yHy)
        H.addr_(s, s, alpha=1.0 / float(s.dot(y)))
        st["H"] = H


class LBFGS(_LineSearchQuasiNewton):
    """Limited-memory BFGS (two-loop recursion) with a strong Wolfe line search.

    Each step::

        g = grad f(x)
        d = -H_k g   by the two-loop recursion over the last m pairs (s_i, y_i),
                     with H_0 = (s^T y / y^T y) I from the newest pair
        t = strong_wolfe(f, x, d, t0 = min(1, 1/||g||_1) on the first step, else 1)
        s = t d;  y = grad f(x + s) - g;  x += s;  store (s, y) unless s^T y <= 0

    Cost per step: one line search (usually one evaluation), ``O(m n)`` memory and time.
    Unlike ``torch.optim.LBFGS``, one ``step`` is one iteration (``max_iter`` does not
    exist), and the gradient of the accepted point is reused by the next step.

    Args:
        params: parameters or parameter groups.
        lr: multiplier of the trial step.
        history_size: number ``m`` of stored pairs.
        line_search_fn, c1, c2, max_evals, tolerance_grad, curvature_safeguard: as
            :class:`BFGS`.

    References:
        Liu & Nocedal (1989); Nocedal & Wright (2006), Algorithms 7.4 and 7.5.
    """

    _shared = _LineSearchQuasiNewton._shared + ("history_size",)
    _initial_rule = "unit"

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        history_size: int = 10,
        line_search_fn: str | None = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evals: int = 25,
        tolerance_grad: float = 0.0,
        curvature_safeguard: str = "skip",
    ):
        defaults = dict(
            lr=lr,
            history_size=history_size,
            line_search_fn=line_search_fn,
            c1=c1,
            c2=c2,
            max_evals=max_evals,
            tolerance_grad=tolerance_grad,
            curvature_safeguard=curvature_safeguard,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        super()._validate(group)
        check_int(group["history_size"], "history_size")

    def _direction(self, g: Tensor) -> Tensor:
        st = self._st
        S, Y, R = st.get("old_s", []), st.get("old_y", []), st.get("rho", [])
        if not S:
            return -g
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(R)):
            a = rho * s.dot(q)
            q.addcmul_(y, a, value=-1.0)
            alphas.append(a)
        r = q.mul_(st["gamma"])
        for s, y, rho, a in zip(S, Y, R, reversed(alphas)):
            b = rho * y.dot(r)
            r.addcmul_(s, a - b)
        return r.neg_()

    def _update(self, s: Tensor, y: Tensor, Bs: Tensor | None) -> None:
        st = self._st
        S, Y, R = st.setdefault("old_s", []), st.setdefault("old_y", []), st.setdefault("rho", [])
        if len(S) == self._hp("history_size"):
            S.pop(0)
            Y.pop(0)
            R.pop(0)
        sy = s.dot(y)
        S.append(s)
        Y.append(y)
        R.append(1.0 / sy)
        st["gamma"] = sy / y.dot(y)

    def _reset(self) -> None:
        st = self._st
        for k in ("old_s", "old_y", "rho", "gamma"):
            st.pop(k, None)


class SR1(SecondOrderOptimizer):
    """Symmetric rank-one quasi-Newton in a trust region (Nocedal & Wright Algorithm 6.2).

    .. math::
        B_{k+1} = B_k + \\frac{(y_k - B_k s_k)(y_k - B_k s_k)^\\top}{(y_k - B_k s_k)^\\top s_k},

    applied only when ``|s^T (y - B s)| >= r ||s|| ||y - B s||`` (``r = 1e-8``). SR1 may be
    indefinite, which is why it is paired with a trust region rather than a line search.

    Each step (one trial point, accepted or not, like scipy's ``trust-constr`` iterations)::

        p = argmin_{||p|| <= Delta} g^T p + p^T B p / 2     (exact eigh, or Steihaug CG)
        rho = (f(x) - f(x + p)) / (-(g^T p + p^T B p / 2))
        update B with (p, grad f(x + p) - g), even if the step is rejected
        accept x + p if rho > eta;  grow Delta if rho > 0.75 and ||p|| > 0.8 Delta,
        shrink it (Delta / 2) if rho < 0.1

    Cost per step: one evaluation, ``O(n^2)`` memory, one ``eigh`` (``n <= exact_max_dim``)
    or up to ``cg_max_iters`` dense products.

    Args:
        params: parameters or parameter groups.
        lr: initial trust-region radius ``Delta_0``.
        max_radius: largest radius.
        eta: acceptance threshold on the reduction ratio, ``0 <= eta < 0.25``.
        skip_tol: the ``r`` of the skip rule.
        subproblem: ``"auto"`` (exact for ``n <= exact_max_dim``, else Steihaug CG),
            ``"exact"`` or ``"cg"``.
        init_scale: ``"auto"`` scales ``B_0 = (y^T y / y^T s) I`` at the first update (as
            scipy's ``SR1``), or a positive float ``c`` for ``B_0 = c I``.
        tolerance_grad: the step does nothing once ``max|g| <= tolerance_grad``.

    References:
        Conn, Gould & Toint (1991); Nocedal & Wright (2006), Section 6.2 and Algorithm 6.2.
    """

    _shared = (
        "lr",
        "max_radius",
        "eta",
        "skip_tol",
        "subproblem",
        "init_scale",
        "tolerance_grad",
        "exact_max_dim",
        "cg_max_iters",
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        max_radius: float = 1e8,
        eta: float = 1e-4,
        skip_tol: float = 1e-8,
        subproblem: str = "auto",
        init_scale: str | float = "auto",
        tolerance_grad: float = 0.0,
        exact_max_dim: int = 500,
        cg_max_iters: int = 250,
    ):
        defaults = dict(
            lr=lr,
            max_radius=max_radius,
            eta=eta,
            skip_tol=skip_tol,
            subproblem=subproblem,
            init_scale=init_scale,
            tolerance_grad=tolerance_grad,
            exact_max_dim=exact_max_dim,
            cg_max_iters=cg_max_iters,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_positive(group["max_radius"], "max_radius")
        if group["lr"] > group["max_radius"]:
            raise ValueError(
                f"Invalid lr={group['lr']!r}; the initial radius must be <= "
                f"max_radius={group['max_radius']!r}."
            )
        eta = group["eta"]
        if not isinstance(eta, (int, float)) or not 0.0 <= eta < 0.25:
            raise ValueError(f"Invalid eta={eta!r}; must lie in [0, 0.25).")
        check_positive(group["skip_tol"], "skip_tol")
        check_choice(group["subproblem"], "subproblem", ("auto", "exact", "cg"))
        if group["init_scale"] != "auto":
            check_positive(group["init_scale"], "init_scale")
        check_nonnegative(group["tolerance_grad"], "tolerance_grad")
        check_int(group["exact_max_dim"], "exact_max_dim", minimum=0)
        check_int(group["cg_max_iters"], "cg_max_iters")

    def hessian_approximation(self) -> Tensor:
        """The current dense ``B`` (Hessian approximation), ``(n, n)``."""
        B = self._st.get("B")
        if B is None:
            c = self._hp("init_scale")
            c = 1.0 if c == "auto" else float(c)
            return c * torch.eye(self._vec.n, dtype=self._vec.dtype, device=self._vec.device)
        return B.clone()

    def _iterate(self, closure: Callable[[], Any]) -> Tensor:
        st = self._st
        x, loss, g = self._cached_point(closure)
        f = float(loss)
        if float(g.abs().max()) <= self._hp("tolerance_grad"):
            return loss
        radius = st.setdefault("radius", float(self._hp("lr")))
        B = st.get("B")
        first = B is None
        if first:
            B = self.hessian_approximation()
        mode = self._hp("subproblem")
        if mode == "auto":
            mode = "exact" if self._vec.n <= self._hp("exact_max_dim") else "cg"
        if mode == "exact":
            p, pred, _ = solve_dense_subproblem(B, g, radius)
        else:
            p = cg_solve(
                B, -g, radius=radius, tol=1e-6, max_iters=self._hp("cg_max_iters")
            ).solution
            pred = -float(g.dot(p) + 0.5 * p.dot(B @ p))
        pnorm = float(p.norm())
        x_new = x + p
        self._vec.set_(x_new)
        ev, g_new = self._evaluate(closure)
        if not math.isfinite(ev.f) or not bool(torch.isfinite(g_new).all()):
            self._vec.set_(x)
            st["radius"] = 0.25 * min(radius, pnorm)
            st["restarts"] += 1
            return loss
        ared = f - ev.f
        rho = ared / pred if pred > 0 else -math.inf
        y = g_new - g
        if first and self._hp("init_scale") == "auto":
            sy = float(p.dot(y))
            if sy > 0:
                B = B * (float(y.dot(y)) / sy)
        Bs = B @ p
        v = y - Bs
        vs = float(v.dot(p))
        if abs(vs) >= self._hp("skip_tol") * pnorm * float(v.norm()) and vs != 0.0:
            B.addr_(v, v, alpha=1.0 / vs)  # symmetric rank one, in place
        else:
            st["skipped_updates"] = st.get("skipped_updates", 0) + 1
        st["B"] = B
        if rho > self._hp("eta"):
            self._accept(x_new, ev.loss, g_new)
        else:
            self._vec.set_(x)
        if rho > 0.75:
            if pnorm > 0.8 * radius:
                radius = min(2.0 * radius, self._hp("max_radius"))
        elif rho < 0.1:
            radius = 0.5 * radius
        st["radius"] = radius
        return loss
