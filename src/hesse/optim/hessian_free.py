"""Hessian-free optimisation (Martens 2010): truncated CG on the damped GGN or Hessian.

References:
    J. Martens (2010), Deep learning via Hessian-free optimization, ICML.
    J. Martens & I. Sutskever (2012), Training deep and recurrent networks with Hessian-free
    optimization, in *Neural Networks: Tricks of the Trade*.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive, check_probability
from ..linalg.diagonal import hutchinson_diagonal
from ..linalg.solve import cg_solve
from ._base import GGNProductOperator, GradHVPOperator, SecondOrderOptimizer
from ._closure import evaluate, loss_only

__all__ = ["HessianFree"]


def _backtrack_indices(max_iters: int, gamma: float = 1.3) -> list[int]:
    idx, j = set(), 1
    while True:
        i = math.ceil(gamma**j)
        if i > max_iters:
            break
        idx.add(i)
        j += 1
    return sorted(idx)


class HessianFree(SecondOrderOptimizer):
    """Hessian-free optimisation (Martens 2010) with Levenberg-Marquardt damping.

    Each step::

        g = grad f(x);  C = GGN (J^T H_L J) or Hessian at x     (products only, never formed)
        d = CG on (C + lam I) d = -g, warm start x0 = decay * d_prev,
            preconditioned by (diag(C) + lam)^0.75 if preconditioner="diagonal",
            stopped by Martens' relative-progress rule on phi(d) = d^T (C + lam I) d / 2 + g^T d
        CG backtracking: among the iterates kept at i = ceil(1.3^j) and the last one, walk back
            from the last while f(x + d_i) keeps decreasing
        rho = (f(x + d) - f(x)) / (g^T d + d^T C d / 2);
            lam *= 3/2 if rho < 1/4;  lam *= 2/3 if rho > 3/4
        t = lr, then t *= 0.8 until f(x + t d) <= f(x) + c1 t g^T d (Armijo; t = 0 after
            max_backtracks);  x += t d;  d_prev = d

    **Curvature and outputs.** The GGN (default) needs the model outputs: the closure returns
    ``(loss, outputs)`` instead of ``loss`` (the only way outputs are passed, see
    :mod:`hesse.optim`); the loss Hessian in output space comes from autograd, so any loss
    works, and terms that do not go through ``outputs`` (explicit regularisers) are left to the
    damping. ``curvature="hessian"`` needs no outputs (CG then stops at negative curvature).

    **Mini-batch curvature.** ``step(closure, curvature_closure=cb)`` evaluates the gradient
    with ``closure`` (e.g. a large batch) and the curvature with ``cb`` (same contract, e.g. a
    smaller batch), as Martens does.

    Cost per step: one graph evaluation (plus one of ``curvature_closure``), up to
    ``cg_max_iters`` curvature products (each about 2 gradients), ``num_probes`` products for
    the preconditioner, and a few forward-only loss evaluations for backtracking (the
    closure runs under ``no_grad`` with ``backward()`` a no-op; counted in ``func_evals``).

    Args:
        params: parameters or parameter groups.
        lr: first step of the final Armijo backtracking (1.0 as Martens).
        curvature: ``"ggn"`` or ``"hessian"``.
        damping: initial Levenberg-Marquardt ``lam > 0``.
        adapt_damping: adapt ``lam`` from ``rho``; with ``False`` it stays fixed.
        cg_max_iters: CG budget per step.
        cg_tol: relative residual tolerance for CG (usually the progress rule stops it first).
        progress_tol: ``epsilon`` of the relative-progress rule (0 disables it).
        warm_start_decay: ``x0 = decay * d_prev`` (0 disables warm starts).
        preconditioner: ``None`` or ``"diagonal"`` (Hutchinson estimate of ``diag(C)``).
        num_probes: probes for the diagonal estimate.
        backtrack: CG-iterate backtracking on or off.
        max_backtracks: Armijo halvings (factor 0.8) before the step is rejected.
        c1: Armijo constant.
        generator: for the preconditioner's probes (default: a private generator seeded 0);
            its state is part of ``state_dict``.

    References:
        Martens (2010), Sections 4.1-4.8.
    """

    _shared = (
        "curvature",
        "damping",
        "adapt_damping",
        "cg_max_iters",
        "cg_tol",
        "progress_tol",
        "warm_start_decay",
        "preconditioner",
        "num_probes",
        "backtrack",
        "max_backtracks",
        "c1",
    )

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        adapt_damping: bool = True,
        cg_max_iters: int = 250,
        cg_tol: float = 1e-10,
        progress_tol: float = 5e-4,
        warm_start_decay: float = 0.95,
        preconditioner: str | None = None,
        num_probes: int = 10,
        backtrack: bool = True,
        max_backtracks: int = 30,
        c1: float = 1e-2,
        generator: torch.Generator | None = None,
    ):
        defaults = dict(
            lr=lr,
            curvature=curvature,
            damping=damping,
            adapt_damping=adapt_damping,
            cg_max_iters=cg_max_iters,
            cg_tol=cg_tol,
            progress_tol=progress_tol,
            warm_start_decay=warm_start_decay,
            preconditioner=preconditioner,
            num_probes=num_probes,
            backtrack=backtrack,
            max_backtracks=max_backtracks,
            c1=c1,
        )
        super().__init__(params, defaults)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        if generator is None:
            generator = torch.Generator(device=self._vec.device).manual_seed(0)
        self.generator = generator

    def _validate(self, group: dict[str, Any]) -> None:
        check_choice(group["curvature"], "curvature", ("ggn", "hessian"))
        check_positive(group["damping"], "damping")
        check_int(group["cg_max_iters"], "cg_max_iters")
        check_positive(group["cg_tol"], "cg_tol")
        check_positive(group["progress_tol"], "progress_tol", strict=False)
        d = group["warm_start_decay"]
        if not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"Invalid warm_start_decay={d!r}; must lie in [0, 1].")
        if group["preconditioner"] is not None:
            check_choice(group["preconditioner"], "preconditioner", ("diagonal",))
        check_int(group["num_probes"], "num_probes")
        check_int(group["max_backtracks"], "max_backtracks", minimum=0)
        check_probability(group["c1"], "c1")

    def _curvature_operator(self, ev):
        if self._hp("curvature") == "hessian":
            return GradHVPOperator.from_evaluation(self._vec, ev)
        if ev.outputs is None:
            raise ValueError(
                "HessianFree(curvature='ggn') needs the model outputs: return (loss, outputs) "
                "from the closure (e.g. out = model(X); loss = loss_fn(out, y); "
                "loss.backward(); return loss, out), or use curvature='hessian'."
            )
        return GGNProductOperator(self._vec, ev.graph_loss, ev.outputs)

    def _iterate(
        self, closure: Callable[[], Any], *, curvature_closure: Callable[[], Any] | None = None
    ) -> Tensor:
        st = self._st
        hess = self._hp("curvature") == "hessian"
        if curvature_closure is None:
            ev, g = self._graph_evaluate(closure, hess)
            cev = ev
        else:
            ev, g = self._evaluate(closure, first=True)
            cev, _ = self._graph_evaluate(curvature_closure, hess)
        x = self._vec.get()
        loss, f = ev.loss, ev.f
        op = self._curvature_operator(cev)
        lam = float(st.get("lam", self._hp("damping")))
        self._solve(op, g, lam)  # products end here: the graph dies when x moves
        st["hvps"] += op.num_matvecs
        d, f_d, q = self._backtrack(closure, x, f)
        rho = (f_d - f) / q if q < 0 and math.isfinite(f_d) else -math.inf
        if self._hp("adapt_damping"):
            if rho < 0.25:
                lam *= 1.5
            elif rho > 0.75:
                lam *= 2.0 / 3.0
            st["lam"] = lam
        st["rho"] = rho
        st["prev_dir"] = d
        self._armijo(closure, x, f, g, d, f_d)
        return loss

    def _graph_evaluate(self, closure, hess: bool):
        """Evaluate keeping the graph: the gradient's (Hessian) or the forward one (GGN)."""
        if hess:
            return self._evaluate(closure, create_graph=True, first=True)
        ev = evaluate(closure, self._vec.params, retain_graph=True, require_finite=True)
        st = self._st
        st["func_evals"] += 1
        st["grad_evals"] += 1
        return ev, self._vec.flatten(ev.grads)

    def _solve(self, op, g: Tensor, lam: float) -> None:
        st = self._st
        max_iters = self._hp("cg_max_iters")
        prev = st.get("prev_dir")
        decay = self._hp("warm_start_decay")
        x0 = prev * decay if prev is not None and decay > 0 else None
        pre = None
        if self._hp("preconditioner") == "diagonal":
            gen = self.generator
            if "rng_state" in st:  # resume the probe stream exactly (state_dict round trip)
                gen.set_state(torch.frombuffer(bytearray(st["rng_state"]), dtype=torch.uint8))
            diag = hutchinson_diagonal(
                op, num_matvecs=self._hp("num_probes"), generator=gen
            ).estimate
            st["rng_state"] = bytes(gen.get_state().tolist())  # bytes: not cast on load
            pre = (diag.abs() + lam) ** 0.75
        eps = self._hp("progress_tol")
        values: list[float] = []

        def progress(state) -> bool:
            v = float(state.model_value)
            values.append(v)
            i = len(values)
            k = max(10, int(0.1 * i))
            if eps > 0 and i > k and v < 0:
                return (v - values[i - 1 - k]) / v < k * eps
            return False

        keep = _backtrack_indices(max_iters) if self._hp("backtrack") else None
        res = cg_solve(
            op,
            -g,
            damping=lam,
            preconditioner=pre,
            x0=x0,
            tol=self._hp("cg_tol"),
            max_iters=max_iters,
            on_negative_curvature="stop",
            callback=progress,
            return_iterates=keep,
        )
        st["cg_iters"] = res.num_iters
        iterates = dict(res.iterates or {})
        iterates[res.num_iters] = res.solution
        cands = []  # (p, q(p) = g^T p + p^T C p / 2), q from CG's model values (no products)
        for i in sorted(iterates):
            p = iterates[i]
            if not bool(torch.isfinite(p).all()) or float(p.norm()) == 0.0:
                continue
            if 1 <= i <= len(values):
                q = values[i - 1] - 0.5 * lam * float(p.dot(p))
            else:
                q = float(g.dot(p) + 0.5 * p.dot(op.matvec(p)))
            cands.append((p, q))
        if not cands:
            p = -g
            cands = [(p, float(g.dot(p) + 0.5 * p.dot(op.matvec(p))))]
        self._cands = cands

    def _backtrack(self, closure, x: Tensor, f: float) -> tuple[Tensor, float, float]:
        cands = self._cands
        best, q_best = cands[-1]
        f_best = self._loss_at(closure, x, best)
        if self._hp("backtrack"):
            for p, q in reversed(cands[:-1]):
                fp = self._loss_at(closure, x, p)
                if fp < f_best:
                    best, f_best, q_best = p, fp, q
                else:
                    break
        return best, f_best, q_best

    def _loss_at(self, closure, x: Tensor, p: Tensor) -> float:
        """Loss at ``x + p``: one forward pass (``backward()`` is a no-op; no gradient)."""
        self._vec.set_(x + p)
        self._st["func_evals"] += 1
        return loss_only(closure)

    def _armijo(self, closure, x: Tensor, f: float, g: Tensor, d: Tensor, f_d: float) -> None:
        scale = self._scale()
        per_group = isinstance(scale, Tensor)
        if per_group:
            d, t = d * scale, 1.0
        else:
            t = scale
        slope = float(g.dot(d))
        c1 = self._hp("c1")
        # f(x + d) is known from the backtracking when the first trial is the full step
        fv = f_d if t == 1.0 and not per_group else self._loss_at(closure, x, t * d)
        for _ in range(self._hp("max_backtracks")):
            if math.isfinite(fv) and fv <= f + c1 * t * min(slope, 0.0):
                self._vec.set_(x + t * d)
                return
            t *= 0.8
            fv = self._loss_at(closure, x, t * d)
        if math.isfinite(fv) and fv <= f + c1 * t * min(slope, 0.0):
            self._vec.set_(x + t * d)
            return
        self._vec.set_(x)
        self._st["restarts"] += 1
        self._st.pop("prev_dir", None)
