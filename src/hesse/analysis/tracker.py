"""Watch the sharpness while training: lambda_max, the edge-of-stability ratio, saddles.

Gradient descent with step ``eta`` is stable on the local quadratic model only while
``eta * lambda_max < 2`` ("the speed limit"). Cohen et al. (2021) found that full-batch GD
drives ``lambda_max`` up until it reaches ``2 / eta`` and then hovers there ("edge of
stability"). :class:`SharpnessTracker` measures this cheaply during training: the curvature
operator is built once on a fixed measurement batch (its cached graph is rebuilt automatically
after each optimizer step), and every check warm-starts Lanczos from the previous top
eigenvector, so a check after the first costs a few Hessian-vector products.

References:
    Cohen, Kaur, Li, Kolter, Talwalkar. Gradient Descent on Neural Networks Typically Occurs at
    the Edge of Stability. ICLR 2021.
    Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl, Gilmer.
    Adaptive Gradient Methods at the Edge of Stability. arXiv:2207.14484, 2022.
"""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, check_positive, warn_once
from ..func import GradGraph
from ..objective import math_attention
from ..operators.base import LinearOperator
from ..operators.curvature import HessianOperator
from ..operators.factory import CURVATURES, curvature_operator

__all__ = [
    "EdgeOfStabilityWarning",
    "SharpnessRecord",
    "SharpnessTracker",
    "adam_preconditioner",
    "lightning_callback",
]


class EdgeOfStabilityWarning(UserWarning):
    """The step size crossed the stability limit ``2 / lambda_max`` (ratio >= 1)."""


@dataclass(frozen=True)
class SharpnessRecord:
    """One sharpness check.

    Attributes:
        step: optimizer steps taken when the check ran (the tracker's step count).
        lambda_max: top eigenvalue of the curvature on the measurement batch.
        ratio: ``lr * lambda_max / 2`` (the edge-of-stability ratio; 1 is the limit), or
            ``None`` if no learning rate is known.
        lr: the learning rate used for ``ratio`` (``None`` if unknown).
        converged: the Lanczos run met ``tol``.
        num_matvecs: curvature products this check used (all eigenvalue runs together).
        loss: loss on the measurement batch (``None`` if ``record_loss=False``).
        layer_lambda_max: per-layer ``lambda_max`` of the diagonal blocks (``per_layer=True``).
        precond_lambda_max: ``lambda_max(P^{-1} H)`` for an adaptive optimizer.
        precond_ratio: ``lr * precond_lambda_max / threshold`` with the optimizer's
            stability threshold (``2`` for RMSprop/Adagrad, ``(2 + 2 beta1) / (1 - beta1)``
            for Adam).
        lambda_min: smallest eigenvalue (``track_lambda_min=True``); negative means the
            parameters are near a saddle or a non-convex region.
        seconds: wall time of the check.
        error_bound: the eigenvalue run's bound on ``|lambda_max - lambda|`` (see
            :func:`hesse.top_eigenpairs`; ``<= tol * |lambda_max|`` when converged).
    """

    step: int
    lambda_max: float
    ratio: float | None
    lr: float | None
    converged: bool
    num_matvecs: int
    loss: float | None = None
    layer_lambda_max: dict[str, float] | None = None
    precond_lambda_max: float | None = None
    precond_ratio: float | None = None
    lambda_min: float | None = None
    seconds: float = 0.0
    error_bound: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Flat ``name -> number`` dict (per-layer values as ``lambda_max/<layer>``)."""
        d = asdict(self)
        layers = d.pop("layer_lambda_max") or {}
        for name, v in layers.items():
            d[f"lambda_max/{name}"] = v
        return d


class _SymmetricScaled(LinearOperator):
    """``D A D`` with ``D = diag(d)``: same eigenvalues as ``D^2 A`` (``P^{-1} H``)."""

    def __init__(self, A: LinearOperator, d: Tensor):
        super().__init__(A.shape, A.dtype, A.device, symmetric=True, psd=A.psd)
        self.A, self.d = A, d.unsqueeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.d * self.A._matmat(self.d * V)


def adam_preconditioner(
    optimizer: torch.optim.Optimizer, params: list[Tensor]
) -> tuple[Tensor, float, float] | None:
    """Diagonal preconditioner ``P``, learning rate and stability threshold of an adaptive
    optimizer, read from its state (``None`` before its first step).

    For Adam/AdamW (``theta <- theta - lr * P^{-1} m`` with the gradient EMA ``m``):

    .. math::
        P = (1 - \\beta_1^t)\\,\\operatorname{diag}(\\sqrt{\\hat v_t} + \\epsilon), \\qquad
        \\text{stable iff}\\ \\lambda_{\\max}(P^{-1} H) < \\frac{2 + 2\\beta_1}{(1-\\beta_1)\\,
        \\eta},

    i.e. the threshold factor is ``(2 + 2 beta1) / (1 - beta1)`` (38 for ``beta1 = 0.9``;
    Cohen et al., 2022). For RMSprop (no momentum) ``P = diag(sqrt(v) + eps)`` and Adagrad
    ``P = diag(sqrt(sum g^2) + eps)``, threshold factor 2. Multiple param groups must share
    one learning rate.

    Returns:
        ``(P_diag (n,), lr, threshold_factor)`` in the order of ``params``, or ``None`` when a
        parameter has no state yet.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    lrs = {float(groups[id(p)]["lr"]) for p in params if id(p) in groups}
    if len(lrs) != 1:
        raise ValueError(
            "Preconditioned sharpness needs every tracked parameter in the optimizer with one "
            f"common learning rate; found learning rates {sorted(lrs)}."
        )
    lr = lrs.pop()
    name = type(optimizer).__name__.lower()
    parts = []
    factor = 2.0
    for p in params:
        st = optimizer.state.get(p, {})
        g = groups[id(p)]
        eps = float(g.get("eps", 1e-8))
        if name in ("adam", "adamw"):
            if "exp_avg_sq" not in st:
                return None
            b1, b2 = g["betas"]
            t = float(st["step"])
            v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
            v_hat = v / (1 - b2**t)
            parts.append(((1 - b1**t) * (v_hat.sqrt() + eps)).reshape(-1))
            factor = (2 + 2 * b1) / (1 - b1)
        elif name == "rmsprop":
            if "square_avg" not in st:
                return None
            if g.get("momentum", 0) or g.get("centered", False):
                raise NotImplementedError(
                    "Preconditioned sharpness for RMSprop supports momentum=0, centered=False."
                )
            parts.append((st["square_avg"].sqrt() + eps).reshape(-1))
        elif name == "adagrad":
            if "sum" not in st:
                return None
            parts.append((st["sum"].sqrt() + float(g.get("eps", 1e-10))).reshape(-1))
        else:
            raise NotImplementedError(
                f"No preconditioner known for {type(optimizer).__name__}; pass "
                "preconditioner=callable returning (P_diag, lr, threshold_factor)."
            )
    return torch.cat(parts).detach(), lr, factor


_ADAPTIVE = ("adam", "adamw", "rmsprop", "adagrad")


# The gap-refined estimate r^2 / gap needs a few Ritz values to see the gap: with two, on
# the tests' MLP, it certified errors of 2.3x tol (the residual bound r is used until then).
_MIN_GAP_STEPS = 3


def _warm_start(
    op: LinearOperator,
    v0: Tensor,
    tol: float,
    sign: float = 1.0,
    max_steps: int = 8,
    matvec: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, Tensor, int, float, bool]:
    """Lanczos from ``v0`` (at most ``max_steps`` products) with a lean stopping test.

    For the largest eigenvalue of ``sign * op``, after every product ``j``: the Ritz pairs of
    ``span{v0, A v0, ...}`` (full reorthogonalisation, the projected ``j x j`` matrix from
    the stored products) and the true residuals ``r`` of the top two (from the stored
    products). Stop when the error bound ``min(r, r^2 / gap) <= tol |theta|`` and the next
    Ritz value's interval ``theta_2 +- r_2`` is clear of ``theta`` minus the bound: the rule
    of :func:`hesse.top_eigenpairs` (``k = 1``, ``criterion="eigenvalue"``, floored at
    ``50 eps |theta|``), with a more cautious ``gap`` measured to the top of that interval
    (``theta - theta_2 - r_2``) rather than to ``theta_2``. ``r`` alone is rigorous (an
    eigenvalue lies within ``r`` of ``theta``); ``r^2 / gap`` is the standard estimate and
    can be optimistic while the Ritz gap overstates the true one (from poor starts; the
    tracker starts from the previous check's top eigenvector). Like any Krylov method it
    cannot see a direction the start vector lacks. A few tensor ops per product instead of
    ~1 ms of general Lanczos bookkeeping on a small model. ``matvec`` (default
    ``op.matvec``) computes the products.

    Returns:
        ``(eigenvalue of op, unit Ritz vector, products, error bound, certified)``; when not
        certified, the best Ritz vector to continue from.
    """
    matvec = op.matvec if matvec is None else matvec
    rtol = max(tol, 50 * torch.finfo(op.dtype).eps)
    n = op.shape[0]
    V = torch.empty((n, max_steps), dtype=op.dtype, device=op.device)
    W = torch.empty_like(V)
    q = v0 / torch.linalg.vector_norm(v0)
    for j in range(1, min(max_steps, n) + 1):
        V[:, j - 1] = q
        W[:, j - 1] = sign * matvec(q)
        Vj, Wj = V[:, :j], W[:, :j]
        T = Vj.T @ Wj
        theta, Y = torch.linalg.eigh(0.5 * (T + T.T))  # ascending
        top = Y[:, -2:] if j > 1 else Y
        R = Wj @ top - (Vj @ top) * theta[-top.shape[1] :]
        res = torch.linalg.vector_norm(R, dim=0)
        vals = torch.cat([theta[-top.shape[1] :], res]).tolist()
        hi, r_hi = vals[top.shape[1] - 1], vals[-1]
        bound = r_hi
        if j > 1:
            lo, r_lo = vals[0], vals[2]
            gap = hi - (lo + r_lo)
            if gap > 0 and j >= _MIN_GAP_STEPS:
                bound = min(r_hi, r_hi * r_hi / gap)
        ok = bound <= rtol * abs(hi) and (j == 1 or lo + r_lo < hi - bound)
        if ok or j == min(max_steps, n):
            u = Vj @ Y[:, -1]
            return sign * hi, u / torch.linalg.vector_norm(u), j, bound, ok
        r = Wj[:, -1] - Vj @ (Vj.T @ Wj[:, -1])  # next direction, twice orthogonalised
        r = r - Vj @ (Vj.T @ r)
        nr = torch.linalg.vector_norm(r)
        if float(nr) == 0.0:  # invariant subspace: the Ritz pair is exact
            u = Vj @ Y[:, -1]
            return sign * hi, u / torch.linalg.vector_norm(u), j, 0.0, True
        q = r / nr
    raise AssertionError("unreachable")  # pragma: no cover


class SharpnessTracker:
    """Measure ``lambda_max`` every ``every`` optimizer steps, warm-started; log the
    edge-of-stability ratio ``lr * lambda_max / 2``.

    Use in a plain loop::

        tracker = hesse.SharpnessTracker(model, loss_fn, (X_fixed, y_fixed), every=10,
                                         optimizer=opt)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
            tracker.step()
        tracker.to_csv("sharpness.csv"); tracker.plot("sharpness.png")

    Full-batch training on the measurement batch can let the checks share the training
    step's graph (no rebuild; see :meth:`backward`)::

        for _ in range(steps):
            opt.zero_grad(); tracker.backward(); opt.step(); tracker.step()

    The first check runs :func:`hesse.top_eigenpairs` (Lanczos) on the curvature of the fixed
    measurement batch; later ones a lean Lanczos started from the previous top eigenvector
    (certified by the residual bound, or the gap-refined estimate once three Ritz values
    show the gap; it falls back to :func:`hesse.top_eigenpairs`), typically 3 products.
    Each record carries its ``error_bound`` and ``converged``. With ``per_layer=True`` the
    top eigenvalue of each layer's diagonal block is measured too (warm-started per layer);
    with an adaptive optimizer (Adam/AdamW/RMSprop/Adagrad) the preconditioned sharpness
    ``lambda_max(P^{-1} H)`` and its ratio to the optimizer's stability threshold (see
    :func:`adam_preconditioner`). An :class:`EdgeOfStabilityWarning` is issued whenever the
    ratio crosses 1 from below.

    Args:
        model, loss_fn: the model and loss being trained.
        data: the fixed measurement batch ``(X, y)`` (or a fixed list of batches). Keep it
            small enough that a Hessian-vector product is cheap relative to ``every`` steps.
        every: check every ``every`` calls of :meth:`step`.
        lr: learning rate for the ratio; a float, a callable returning it, or ``None`` to read
            ``optimizer.param_groups[0]["lr"]`` (ratio ``None`` if neither is given).
        per_layer: also measure each layer's diagonal block.
        optimizer: the training optimizer (for ``lr`` and the preconditioned sharpness).
        preconditioned: ``"auto"`` (when ``optimizer`` is adaptive), ``True``, ``False``, or a
            callable ``() -> (P_diag, lr, threshold_factor)``.
        curvature: a name of :func:`hesse.curvature_operator` (``"hessian"``, default;
            ``"ggn"``, ``"fisher_exact"``, ``"fisher_mc"``, ``"fisher_empirical"``);
            ``"fisher"`` means ``"fisher_exact"``.
        tol: relative eigenvalue tolerance of each check (default ``1e-3``).
        num_matvecs: product budget per eigenvalue run (default that of
            :func:`hesse.top_eigenpairs`).
        track_lambda_min: also measure the smallest eigenvalue (negative curvature / saddles).
        record_loss: record the measurement-batch loss (one forward pass per check).
        warn: issue :class:`EdgeOfStabilityWarning` on crossings.
        csv_path, json_path: rewrite these files after every check (interrupt-safe logs).
        log_dir: write TensorBoard scalars here (needs the ``tensorboard`` package); or pass
            ``writer`` (any object with ``add_scalar(tag, value, step)``).
        params: parameter subset to track.
        generator: randomness of the first Lanczos start.
        **operator_kwargs: passed to the curvature operator (``weight_decay``, ...).

    Attributes:
        history: list of :class:`SharpnessRecord`.
        operator: the curvature operator (built once).
        num_steps: calls of :meth:`step` so far.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        every: int = 10,
        lr: float | Callable[[], float] | None = None,
        per_layer: bool = False,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        preconditioned: Any = "auto",
        curvature: str = "hessian",
        tol: float = 1e-3,
        num_matvecs: int | None = None,
        track_lambda_min: bool = False,
        record_loss: bool = True,
        warn: bool = True,
        csv_path: str | Path | None = None,
        json_path: str | Path | None = None,
        log_dir: str | Path | None = None,
        writer: Any = None,
        params: Any = None,
        generator: torch.Generator | None = None,
        **operator_kwargs: Any,
    ):
        self.every = check_int(every, "every")
        if lr is not None and not callable(lr):
            lr = check_positive(lr, "lr")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        self.tol = check_positive(tol, "tol")
        self.num_matvecs_budget = (
            None if num_matvecs is None else check_int(num_matvecs, "num_matvecs")
        )
        if curvature == "fisher":  # the exact Fisher, as before the factory existed
            curvature = "fisher_exact"
        self.curvature = check_choice(curvature, "curvature", CURVATURES)
        self.operator = curvature_operator(
            self.curvature, model, loss_fn, data, params=params, **operator_kwargs
        )
        self.model, self.loss_fn = model, loss_fn
        self.lr, self.optimizer = lr, optimizer
        self.per_layer = bool(per_layer)
        self.track_lambda_min = bool(track_lambda_min)
        self.record_loss = bool(record_loss)
        self.warn = bool(warn)
        self.generator = generator
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.json_path = None if json_path is None else Path(json_path)
        self._params = list(self.operator.objective.params.values())
        self._precond_auto = preconditioned == "auto"
        self._precond = self._resolve_preconditioner(preconditioned)
        self.writer = writer
        if writer is None and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn_once(
                    "SharpnessTracker(log_dir=...): tensorboard is not installed; "
                    "no TensorBoard scalars will be written (pip install tensorboard)."
                )
            else:
                self.writer = SummaryWriter(str(log_dir))
        self._layer_ops = self.operator.layer_blocks() if self.per_layer else {}
        self.history: list[SharpnessRecord] = []
        self.num_steps = 0
        self._v: Tensor | None = None
        self._v_layers: dict[str, Tensor] = {}
        self._v_pre: Tensor | None = None
        self._v_min: Tensor | None = None
        self._above = False
        self._above_pre = False
        self._shared = False
        self._chunks: list | None = None

    # -- configuration ------------------------------------------------------------------
    def _resolve_preconditioner(self, preconditioned: Any):
        if callable(preconditioned):
            return preconditioned
        if preconditioned not in ("auto", True, False):
            raise ValueError(
                f"Invalid preconditioned={preconditioned!r}; expected 'auto', True, False or "
                "a callable returning (P_diag, lr, threshold_factor)."
            )
        if preconditioned is False:
            return None
        adaptive = self.optimizer is not None and type(self.optimizer).__name__.lower() in _ADAPTIVE
        if preconditioned is True and not adaptive:
            raise ValueError(
                "preconditioned=True needs an adaptive optimizer (Adam, AdamW, RMSprop, "
                "Adagrad) passed as optimizer=..., or a callable."
            )
        if not adaptive:
            return None
        opt, params = self.optimizer, self._params
        return lambda: adam_preconditioner(opt, params)

    def current_lr(self) -> float | None:
        """The learning rate the ratio uses now (``None`` if unknown)."""
        if callable(self.lr):
            return float(self.lr())
        if self.lr is not None:
            return float(self.lr)
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return None

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> SharpnessRecord | None:
        """Count one optimizer step; run a check every ``every`` steps.

        After :meth:`backward` has been used, the checks run inside :meth:`backward` and
        this only counts.

        Returns:
            The new :class:`SharpnessRecord` if a check ran, else ``None``.
        """
        self.num_steps += 1
        if not self._shared and self.num_steps % self.every == 0:
            return self.measure()
        return None

    def _shareable(self) -> bool:
        """The training gradient on the measurement batch is the graph a check needs: exact
        Hessian by a cached double backward, one chunk, no mode-dependent layers."""
        op = self.operator
        ob = op.objective
        return (
            isinstance(op, HessianOperator)
            and op.mode == "rev-rev"
            and op.cache_graph
            and ob.num_batches == 1
            and ob.micro_batch_size is None
            and not ob.distributed
            and not ob._has_dropout
            and not ob._bn
        )

    def backward(self) -> Tensor:
        """Training gradient of the loss on the measurement batch, accumulated into ``.grad``
        of the model's trainable parameters; returns the (detached) loss.

        For full-batch training on the measurement batch, call it in place of
        ``loss_fn(model(X), y).backward()``; a check then shares the step's graph::

            for _ in range(steps):
                opt.zero_grad(); tracker.backward(); opt.step(); tracker.step()

        At steps ``0, every, 2 * every, ...`` (optimizer steps taken so far) the gradient is
        built with ``create_graph=True``, handed to the optimizer, and the check runs on that
        graph before the step, so a check costs its products and the difference between a
        ``create_graph`` backward and a plain one (no second forward and backward to rebuild
        the graph). The checks see the same parameters as :meth:`step`'s would (after
        ``0, every, ...`` steps); the one after the last step needs a :meth:`measure` call.

        Where the graph cannot be shared (another curvature, several chunks or batches,
        Dropout or BatchNorm, whose gradients depend on the mode), this is a plain backward
        over the measurement data (exact weights) and :meth:`step` runs the checks as usual.
        """
        ob = self.operator.objective
        share = self._shareable()
        self._shared = share
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        chunks = self._chunks if self._chunks is not None else list(ob.batches())
        if len(chunks) == 1:
            self._chunks = chunks  # one fixed batch (the objective checked it is the same)
        if len(chunks) == 1 and self.loss_fn is not None:
            # one batch: the user's own loss (the objective's, up to rounding), no weighting

            def loss_of(X: Any, y: Tensor, w: float) -> Tensor:
                return self.loss_fn(ob.forward(X), y)
        else:

            def loss_of(X: Any, y: Tensor, w: float) -> Tensor:
                return ob.batch_loss(ob.forward(X), y, w, check=False)

        with torch.enable_grad():
            if not (share and self.num_steps % self.every == 0):
                total = None
                for X, y, w in chunks:  # exact weights over batches and chunks
                    loss = loss_of(X, y, w)
                    loss.backward()
                    total = loss.detach() if total is None else total + loss.detach()
                return total
            ((X, y, w),) = chunks
            with math_attention():
                loss = loss_of(X, y, w)
                grads = torch.autograd.grad(loss, trainable, create_graph=True, allow_unused=True)
        by_id = dict(zip(map(id, trainable), grads))
        op = self.operator
        op._cache = [GradGraph(loss, self._params, [by_id.get(id(p)) for p in self._params])]
        op._key = ob.state_key()
        self.measure()
        for p, g in zip(trainable, grads):
            if g is None:
                continue
            g = g.detach()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
        return loss.detach()

    def _eig(
        self, op: LinearOperator, v0: Tensor | None, which: str = "largest"
    ) -> tuple[float, Tensor, int, float, bool]:
        """``(eigenvalue, eigenvector, products, error bound, converged)`` of the end ``which``
        of ``op``:
        the lean warm start when it certifies, else :func:`hesse.top_eigenpairs`."""
        from ..linalg.eigen import top_eigenpairs

        used = 0
        if v0 is not None:
            sign = -1.0 if which == "smallest" else 1.0
            warm = _warm_start(op, v0, self.tol, sign, matvec=self._matvec(op))
            if warm[4]:
                return warm
            v0, used = warm[1], warm[2]  # continue from the best Ritz vector
        kw = {} if self.num_matvecs_budget is None else {"num_matvecs": self.num_matvecs_budget}
        res = top_eigenpairs(
            op, k=1, which=which, tol=self.tol, v0=v0, generator=self.generator, **kw
        )
        return (
            float(res.eigenvalues[0]),
            res.eigenvectors[:, 0],
            used + res.num_matvecs,
            float(res.error_bounds[0]),
            bool(res.converged),
        )

    def _matvec(self, op: LinearOperator) -> Callable[[Tensor], Tensor]:
        """``op.matvec``; for the tracked Hessian on one chunk, products straight on its
        cached graph (current for this check: the parameters do not change during it),
        without the operator's per-product checks (~0.2 ms each on the digits MLP)."""
        ob = getattr(op, "objective", None)
        if not (
            op is self.operator
            and isinstance(op, HessianOperator)
            and op.mode == "rev-rev"
            and op.cache_graph
            and ob.regularizer is None
            and not ob.distributed
        ):
            return op.matvec
        caches = op._batch_caches()
        if len(caches) != 1:
            return op.matvec
        graph, sizes, shapes, wd = caches[0], ob.sizes, ob.shapes, ob.weight_decay

        def matvec(v: Tensor) -> Tensor:
            op.num_matvecs += 1
            res = graph.hvp([t.view(s) for t, s in zip(v.split(sizes), shapes)])
            out = torch.cat([r.reshape(-1) for r in res])
            return out + wd * v if wd else out

        return matvec

    def measure(self) -> SharpnessRecord:
        """Run a check now (at the current step count) and append it to :attr:`history`."""
        t0 = time.perf_counter()
        op = self.operator
        lam, self._v, used, bound, converged = self._eig(op, self._v)

        layers = None
        if self._layer_ops:
            layers = {}
            for name, block in self._layer_ops.items():
                if block.shape[0] < 2:
                    v = torch.ones(1, dtype=block.dtype, device=block.device)
                    layers[name] = float(block.matvec(v)[0])
                    used += 1
                    continue
                layers[name], self._v_layers[name], m, _, ok = self._eig(
                    block, self._v_layers.get(name)
                )
                used += m
                converged &= ok

        pre_lam = pre_ratio = None
        if self._precond is not None:
            try:
                got = self._precond()
            except (ValueError, NotImplementedError) as e:
                if not self._precond_auto:
                    raise
                warn_once(f"SharpnessTracker: preconditioned sharpness disabled: {e}")
                self._precond = got = None
            if got is not None:
                P, lr_p, factor = got
                scaled = _SymmetricScaled(op, P.to(op.dtype).rsqrt())
                pre_lam, self._v_pre, m, _, ok = self._eig(scaled, self._v_pre)
                pre_ratio = lr_p * pre_lam / factor
                used += m
                converged &= ok

        lam_min = None
        if self.track_lambda_min:
            lam_min, self._v_min, m, _, ok = self._eig(op, self._v_min, which="smallest")
            used += m
            converged &= ok

        lr = self.current_lr()
        ratio = None if lr is None else lr * lam / 2.0
        loss = self._loss() if self.record_loss else None
        rec = SharpnessRecord(
            step=self.num_steps,
            lambda_max=lam,
            ratio=ratio,
            lr=lr,
            converged=converged,
            num_matvecs=used,
            loss=loss,
            layer_lambda_max=layers,
            precond_lambda_max=pre_lam,
            precond_ratio=pre_ratio,
            lambda_min=lam_min,
            seconds=time.perf_counter() - t0,
            error_bound=bound,
        )
        self.history.append(rec)
        self._check_crossing(rec)
        self._log(rec)
        return rec

    def _loss(self) -> float:
        """Measurement-batch loss; read from the Hessian's cached graphs when they are current
        (they were just built for the eigenvalue run), else one forward pass."""
        op, ob = self.operator, self.operator.objective
        cache = getattr(op, "_cache", None)
        if (
            isinstance(op, HessianOperator)
            and op.mode == "rev-rev"
            and cache
            and getattr(op, "_key", None) == ob.state_key()
            and not ob.weight_decay
            and ob.regularizer is None
            and not ob.distributed
            and all(isinstance(c, GradGraph) for c in cache)
        ):
            return float(sum(c.loss.double() for c in cache))
        return float(op.loss())

    def _check_crossing(self, rec: SharpnessRecord) -> None:
        if rec.ratio is not None:
            above = rec.ratio >= 1.0
            if above and not self._above and self.warn:
                warnings.warn(
                    f"Step {rec.step}: lr = {rec.lr:.4g} crossed the stability limit "
                    f"2 / lambda_max = {2 / rec.lambda_max:.4g} (lambda_max = "
                    f"{rec.lambda_max:.4g}, lr * lambda_max / 2 = {rec.ratio:.3f}). Gradient "
                    "descent is at the edge of stability: the loss may oscillate or spike.",
                    EdgeOfStabilityWarning,
                    stacklevel=3,
                )
            self._above = above
        if rec.precond_ratio is not None:
            above = rec.precond_ratio >= 1.0
            if above and not self._above_pre and self.warn:
                warnings.warn(
                    f"Step {rec.step}: the preconditioned sharpness lambda_max(P^-1 H) = "
                    f"{rec.precond_lambda_max:.4g} crossed the adaptive optimizer's stability "
                    f"threshold (ratio {rec.precond_ratio:.3f}).",
                    EdgeOfStabilityWarning,
                    stacklevel=3,
                )
            self._above_pre = above

    # -- output -------------------------------------------------------------------------
    def _log(self, rec: SharpnessRecord) -> None:
        if self.writer is not None:
            for key, value in rec.as_dict().items():
                if key in ("step", "converged") or value is None:
                    continue
                self.writer.add_scalar(f"sharpness/{key}", float(value), rec.step)
        if self.csv_path is not None:
            self.to_csv(self.csv_path)
        if self.json_path is not None:
            self.to_json(self.json_path)

    def records(self) -> list[dict[str, Any]]:
        """The history as a list of flat dicts (see :meth:`SharpnessRecord.as_dict`)."""
        return [r.as_dict() for r in self.history]

    def to_csv(self, path: str | Path) -> Path:
        """Write the history as CSV (one row per check; empty cells for missing values)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.records()
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys or ["step", "lambda_max", "ratio"])
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return path

    def to_json(self, path: str | Path) -> Path:
        """Write the history (and the tracker's settings) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "every": self.every,
            "curvature": self.curvature,
            "tol": self.tol,
            "per_layer": self.per_layer,
            "history": [
                {
                    k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in asdict(r).items()
                }
                for r in self.history
            ],
        }
        path.write_text(json.dumps(doc, indent=1))
        return path

    def plot(self, path: str | Path | None = None, **kwargs: Any) -> Any:
        """Plot the curves (see :func:`hesse.plot.plot_sharpness`); returns the figure."""
        from ..plot.tracking import plot_sharpness

        return plot_sharpness(self, path, **kwargs)

    def mean_matvecs_after_first(self) -> float:
        """Average curvature products per check after the first (the warm-start cost)."""
        later = [r.num_matvecs for r in self.history[1:]]
        return sum(later) / len(later) if later else float("nan")

    def lightning_callback(self) -> Any:
        """A PyTorch Lightning ``Callback`` calling :meth:`step` after every training batch."""
        return lightning_callback(self)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if any)."""
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()


def lightning_callback(tracker: SharpnessTracker) -> Any:
    """Wrap ``tracker`` as a Lightning callback (``lightning`` or ``pytorch_lightning``).

    The callback calls ``tracker.step()`` in ``on_train_batch_end`` and logs the newest
    record's numbers with ``pl_module.log`` when a check ran.

    Raises:
        ImportError: neither ``lightning`` nor ``pytorch_lightning`` is installed.
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError(
                "lightning_callback needs PyTorch Lightning (pip install lightning); in a "
                "plain loop call tracker.step() after optimizer.step()."
            ) from e

    class SharpnessCallback(Callback):
        def __init__(self, tracker: SharpnessTracker):
            super().__init__()
            self.tracker = tracker

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec = self.tracker.step()
            if rec is not None:
                for key, value in rec.as_dict().items():
                    if key != "step" and isinstance(value, (int, float)) and value is not None:
                        pl_module.log(f"sharpness/{key}", float(value))

    return SharpnessCallback(tracker)
