"""K-FAC: Kronecker-factored approximate curvature, as a preconditioner and as an optimizer.

The factor definitions, normalisation and exactness statement are in
:mod:`hesse.operators.kfac` (shared with :class:`hesse.KFACOperator`). Here they are estimated
on the fly from the training forward passes:

* ``A`` from the layer inputs recorded by forward hooks;
* ``G`` from output gradients: when ``loss_fn`` is called on the model outputs (a forward
  pre-hook on it, so the targets and their ``ignore_index`` are known), an extra backward
  pass runs on the retained graph, touching no ``.grad``: of gradients at sampled targets
  (``fisher="mc"``, the true Fisher, default), of the loss-Hessian square-root columns
  (``"exact"``) or of the gradient at the observed targets (``"empirical"``). Its scale is
  that of the batch loss (``1 / count`` of the batch's valid targets for ``"mean"``). If the
  loss is computed another way (another loss instance, a functional loss), ``"mc"`` and
  ``"exact"`` run when the backward pass reaches the model outputs, counting every output
  row as a valid target.

Both are kept as exponential running averages and inverted through eigendecompositions
every ``inverse_update_interval`` steps (in the factors' dtype, float64 if float32 fails).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import (
    NonFiniteError,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    warn_once,
)
from ..func import output_loss
from ..operators.kfac import (
    FISHER_KINDS,
    UNSUPPORTED_POLICIES,
    all_uses,
    eigen_factors,
    eigen_quadratic,
    eigen_refresh,
    eigen_solve,
    find_kfac_layers,
    nearest_kronecker,
    output_gradient_factors,
    output_residuals,
)
from ._base import STATE_TAG, check_optimizer_params, check_state_dict, params_and_model
from ._closure import closure_loss

__all__ = ["KFAC", "KFACPreconditioner"]

DAMPING_MODES = ("tikhonov", "factored")
# Levenberg-Marquardt damping adaptation (Martens & Grosse 2015, sec. 6.5): factor per step
# (omega = (20/19)^T every T steps) and the range kept.
DAMPING_OMEGA = 20.0 / 19.0
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e4


def all_finite(tensors: list[Tensor | None]) -> bool:
    """Whether every element of the tensors (``None`` skipped) is finite, with one sync."""
    peaks = [t.detach().abs().amax().double() for t in tensors if t is not None and t.numel()]
    return not peaks or bool(torch.isfinite(torch.stack(peaks)).all())


def _check_decay(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}={value!r}; must lie in [0, 1).")
    return float(value)


class KFACPreconditioner:
    """Replace each supported layer's gradient by ``(A (x) G + damping I)^{-1} grad``.

    Works under any ``torch.optim`` optimizer::

        pre = KFACPreconditioner(model, loss_fn)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for X, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(X), y)   # forward hooks record the factors
            loss.backward()
            pre.step()                    # p.grad <- preconditioned gradient
            opt.step()

    Per step::

        if step % factor_update_interval == 0:    # statistics of the last forward(s)
            A <- rho A + (1 - rho) A_batch;  G <- rho G + (1 - rho) G_batch
        if step % inverse_update_interval == 0:
            QA, dA = eigh(A);  QG, dG = eigh(G)
        tikhonov: D = (A (x) G + damping I)^{-1} grad   (exact, in the eigenbases)
        factored: D = (G + sqrt(damping)/pi I)^{-1} grad (A + pi sqrt(damping) I)^{-1}
        kl_clip:  D <- D * min(1, sqrt(kl_clip / (lr^2 <D, grad>)))
        p.grad <- D

    Args:
        model: the network; its ``Linear`` (any leading dims), ``Conv1d/2d/3d``, (dense)
            ``Embedding`` and HF ``Conv1D`` layers are preconditioned, tied weights with the
            statistics of all their uses (see :func:`hesse.operators.kfac.find_kfac_layers`).
            The model's output must be the tensor passed to ``loss_fn``.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` (its
            likelihood defines the Fisher, its ``reduction`` the scale of ``G``).
        fisher: ``"mc"`` (true Fisher, targets sampled from the model, default),
            ``"exact"`` (backpropagates all ``C`` columns of the output Hessian's square
            root: exact type-2 Fisher/GGN factors, ``C`` backward passes) or
            ``"empirical"`` (observed targets; ``loss_fn`` must be called on the model output).
        num_samples: sampled targets per input for ``"mc"``.
        damping: Tikhonov damping ``> 0`` (may be changed between steps).
        damping_mode: ``"tikhonov"`` (exact inverse of ``A (x) G + damping I``) or
            ``"factored"`` (Martens & Grosse 2015, sec. 6.3).
        factor_decay: running-average weight ``rho`` in ``[0, 1)``.
        factor_update_interval, inverse_update_interval: in steps.
        basis_update_interval: full eigendecompositions at every this many inverse updates;
            at the others the eigenbases are kept and only the eigenvalues are refreshed,
            ``d = diag(Q^T F Q)`` (the best approximation of the new factor ``F`` that is
            diagonal in the old basis; one matrix product in place of an ``eigh``).
        kl_clip: trust bound on ``lr^2 <D, grad>`` (Ba et al. 2017), or ``None``.
        lr: learning rate used by ``kl_clip`` (set it to the optimizer's).
        unsupported: parameters K-FAC cannot factor (BatchNorm, LayerNorm, RMSNorm, ...):
            ``"first_order"`` (default, alias ``"skip"``: they keep their plain gradient, one
            warning names them) or ``"raise"``.
        generator: randomness for ``"mc"`` (default: a fresh private generator).

    References:
        Martens & Grosse, ICML 2015. Grosse & Martens, ICML 2016. Ba, Grosse & Martens,
        "Distributed second-order optimization using Kronecker-factored approximations",
        ICLR 2017.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        *,
        fisher: str = "mc",
        num_samples: int = 1,
        damping: float = 1e-3,
        damping_mode: str = "tikhonov",
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        basis_update_interval: int = 1,
        kl_clip: float | None = None,
        lr: float = 1.0,
        unsupported: str = "first_order",
        generator: torch.Generator | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.loss_fn = loss_fn
        self.loss = output_loss(loss_fn)
        if self.loss.reduction not in ("mean", "sum"):
            raise ValueError(
                f"loss_fn must have reduction 'mean' or 'sum'; got {self.loss.reduction!r}."
            )
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(
                "KFACPreconditioner records the output-gradient statistics when loss_fn is "
                "called, so loss_fn must be an nn.Module (e.g. nn.CrossEntropyLoss()); got "
                f"{type(loss_fn).__name__}."
            )
        self.fisher = check_choice(fisher, "fisher", FISHER_KINDS)
        self.num_samples = check_int(num_samples, "num_samples")
        self.damping = check_positive(damping, "damping")
        self.damping_mode = check_choice(damping_mode, "damping_mode", DAMPING_MODES)
        self.factor_decay = _check_decay(factor_decay, "factor_decay")
        self.factor_update_interval = check_int(factor_update_interval, "factor_update_interval")
        self.inverse_update_interval = check_int(inverse_update_interval, "inverse_update_interval")
        self.basis_update_interval = check_int(basis_update_interval, "basis_update_interval")
        self._inverse_updates = 0
        self.kl_clip = None if kl_clip is None else check_positive(kl_clip, "kl_clip")
        self.lr = check_positive(lr, "lr")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator={generator!r}; must be a torch.Generator or None.")
        if generator is None:
            dev = (
                next(iter(model.parameters())).device
                if any(True for _ in model.parameters())
                else "cpu"
            )
            generator = torch.Generator(device=dev)
            generator.seed()
        self.generator = generator
        self._rng = generator.get_state()  # at the last completed step (see discard_pending)
        self.layers, self.skipped = find_kfac_layers(
            model, None, check_choice(unsupported, "unsupported", UNSUPPORTED_POLICIES)
        )
        self.uses = all_uses(self.layers)
        self.factored_params = {p for layer in self.layers for p in layer.params}
        named = dict(model.named_parameters())
        self._skipped_list = [named[n] for n in self.skipped]
        self.steps = 0
        # running averages (A, G) per use; eigendecompositions per layer
        self.factors: list[tuple[Tensor, Tensor] | None] = [None] * len(self.uses)
        self._eig: list[tuple | None] = [None] * len(self.layers)
        self._reset_pending()
        self._handles = [
            use.module.register_forward_hook(self._layer_hook(i)) for i, use in enumerate(self.uses)
        ]
        self._handles.append(loss_fn.register_forward_pre_hook(self._loss_hook))
        self._handles.append(loss_fn.register_forward_hook(self._loss_value_hook))
        self._handles.append(model.register_forward_hook(self._model_hook, with_kwargs=True))
        self._in_fallback = False
        # the last batch seen with gradients on: model (args, kwargs), loss targets and value
        self._batch: dict[str, Any] = {}

    # -- recording ----------------------------------------------------------------------
    def _reset_pending(self) -> None:
        L = len(self.uses)
        self._A_sum: list[Tensor | None] = [None] * L
        self._A_count = [0] * L
        self._G_sum: list[Tensor | None] = [None] * L
        self._G_count = [0] * L
        self._outputs: dict[int, list[Tensor]] = {}

    def _recording(self) -> bool:
        return torch.is_grad_enabled() and self.steps % self.factor_update_interval == 0

    def _layer_hook(self, i: int) -> Callable:
        use = self.uses[i]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self._recording():
                return
            s, m = use.a_sum(args[0])
            self._A_sum[i] = s if self._A_sum[i] is None else self._A_sum[i] + s
            self._A_count[i] += m
            if isinstance(output, Tensor) and output.requires_grad:
                self._outputs.setdefault(i, []).append(output)

        return hook

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Remember the inputs (for :meth:`batch_loss`); fallback when the loss is computed
        without ``loss_fn`` (another instance, a functional loss): at the backward pass
        through the outputs, with every output row counted as a valid target."""
        if torch.is_grad_enabled():
            self._batch = {"args": args, "kwargs": kwargs}
        f = output if isinstance(output, Tensor) else getattr(output, "logits", None)
        if not self._recording() or not self._outputs or not isinstance(f, Tensor):
            return
        if not f.requires_grad:
            return
        pending = self._outputs

        def fallback(grad: Tensor) -> None:
            if self._in_fallback or self._outputs is not pending or not pending:
                return  # loss_fn was called (statistics done), or a nested pass
            if self.fisher == "empirical":
                return  # needs the targets: step() says so if no statistics arrive
            self._in_fallback = True
            try:
                self._accumulate_g(f, None)
            finally:
                self._in_fallback = False

        f.register_hook(fallback)

    def _loss_hook(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and len(args) >= 2 and isinstance(args[0], Tensor):
            self._batch.update(shape=args[0].shape, targets=args[1])
        if not self._recording() or not self._outputs or len(args) < 2:
            return
        self._accumulate_g(args[0], args[1])

    def _loss_value_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            self._batch["loss"] = output.detach()

    @torch.no_grad()
    def batch_loss(self) -> tuple[Tensor, Tensor] | None:
        """``(loss before, loss now)`` of the last batch passed through model and ``loss_fn``
        with gradients on: the recorded loss value and ``loss_fn(model(inputs), targets)`` at
        the current parameters (one forward pass, no recording). ``None`` if that batch was
        not seen whole (the loss was computed without ``loss_fn``, or on a tensor whose size
        differs from the model output's)."""
        b = self._batch
        if not {"args", "kwargs", "targets", "loss"} <= b.keys():
            return None
        out = self.model(*b["args"], **b["kwargs"])
        f = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        if not isinstance(f, Tensor) or f.numel() != b["shape"].numel():
            return None
        return b["loss"], self.loss_fn(f.reshape(b["shape"]), b["targets"])

    @torch.no_grad()
    def quadratic(self, deltas: dict[Tensor, Tensor]) -> Tensor:
        """``sum over factored layers of delta^T (A (x) G) delta`` (undamped K-FAC curvature
        of the last inverse update) for parameter changes ``deltas`` (``{param: change}``)."""
        total = torch.zeros(())
        for layer, eig in zip(self.layers, self._eig):
            if eig is None or any(p not in deltas for p in layer.params):
                continue
            mat = layer.to_matrix([deltas[p].unsqueeze(0) for p in layer.params])
            total = total.to(mat) + eigen_quadratic(eig, mat)
        return total

    def _accumulate_g(self, f: Any, targets: Tensor | None) -> None:
        outputs, self._outputs = self._outputs, {}
        if not isinstance(f, Tensor) or not f.requires_grad:
            raise TypeError(
                "KFACPreconditioner expects loss_fn to be called on the model outputs (a "
                f"tensor with a graph, e.g. out.logits of an HF model); got {type(f).__name__}."
            )
        loss = self.loss
        if targets is None:  # every row valid
            if loss.kind == "ce":
                cd = loss.class_dim % f.ndim
                shape = f.shape[:cd] + f.shape[cd + 1 :]
                targets = torch.zeros(shape, dtype=torch.long, device=f.device)
            else:
                targets = torch.zeros_like(f.detach())
        c = 1.0
        if loss.reduction == "mean":
            c = 1.0 / loss.count(targets).to(f.dtype).clamp_min(1)
        at = loss.at(f, targets)
        R, rw = output_residuals(at, self.fisher, self.num_samples, self.generator)
        gs = output_gradient_factors(
            self.uses, outputs, f, R, rw, deterministic=self.fisher != "mc"
        )
        for i, g in gs.items():
            g = c * g
            self._G_sum[i] = g if self._G_sum[i] is None else self._G_sum[i] + g
            self._G_count[i] += 1

    # -- step ---------------------------------------------------------------------------
    @torch.no_grad()
    def update_factors(self) -> None:
        """Fold the statistics recorded since the last call into the running averages."""
        if any(a is not None for a in self._A_sum) and all(g is None for g in self._G_sum):
            raise RuntimeError(
                "KFACPreconditioner recorded layer inputs but loss_fn was never called on the "
                "model outputs since the last step: call the loss_fn passed to it (it records "
                "the output-gradient statistics), e.g. loss = loss_fn(model(X), y)."
            )
        rho = self.factor_decay
        for i in range(len(self.uses)):
            if self._A_sum[i] is None or self._G_sum[i] is None:
                continue
            A = self._A_sum[i] / self._A_count[i]
            G = self._G_sum[i] / self._G_count[i]
            old = self.factors[i]
            if old is None:
                self.factors[i] = (A, G)
            else:
                self.factors[i] = (rho * old[0] + (1 - rho) * A, rho * old[1] + (1 - rho) * G)
        self._reset_pending()

    def _layer_factors(self) -> list[list[tuple[Tensor, Tensor]] | None]:
        """Per layer the ``(L, R)`` terms of its uses (``None`` until all uses have factors)."""
        out, i = [], 0
        for layer in self.layers:
            fs = self.factors[i : i + len(layer.uses)]
            i += len(layer.uses)
            ok = all(f is not None for f in fs)
            out.append([u.term(*f) for u, f in zip(layer.uses, fs)] if ok else None)
        return out

    @torch.no_grad()
    def update_inverses(self) -> None:
        """Recompute the eigendecompositions of all factors (of the nearest Kronecker product
        of the terms of a tied weight's uses); see ``basis_update_interval``."""
        full = self._inverse_updates % self.basis_update_interval == 0
        self._inverse_updates += 1
        eig = []
        for old, t in zip(self._eig, self._layer_factors()):
            if t is None:
                eig.append(None)
            elif full or old is None:
                eig.append(eigen_factors(*nearest_kronecker(t), working_dtype=torch.float32))
            else:
                eig.append(eigen_refresh(old, *nearest_kronecker(t)))
        self._eig = eig

    @torch.no_grad()
    def precondition(self) -> Tensor | None:
        """Overwrite ``p.grad`` of every factored layer by its preconditioned gradient.

        Returns the KL-clipping scale (a 0-d tensor) or ``None``.
        """
        factored = self.damping_mode == "factored"
        todo = []
        for layer, eig in zip(self.layers, self._eig):
            params = layer.params
            if eig is None or any(p.grad is None for p in params):
                continue
            grad_mat = layer.to_matrix([p.grad.unsqueeze(0) for p in params])
            D = eigen_solve(eig, grad_mat, self.damping, factored=factored)
            todo.append((layer, D, grad_mat))
        nu = None
        if self.kl_clip is not None and todo:
            vg = sum((D * g).sum() for _, D, g in todo)
            vg = vg + sum(
                (p.grad * p.grad).sum() for p in self._skipped_params() if p.grad is not None
            )
            nu = torch.clamp((self.kl_clip / (self.lr**2 * vg.clamp_min(1e-30))).sqrt(), max=1.0)
        for layer, D, _ in todo:
            if nu is not None:
                D = D * nu
            for p, d in zip(layer.params, layer.from_matrix(D)):
                p.grad.copy_(d.reshape(p.shape))
        if nu is not None:
            for p in self._skipped_params():
                if p.grad is not None:
                    p.grad.mul_(nu)
        return nu

    def _skipped_params(self) -> list[Tensor]:
        return self._skipped_list

    def step(self) -> Tensor | None:
        """Update factors/inverses when due, then precondition the gradients in place.

        Returns the KL-clipping factor ``nu`` (0-d tensor), or ``None`` without ``kl_clip``.

        Raises:
            NonFiniteError: a gradient or a recorded statistic holds NaN/inf; the recorded
                statistics are discarded and nothing else changes (see :mod:`hesse.optim`).
        """
        self.check_finite()
        return self._step()

    def _step(self) -> Tensor | None:
        """:meth:`step` after :meth:`check_finite`."""
        if self.steps % self.factor_update_interval == 0:
            self.update_factors()
        if self.steps % self.inverse_update_interval == 0 or (
            any(e is None for e in self._eig)
            and any(e is None and f is not None for e, f in zip(self._eig, self._layer_factors()))
        ):
            self.update_inverses()
        nu = self.precondition()
        self.steps += 1
        self._rng = self.generator.get_state()
        return nu

    def check_finite(self, others: list[Tensor | None] | tuple = ()) -> None:
        """Raise :class:`~hesse.NonFiniteError` (after :meth:`discard_pending`) if a gradient
        of a factored layer, a statistic recorded since the last step or one of ``others``
        (further gradients, checked in the same pass) is not finite."""

        def finite(t: Tensor | None) -> bool:
            return t is None or bool(torch.isfinite(t).all())

        tensors = (
            [p.grad for layer in self.layers for p in layer.params]
            + self._A_sum
            + self._G_sum
            + list(others)
        )
        if all_finite(tensors):
            return
        bad = [
            layer.name or "<root>"
            for layer in self.layers
            if not all(finite(p.grad) for p in layer.params)
        ] + [
            use.name or "<root>"
            for i, use in enumerate(self.uses)  # statistics are per use (tied weights)
            if not (finite(self._A_sum[i]) and finite(self._G_sum[i]))
        ]
        self.discard_pending()
        if bad:
            raise NonFiniteError(
                f"Non-finite gradient or K-FAC statistic (NaN/inf) in layers {bad}; the "
                "statistics of this step were discarded, parameters and factors are unchanged."
            )
        t = next(t for t in others if not finite(t))
        raise NonFiniteError(
            f"Non-finite gradient of a parameter {tuple(t.shape)}; the K-FAC statistics of "
            "this step were discarded, parameters and factors are unchanged."
        )

    def discard_pending(self) -> None:
        """Forget the statistics recorded since the last step and rewind the generator."""
        self._reset_pending()
        self._batch = {}
        self.generator.set_state(self._rng)

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "factors": [None if f is None else (f[0].clone(), f[1].clone()) for f in self.factors],
            "inverse_updates": self._inverse_updates,
            "eig": [
                None if e is None else tuple(None if t is None else t.clone() for t in e)
                for e in self._eig
            ],
            "generator": self.generator.get_state(),
            "damping": self.damping,
            "lr": self.lr,
            STATE_TAG: type(self).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_dict(self, state, ("steps", "factors", "eig", "generator", "damping", "lr"))
        if len(state["factors"]) != len(self.uses) or len(state["eig"]) != len(self.layers):
            raise ValueError(
                f"State holds {len(state['factors'])} K-FAC layer uses and {len(state['eig'])} "
                f"layers, the model has {len(self.uses)} and {len(self.layers)}."
            )
        self.steps = int(state["steps"])
        self.factors = [
            None if f is None else (f[0].clone(), f[1].clone()) for f in state["factors"]
        ]
        self._eig = [
            None if e is None else tuple(None if t is None else t.clone() for t in e)
            for e in state["eig"]
        ]
        self.generator.set_state(state["generator"])
        self._inverse_updates = int(state.get("inverse_updates", 0))
        self.damping = float(state["damping"])
        self.lr = float(state["lr"])
        self._reset_pending()
        self._rng = self.generator.get_state()

    def remove(self) -> None:
        """Remove all hooks (the preconditioner stops recording)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        names = ", ".join(f"{u.name or '<root>'}:{u.kind}" for u in self.uses)
        return f"KFACPreconditioner(fisher={self.fisher!r}, layers=[{names}])"


class KFAC(Optimizer):
    """K-FAC optimizer (Martens & Grosse 2015): momentum SGD on the K-FAC direction.

    Usage is that of any torch optimizer (forward, ``loss.backward()``, ``opt.step()``), or
    ``opt.step(closure)``. Per step::

        g <- grad + weight_decay * p
        d <- KFACPreconditioner(g)         # factors, damping, KL clipping: see there
        buf <- momentum * buf + d
        p <- p - lr * buf                  # delta = -lr * buf
        if adapt_damping and step % adapt_damping == 0:   # Levenberg-Marquardt
            rho = (f(p) - f(p_old)) / (grad^T delta + delta^T (A (x) G + damping I) delta / 2)
            damping *= omega if rho < 1/4;  damping /= omega if rho > 3/4
            # omega = (20/19)^adapt_damping, damping kept in [1e-8, 1e4]; f(p) is loss_fn
            # at the new p on the step's batch (one extra forward pass); no change when
            # the model predicts no decrease (a momentum-dominated step)

    The defaults (``lr=0.3, damping=3e-2, adapt_damping=5, kl_clip=7e-4``, factors and
    eigendecompositions every 20 steps) were chosen once for three tasks, with no tuning per
    task; ``benchmarks/optimizers_kfac.py`` and ``benchmarks/README.md`` compare them with
    AdamW (3 seeds per task).

    Note:
        ``step`` overwrites ``p.grad`` with the preconditioned direction ``d``.

    Args:
        params: the parameters to optimise, or the model itself (all its trainable ones).
        model: the network (keyword; may be omitted when ``params`` is the model).
        loss_fn: the likelihood loss (see :class:`KFACPreconditioner`).
        lr: learning rate ``> 0``.
        momentum: heavy-ball momentum in ``[0, 1)``.
        damping: Tikhonov damping ``> 0``, the starting value when ``adapt_damping`` is set
            (per-optimizer; in ``param_groups[0]["damping"]``, schedulable there when fixed).
        weight_decay: L2 coefficient ``>= 0``, added to the gradient before preconditioning.
        kl_clip: KL-clipping bound or ``None`` (default ``7e-4``).
        adapt_damping: adapt ``damping`` every this many steps by the Levenberg-Marquardt rule
            of Martens & Grosse (2015, sec. 6.5), or ``None`` (fixed). It re-evaluates
            ``loss_fn`` at the new parameters on the last batch passed through the model and
            ``loss_fn`` with gradients on (its inputs are remembered by a hook); if the loss
            was computed another way, the damping stays fixed (one warning). The current
            value is ``param_groups[0]["damping"]`` (saved by ``state_dict``), the last
            reduction ratio ``last_rho``. Default ``5`` (as Martens & Grosse's ``T_1``).
        factor_update_interval, inverse_update_interval, factor_decay: as in
            :class:`KFACPreconditioner`; here factors and eigendecompositions every 20 steps,
            running-average weight 0.8 by default (on small models they are the costly part
            of a step).
        **kwargs: ``fisher``, ``num_samples``, ``damping_mode``, ``basis_update_interval``,
            ``unsupported``, ``generator`` as in :class:`KFACPreconditioner`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> X, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()
        >>> opt = KFAC(model, loss_fn, lr=0.1, generator=torch.Generator().manual_seed(0))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss_fn(model(X), y).backward()
        ...     opt.step()
    """

    def __init__(
        self,
        params: Any,
        loss_fn: Callable | None = None,
        lr: float = 0.3,
        momentum: float = 0.9,
        damping: float = 3e-2,
        weight_decay: float = 0.0,
        kl_clip: float | None = 7e-4,
        *,
        adapt_damping: int | None = 5,
        factor_update_interval: int = 20,
        inverse_update_interval: int = 20,
        factor_decay: float = 0.8,
        model: nn.Module | None = None,
        **kwargs: Any,
    ):
        params, model = params_and_model(params, model, "KFAC")
        if loss_fn is None:
            raise TypeError("KFAC needs loss_fn= (the likelihood loss the model is trained with).")
        check_positive(lr, "lr")
        _check_decay(momentum, "momentum")
        check_positive(damping, "damping")
        check_nonnegative(weight_decay, "weight_decay")
        self.adapt_damping = (
            None if adapt_damping is None else check_int(adapt_damping, "adapt_damping")
        )
        self.last_rho: float | None = None
        defaults = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay)
        super().__init__(params, defaults)
        check_optimizer_params([p for g in self.param_groups for p in g["params"]], "KFAC")
        self.model = model
        self.loss_fn = loss_fn
        self.preconditioner = KFACPreconditioner(
            model,
            loss_fn,
            damping=damping,
            kl_clip=kl_clip,
            lr=lr,
            factor_update_interval=factor_update_interval,
            inverse_update_interval=inverse_update_interval,
            factor_decay=factor_decay,
            **kwargs,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        pre = self.preconditioner
        try:  # a non-finite loss, gradient or statistic raises before anything is written
            loss = closure_loss(closure)
        except NonFiniteError:
            pre.discard_pending()
            raise
        pre.check_finite([p.grad for p in self._params() if p not in pre.factored_params])
        for group in self.param_groups:
            check_positive(group["lr"], "lr")
            wd = group["weight_decay"]
            if wd:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=wd)
        pre.damping = check_positive(self.param_groups[0]["damping"], "damping")
        pre.lr = self.param_groups[0]["lr"]
        T = self.adapt_damping
        grads = None
        if T is not None and pre.steps % T == 0:
            grads = {p: p.grad.clone() for p in self._params() if p.grad is not None}
        pre._step()
        deltas = {}
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if mom:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                if grads is not None:
                    deltas[p] = d * -lr
                p.add_(d, alpha=-lr)
        if grads is not None:
            self._adapt_damping(grads, deltas)
        pre._batch = {}  # a later step must not reuse this batch
        return loss

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _adapt_damping(self, grads: dict, deltas: dict) -> None:
        """Levenberg-Marquardt rule (Martens & Grosse 2015, sec. 6.5) on the step just taken."""
        pre = self.preconditioner
        losses = pre.batch_loss()
        if losses is None:
            warn_once(
                "KFAC(adapt_damping=...) keeps the damping fixed: it re-evaluates loss_fn on "
                "the last batch, but loss_fn was not called on the whole model output "
                "(loss_fn(model(X), y))."
            )
            return
        lam = self.param_groups[0]["damping"]
        lin = sum((grads[p] * d).sum() for p, d in deltas.items())
        sq = sum(d.square().sum() for d in deltas.values())
        model_change = float(lin + 0.5 * (pre.quadratic(deltas) + lam * sq))
        change = float(losses[1] - losses[0])
        if not model_change < 0:  # the model predicts no decrease (momentum): no evidence
            self.last_rho = None
            return
        rho = change / model_change
        if rho != rho:  # the new loss is NaN: treat as the worst agreement
            rho = -math.inf
        self.last_rho = rho
        omega = DAMPING_OMEGA**self.adapt_damping
        if rho < 0.25:
            lam = min(lam * omega, MAX_DAMPING)
        elif rho > 0.75:
            lam = max(lam / omega, MIN_DAMPING)
        for group in self.param_groups:
            group["damping"] = lam

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kfac"] = self.preconditioner.state_dict()
        sd[STATE_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict, ("state", "param_groups", "kfac"), self.defaults)
        state_dict = {k: v for k, v in state_dict.items() if k != STATE_TAG}
        kfac = state_dict.pop("kfac")
        self.preconditioner.load_state_dict(kfac)
        super().load_state_dict(state_dict)
