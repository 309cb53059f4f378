"""Newton's method: exact (dense Hessian) or Newton-CG, with line search, trust region,
Levenberg-Marquardt damping, and a saddle-free option.

References: Nocedal & Wright, *Numerical Optimization* (2nd ed., 2006), chapters 3.3-3.4
(Newton with line search, Hessian modification), 4 (trust regions) and 7.1 (Newton-CG);
Dauphin et al. (2014), *Identifying and attacking the saddle point problem* (|H|).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_finite, check_int, check_nonnegative, check_positive
from ..linalg.solve import cg_solve
from ._base import GradHVPOperator, SecondOrderOptimizer
from ._line_search import strong_wolfe
from ._trust_region import solve_dense_subproblem, update_radius

__all__ = ["Newton"]

_MODES = ("auto", "exact", "cg")
_RULES = ("line_search", "trust_region", "levenberg_marquardt", "fixed")


class Newton(SecondOrderOptimizer):
    """Newton's method with the exact Hessian: dense for small ``n``, Newton-CG for large ``n``.

    The closure is the ordinary torch closure; the optimizer re-runs it so that ``backward()``
    keeps the gradient's graph, and takes Hessian-vector products from it (see
    :mod:`hesse.optim`). Each step::

        g, H = grad f(x), hess f(x)                 (H as n HVPs, or as an operator for CG)
        step_rule = "line_search":   d = -(H + damping I)^-1 g      (modified if H is not PD)
                                     t = strong_wolfe(f, x, d, t0=lr);  x += t d
        step_rule = "trust_region":  p = argmin_{||p||<=Delta} g^T p + p^T (H + damping I) p / 2
                                     accept if rho > eta; update Delta (N&W Algorithm 4.1)
        step_rule = "levenberg_marquardt":
                                     p = -lr (H + lam I)^-1 g;  rho = actual / predicted
                                     lam *= 3/2 if rho < 1/4, lam *= 2/3 if rho > 3/4;
                                     accept if rho > 0
        step_rule = "fixed":         x += lr d

    **Indefinite Hessians.** Exact mode: with ``saddle_free=True`` the direction uses
    ``|H| = Q |Lambda| Q^T`` (Dauphin et al. 2014), so saddles repel; otherwise ``H`` is
    shifted by ``tau I`` until positive definite (N&W Algorithm 3.3). CG mode: CG stops at
    the first direction of non-positive curvature and returns the iterate so far (``-g`` if
    none, as scipy's Newton-CG); with ``saddle_free=True`` it also moves along that direction
    of negative curvature (downhill). The trust-region rule handles indefiniteness itself.

    Cost per step: one graph evaluation (about 2 gradients), then ``n`` HVPs in one batched
    pass (exact) or one HVP per CG iteration, plus the line search / trust-region trial
    evaluations. Memory: ``n^2`` for the exact mode.

    Args:
        params: parameters or parameter groups.
        lr: first trial step (line search), step multiplier (fixed, LM), or initial
            trust-region radius (trust region).
        mode: ``"auto"`` (exact when ``n <= max_dense_dim``), ``"exact"`` or ``"cg"``.
        step_rule: ``"line_search"`` (strong Wolfe), ``"trust_region"``,
            ``"levenberg_marquardt"`` or ``"fixed"``.
        damping: ``lam >= 0`` added to ``H``; the initial value for Levenberg-Marquardt
            (default 1.0 there, else 0.0).
        saddle_free: use ``|H|`` (exact) or follow negative curvature (CG).
        max_dense_dim: largest ``n`` for the exact mode under ``"auto"``.
        cg_tol: CG relative residual tolerance; default ``min(0.5, sqrt(||g||))`` (the forcing
            sequence of scipy's Newton-CG, for superlinear convergence).
        cg_max_iters: CG iteration budget per step (default ``10 n``, the solver's default).
        c1, c2, max_evals: strong Wolfe constants and budget (line search).
        max_radius, eta: trust-region cap and acceptance threshold.
        tolerance_grad: the step does nothing once ``max|g| <= tolerance_grad``.

    Example:
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = Newton([x])
        >>> def closure():
        ...     opt.zero_grad(); loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward(); return loss
        >>> for _ in range(30): _ = opt.step(closure)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True
    """

    _shared = (
        "mode",
        "step_rule",
        "damping",
        "saddle_free",
        "max_dense_dim",
        "cg_tol",
        "cg_max_iters",
        "c1",
        "c2",
        "max_evals",
        "max_radius",
        "eta",
        "tolerance_grad",
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        mode: str = "auto",
        step_rule: str = "line_search",
        damping: float | None = None,
        saddle_free: bool = False,
        max_dense_dim: int = 1000,
        cg_tol: float | None = None,
        cg_max_iters: int | None = None,
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evals: int = 25,
        max_radius: float = 1e8,
        eta: float = 0.15,
        tolerance_grad: float = 0.0,
    ):
        if damping is None:
            damping = 1.0 if step_rule == "levenberg_marquardt" else 0.0
        defaults = dict(
            lr=lr,
            mode=mode,
            step_rule=step_rule,
            damping=damping,
            saddle_free=saddle_free,
            max_dense_dim=max_dense_dim,
            cg_tol=cg_tol,
            cg_max_iters=cg_max_iters,
            c1=c1,
            c2=c2,
            max_evals=max_evals,
            max_radius=max_radius,
            eta=eta,
            tolerance_grad=tolerance_grad,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_choice(group["mode"], "mode", _MODES)
        rule = check_choice(group["step_rule"], "step_rule", _RULES)
        check_nonnegative(group["damping"], "damping")
        if rule == "levenberg_marquardt" and group["damping"] <= 0:
            raise ValueError(
                f"Invalid damping={group['damping']!r}; step_rule='levenberg_marquardt' needs "
                "damping > 0 (its initial value)."
            )
        check_int(group["max_dense_dim"], "max_dense_dim", minimum=0)
        if group["cg_tol"] is not None:
            check_positive(group["cg_tol"], "cg_tol")
        if group["cg_max_iters"] is not None:
            check_int(group["cg_max_iters"], "cg_max_iters")
        c1, c2 = group["c1"], group["c2"]
        check_positive(c1, "c1")
        check_positive(c2, "c2")
        if not c1 < c2 < 1.0:
            raise ValueError(f"Invalid c1={c1!r}, c2={c2!r}; strong Wolfe needs 0 < c1 < c2 < 1.")
        check_int(group["max_evals"], "max_evals")
        check_positive(group["max_radius"], "max_radius")
        eta = group["eta"]
        if not isinstance(eta, (int, float)) or not 0.0 <= eta < 0.25:
            raise ValueError(f"Invalid eta={eta!r}; must lie in [0, 0.25).")
        check_nonnegative(group["tolerance_grad"], "tolerance_grad")
        if rule == "trust_region" and group["lr"] > group["max_radius"]:
            raise ValueError(
                f"Invalid lr={group['lr']!r}; the initial radius must be <= "
                f"max_radius={group['max_radius']!r}."
            )

    # -- curvature -------------------------------------------------------------------------
    def _dense_mode(self) -> bool:
        mode = self._hp("mode")
        return mode == "exact" or (mode == "auto" and self._vec.n <= self._hp("max_dense_dim"))

    def _dense_hessian(self, op: GradHVPOperator) -> Tensor:
        n = self._vec.n
        eye = torch.eye(n, dtype=self._vec.dtype, device=self._vec.device)
        H = op.matmat(eye)
        check_finite(H, "the Hessian at the current parameters (curvature products)")
        return 0.5 * (H + H.T)

    def _cg_tol(self, g: Tensor) -> float:
        tol = self._hp("cg_tol")
        if tol is None:
            gn = float(g.norm())
            tol = min(0.5, math.sqrt(gn))
        return max(tol, 1e-12)

    def _exact_direction(self, H: Tensor, g: Tensor, damping: float) -> Tensor:
        n = H.shape[0]
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        if self._hp("saddle_free"):
            lam, Q = torch.linalg.eigh(H)
            floor = max(damping, 1e-12 * max(1.0, float(lam.abs().max())))
            return -(Q @ ((Q.T @ g) / lam.abs().clamp_min(floor)))
        A = H + damping * eye if damping > 0 else H
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
        # Hessian modification: A + tau I (N&W Algorithm 3.3)
        beta = 1e-3 * max(1.0, float(A.diagonal().abs().max()))
        tau = max(0.0, -float(A.diagonal().min())) + beta
        for _ in range(60):
            L, info = torch.linalg.cholesky_ex(A + tau * eye)
            if int(info) == 0:
                self._st["modified"] = self._st.get("modified", 0) + 1
                return -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            tau = max(2.0 * tau, beta)
        return -g

    def _cg_direction(self, op: GradHVPOperator, g: Tensor, damping: float) -> Tensor:
        res = cg_solve(
            op,
            -g,
            damping=damping,
            tol=self._cg_tol(g),
            max_iters=self._hp("cg_max_iters"),
            on_negative_curvature="stop",
        )
        d = res.solution
        if res.status == "negative_curvature":
            if self._hp("saddle_free") and res.direction is not None:
                p = res.direction
                if float(g.dot(p)) > 0:
                    p = -p
                curv = abs(float(res.curvature)) if res.curvature is not None else 0.0
                pn = float(p.norm())
                if pn > 0 and math.isfinite(curv) and curv > 0:
                    d = d + p * (float(g.norm()) / (curv * pn))
            if float(d.norm()) == 0.0:  # first CG direction (-g) has curvature <= 0
                curv = abs(float(res.curvature)) if res.curvature is not None else 0.0
                d = -g / curv if math.isfinite(curv) and curv > 0 else -g
        return d

    # -- iteration -------------------------------------------------------------------------
    def _iterate(self, closure: Callable[[], Any]) -> Tensor:
        st = self._st
        cache, self._graph_cache = getattr(self, "_graph_cache", None), None
        owner, self._closure_owner = getattr(self, "_closure_owner", None), closure
        if cache is not None and owner is closure and cache[0] == self._vec.versions():
            _, ev, g = cache  # the accepted trial point of the last step, graph included
            if not bool(torch.isfinite(g).all()):
                ev, g = self._evaluate(closure, create_graph=True, first=True)
        else:
            ev, g = self._evaluate(closure, create_graph=True, first=True)
        x = self._vec.get()
        loss, f = ev.loss, ev.f
        tol = self._hp("tolerance_grad")
        if tol > 0 and float(g.abs().max()) <= tol:
            return loss
        op = GradHVPOperator.from_evaluation(self._vec, ev)
        rule = self._hp("step_rule")
        damping = float(st.get("lam", self._hp("damping")))
        dense = self._dense_mode()
        H = self._dense_hessian(op) if dense else None
        if rule == "trust_region":
            self._trust_region_step(closure, x, f, g, op, H, damping)
        elif rule == "levenberg_marquardt":
            self._lm_step(closure, x, f, g, op, H, damping)
        else:
            if dense:
                d = self._exact_direction(H, g, damping)
            else:
                d = self._cg_direction(op, g, damping)
            self._line_step(closure, x, f, g, d, rule)
        st["hvps"] += op.num_matvecs
        return loss

    def _restart(self, x: Tensor) -> None:
        self._vec.set_(x)
        self._st["restarts"] += 1

    def _line_step(
        self, closure: Callable[[], Any], x: Tensor, f: float, g: Tensor, d: Tensor, rule: str
    ) -> None:
        scale = self._scale()
        if isinstance(scale, Tensor):
            d, lr = d * scale, 1.0
        else:
            lr = scale
        dphi0 = float(g.dot(d))
        if not math.isfinite(dphi0) or dphi0 >= 0:
            d = -g * scale if isinstance(scale, Tensor) else -g
            dphi0 = float(g.dot(d))
        if rule == "fixed":
            self._vec.set_(torch.add(x, d, alpha=lr))
            ev, g_new = self._evaluate(closure, create_graph=True)
            if not math.isfinite(ev.f):
                self._restart(x)
            else:
                self._keep_graph(ev, g_new)
            return
        self._last_trial = None
        res = strong_wolfe(
            self._phi(closure, x, d, create_graph=True),
            f,
            dphi0,
            lr,
            c1=self._hp("c1"),
            c2=self._hp("c2"),
            max_evals=self._hp("max_evals"),
        )
        if res.alpha == 0.0:
            self._restart(x)
            return
        last = self._last_trial
        self._last_trial = None
        if last is not None and last[0] == res.alpha:
            self._keep_graph(last[1], last[2])  # parameters are already at x + alpha d
        else:
            self._vec.set_(torch.add(x, d, alpha=res.alpha))

    def _keep_graph(self, ev, g: Tensor) -> None:
        """Reuse this evaluation (and its graph) at the start of the next step."""
        self._graph_cache = (self._vec.versions(), ev, g)

    def _model_decrease(self, g: Tensor, p: Tensor, op: GradHVPOperator, H: Tensor | None):
        Hp = H @ p if H is not None else op.matvec(p)
        return -float(g.dot(p) + 0.5 * p.dot(Hp))

    def _trust_region_step(self, closure, x, f, g, op, H, damping) -> None:
        st = self._st
        radius = float(st.setdefault("radius", float(self._hp("lr"))))
        if H is not None:
            B = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            p, pred, _ = solve_dense_subproblem(B, g, radius)
        else:
            res = cg_solve(
                op, -g, damping=damping, tol=self._cg_tol(g), radius=radius,
                max_iters=self._hp("cg_max_iters"),
            )  # fmt: skip
            p = res.solution
            pred = self._model_decrease(g, p, op, None) - 0.5 * damping * float(p.dot(p))
        pnorm = float(p.norm())
        self._vec.set_(x + p)
        ev, g_new = self._evaluate(closure, create_graph=True)
        rho = (f - ev.f) / pred if pred > 0 and math.isfinite(ev.f) else -math.inf
        if not rho > self._hp("eta"):
            self._vec.set_(x)
        else:
            self._keep_graph(ev, g_new)
        st["radius"] = update_radius(radius, rho, pnorm, max_radius=self._hp("max_radius"))

    def _lm_step(self, closure, x, f, g, op, H, lam) -> None:
        st = self._st
        if H is not None:
            A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                p = -torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)
            else:
                p = self._exact_direction(H, g, lam)
        else:
            p = self._cg_direction(op, g, lam)
        scale = self._scale()
        p = p * scale
        pred = self._model_decrease(g, p, op, H)
        self._vec.set_(x + p)
        ev, g_new = self._evaluate(closure, create_graph=True)
        rho = (f - ev.f) / pred if pred > 0 and math.isfinite(ev.f) else -math.inf
        if rho < 0.25:
            lam *= 1.5
        elif rho > 0.75:
            lam *= 2.0 / 3.0
        st["lam"] = lam
        if not rho > 0:
            self._restart(x)
        else:
            self._keep_graph(ev, g_new)
