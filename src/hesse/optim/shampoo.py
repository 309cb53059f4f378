"""Shampoo: per-dimension (Kronecker-factored) full-matrix AdaGrad preconditioning."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._checks import check_choice, check_finite, check_int, check_nonnegative, check_positive
from ..linalg.matrix_functions import matrix_inverse_root
from ._base import STATE_TAG, check_optimizer_params, check_state_dict
from ._closure import closure_loss as _closure_loss
from .kfac import all_finite

__all__ = ["Shampoo"]

GRAFTING = ("adam", "adagrad", "sgd", "none")
# hyperparameters added after states were first saved, with the values of that behaviour
OLD_STATE_DEFAULTS = {"precondition_1d": True, "statistics_interval": 1}


def _check_unit(value: float, name: str, *, closed: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        rng = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"Invalid {name}={value!r}; must lie in {rng}.")
    return float(value)


def _mode_product(M: Tensor, T: Tensor, dim: int) -> Tensor:
    """Multiply tensor ``T`` along ``dim`` by the matrix ``M``: ``T x_dim M``."""
    Tm = T.movedim(dim, 0)
    shape = Tm.shape
    return (M @ Tm.reshape(shape[0], -1)).reshape(shape).movedim(0, dim)


def _unfold_gram(G: Tensor, dim: int) -> Tensor:
    """``G_(i) G_(i)^T``: the Gram matrix of the mode-``dim`` unfolding."""
    Gm = G.movedim(dim, 0).reshape(G.shape[dim], -1)
    return Gm @ Gm.T


class Shampoo(Optimizer):
    """Shampoo (Gupta, Koren & Singer 2018) with grafting (Anil et al. 2020).

    For a parameter of order ``k`` (shape ``(d_1, ..., d_k)``) with gradient ``G``, one
    statistic per dimension ``i`` (skipped when ``d_i == 1``, ``d_i > max_preconditioner_dim``
    or ``k == 1`` with ``precondition_1d=False``)::

        every statistics_interval steps:
            L_i <- beta2 * L_i + (1 - beta2 if beta2 < 1 else 1) * G_(i) G_(i)^T
        every update_interval steps:  R_i = (L_i + epsilon I)^{-1/q}     # matrix_inverse_root
        P = G x_1 R_1 x_2 ... x_k R_k             # matrices: L^{-1/4} G R^{-1/4}
        grafting: P <- P * ||graft(G)|| / ||P||   # step size of SGD / AdaGrad / Adam, per tensor
        buf <- momentum * buf + P
        p <- p - lr * buf

    with the paper's ``q = 2k``, or ``q = exponent_override``. The inverse roots use
    :func:`hesse.linalg.matrix_inverse_root` (``eigh`` in float64 by default, or coupled
    Newton), so they do not fail in float32.

    Args:
        params: parameters or param groups.
        lr: learning rate ``> 0`` (with ``grafting="adam"`` it plays Adam's lr).
        momentum: heavy-ball momentum in ``[0, 1)``.
        beta2: statistics decay in ``[0, 1]``; ``1`` sums them (the paper's AdaGrad form).
        epsilon: ridge ``> 0`` added to every statistic before its root.
        weight_decay: L2 coefficient ``>= 0`` added to the gradient.
        update_interval: steps between root recomputations (default 10: the roots are
            the costly part of a step).
        grafting: ``"adam"`` (default), ``"adagrad"``, ``"sgd"`` or ``"none"``.
        graft_betas: Adam betas for ``grafting="adam"``.
        graft_eps: epsilon of the grafted AdaGrad/Adam.
        max_preconditioner_dim: dimensions larger than this are not preconditioned.
        precondition_1d: whether vectors (biases, norm gains) get a full-matrix statistic;
            with ``False`` their step is the grafted method's step size along the gradient
            (as Anil et al.'s ``skip_preconditioning_rank_lt=2``).
        statistics_interval: steps between statistic updates (default 5, as the
            ``statistics_compute_steps`` of Anil et al.'s implementation; 1: every step, the
            paper's). The statistic update is the part of a step that grows with the layer
            widths; on the three benchmark tasks 5 also took fewer steps than 1.
        root_method: ``"eigh"`` or ``"newton"`` (see :func:`~hesse.linalg.matrix_inverse_root`).
        exponent_override: use ``R_i = (L_i + epsilon I)^{-1/q}`` with this ``q`` for every
            dimension, or ``None`` (default) for the paper's ``2k``. ``q = 2`` gives the
            matrix step ``L^{-1/2} G R^{-1/2}``, the square of Shampoo's preconditioner, which
            Morwani et al. (2024) show approximates full-matrix AdaGrad better. Only ``2k``
            makes the step independent of the gradient's scale (with ``q = 2`` on a matrix it
            scales as ``1 / |G|``), so an override needs grafting (it warns without, as
            for ``statistics_interval > 1``).

    The defaults (the paper's exponents, statistics every 5 steps and roots every 10, Adam
    grafting, ``lr=5e-3``) were checked on three tasks (a causal transformer, a CNN, a tanh
    autoencoder) against AdamW, with no tuning per task: ``benchmarks/optimizers_kfac.py`` and
    ``benchmarks/README.md``, which also give ``exponent_override=2,
    precondition_1d=False`` (faster there, slower on a digits MLP).

    Example:
        >>> W = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
        >>> opt = Shampoo(
        ...     [W], lr=1.0, momentum=0.0, grafting="none", epsilon=1e-12, statistics_interval=1
        ... )
        >>> W.grad = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> _ = opt.step()  # L = G G^T, R = G^T G: step = L^{-1/4} G R^{-1/4} = e_1 e_1^T
        >>> torch.allclose(W[0, 0], torch.tensor(-1.0, dtype=torch.float64))
        True

    References:
        Gupta, Koren & Singer, "Shampoo: Preconditioned stochastic tensor optimization",
        ICML 2018. Anil et al., "Scalable second order optimization for deep learning", 2020.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 5e-3,
        momentum: float = 0.9,
        beta2: float = 1.0,
        epsilon: float = 1e-6,
        weight_decay: float = 0.0,
        update_interval: int = 10,
        grafting: str = "adam",
        graft_betas: tuple[float, float] = (0.9, 0.999),
        graft_eps: float = 1e-8,
        max_preconditioner_dim: int = 2048,
        precondition_1d: bool = True,
        statistics_interval: int = 5,
        root_method: str = "eigh",
        exponent_override: int | None = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            beta2=beta2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            update_interval=update_interval,
            grafting=grafting,
            graft_betas=tuple(graft_betas),
            graft_eps=graft_eps,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_1d=precondition_1d,
            statistics_interval=statistics_interval,
            root_method=root_method,
            exponent_override=exponent_override,
        )
        self._validate(defaults)
        super().__init__(params, defaults)
        check_optimizer_params([p for g in self.param_groups for p in g["params"]], "Shampoo")
        for group in self.param_groups:
            self._validate(group)
            paper = group["exponent_override"] is None and group["statistics_interval"] == 1
            if group["grafting"] == "none" and not paper:
                warnings.warn(
                    "Shampoo(grafting='none') with exponent_override="
                    f"{group['exponent_override']}, statistics_interval="
                    f"{group['statistics_interval']}: without grafting the step's scale comes "
                    "from the statistics, and only the paper's form (exponent_override=None, "
                    "statistics_interval=1) keeps it right (independent of the gradient's "
                    "scale, shrinking as AdaGrad's). Pass those, or keep a grafting.",
                    stacklevel=2,
                )

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check_positive(group["lr"], "lr")
        _check_unit(group["momentum"], "momentum")
        _check_unit(group["beta2"], "beta2", closed=True)
        check_positive(group["epsilon"], "epsilon")
        check_nonnegative(group["weight_decay"], "weight_decay")
        check_int(group["update_interval"], "update_interval")
        check_choice(group["grafting"], "grafting", GRAFTING)
        b = group["graft_betas"]
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"Invalid graft_betas={b!r}; must be a pair (beta1, beta2).")
        for i, bi in enumerate(b):
            if isinstance(bi, bool) or not isinstance(bi, (int, float)) or not 0.0 <= bi < 1.0:
                raise ValueError(f"Invalid graft_betas={b!r}; graft_betas[{i}] must lie in [0, 1).")
        check_positive(group["graft_eps"], "graft_eps")
        check_int(group["max_preconditioner_dim"], "max_preconditioner_dim")
        if not isinstance(group["precondition_1d"], bool):
            raise TypeError(f"precondition_1d must be a bool, got {group['precondition_1d']!r}.")
        check_int(group["statistics_interval"], "statistics_interval")
        check_choice(group["root_method"], "root_method", ("eigh", "newton"))
        if group["exponent_override"] is not None:
            check_int(group["exponent_override"], "exponent_override")

    def _fresh_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        st: dict[str, Any] = {"step": 0}
        dims = [i for i, d in enumerate(p.shape) if 1 < d <= group["max_preconditioner_dim"]]
        if p.ndim == 1 and not group["precondition_1d"]:
            dims = []
        st["dims"] = dims
        st["stats"] = [
            torch.zeros(p.shape[i], p.shape[i], dtype=p.dtype, device=p.device) for i in dims
        ]
        st["roots"] = [torch.eye(p.shape[i], dtype=p.dtype, device=p.device) for i in dims]
        if group["grafting"] in ("adam", "adagrad"):
            st["graft_sq"] = torch.zeros_like(p)
        if group["grafting"] == "adam":
            st["graft_m"] = torch.zeros_like(p)
        return st

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Shampoo step (``closure`` optional, as in ``torch.optim``).

        The new statistics and roots are computed first and checked; a non-finite loss,
        gradient, statistic or root raises :class:`~hesse.NonFiniteError` with parameters
        and state unchanged.
        """
        loss = _closure_loss(closure)
        work = []
        for group in self.param_groups:
            self._validate(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise NotImplementedError("Shampoo does not support sparse gradients.")
                work.append((group, p, *self._new_statistics(p, group)))
        # one pass over what is new this step: gradients, updated statistics, fresh roots
        if not all_finite([t for _, p, *_, new in work for t in [p.grad, *(t for t, _ in new)]]):
            for _, p, *_, new in work:  # the slow path names the culprit
                check_finite(
                    p.grad, f"the gradient of a parameter of shape {tuple(p.shape)} (Shampoo)"
                )
                for t, what in new:
                    check_finite(t, what)
        for group in self.param_groups:
            items = [w[1:] for w in work if w[0] is group]
            if items:
                self._apply(group, items)
        return loss

    def _new_statistics(self, p: Tensor, group: dict[str, Any]):
        """``(g, stats, roots, new)`` of this step, out of place (nothing written); ``new``
        lists ``(tensor, what)`` for the statistics and roots computed this step."""
        st = self.state.get(p) or self._fresh_state(p, group)
        g = p.grad
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        beta2 = group["beta2"]
        stats, roots, new = list(st["stats"]), list(st["roots"]), []
        if st["step"] % group["statistics_interval"] == 0:
            for j, i in enumerate(st["dims"]):
                gram = _unfold_gram(g, i)
                old = stats[j]
                stats[j] = old * beta2 + gram * (1.0 - beta2) if beta2 < 1.0 else old + gram
            new += [(S, "a Shampoo statistic") for S in stats]
        if st["step"] % group["update_interval"] == 0:
            root = group["exponent_override"] or 2 * max(p.ndim, 1)
            roots = [
                matrix_inverse_root(S, root, eps=group["epsilon"], method=group["root_method"])
                for S in stats
            ]
            new += [(R, "a Shampoo inverse root") for R in roots]
        return g, stats, roots, new

    def _apply(self, group: dict, items: list) -> None:
        """Write the statistics and roots, then take the step for one group's parameters,
        the elementwise work batched over them (``torch._foreach_*``)."""
        ps, gs, dirs = [], [], []
        for p, g, stats, roots, _ in items:
            st = self.state[p]
            if not st:
                st.update(self._fresh_state(p, group))
            st["stats"], st["roots"] = stats, roots
            P = g if st["dims"] else g.clone()  # scaled in place below
            for j, i in enumerate(st["dims"]):
                P = _mode_product(roots[j], P, i)
            ps.append(p)
            gs.append(g)
            dirs.append(P)
        states = [self.state[p] for p in ps]
        graft = group["grafting"]
        if graft != "none":
            if graft == "sgd":
                G_dir = gs
            elif graft == "adagrad":
                sq = [st["graft_sq"] for st in states]
                torch._foreach_addcmul_(sq, gs, gs)
                denom = torch._foreach_sqrt(sq)
                torch._foreach_add_(denom, group["graft_eps"])
                G_dir = torch._foreach_div(gs, denom)
            else:
                b1, b2 = group["graft_betas"]
                m = [st["graft_m"] for st in states]
                v = [st["graft_sq"] for st in states]
                torch._foreach_lerp_(m, gs, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
                steps = [st["step"] + 1 for st in states]
                denom = torch._foreach_div(v, [1 - b2**t for t in steps])
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, group["graft_eps"])
                G_dir = torch._foreach_div(m, denom)
                torch._foreach_div_(G_dir, [1 - b1**t for t in steps])
            for P, gn, pn in zip(dirs, torch._foreach_norm(G_dir), torch._foreach_norm(dirs)):
                P.mul_(torch.where(pn > 0, gn / pn.clamp_min(1e-30), pn.new_zeros(())))
        mom = group["momentum"]
        if mom:
            bufs = []
            for i, st in enumerate(states):
                buf = st.get("momentum_buffer")
                if buf is None:
                    st["momentum_buffer"] = dirs[i] = dirs[i].clone()
                else:
                    bufs.append((buf, i))
            if bufs:
                torch._foreach_mul_([b for b, _ in bufs], mom)
                torch._foreach_add_([b for b, _ in bufs], [dirs[i] for _, i in bufs])
                for b, i in bufs:
                    dirs[i] = b
        torch._foreach_add_(ps, dirs, alpha=-group["lr"])
        for st in states:
            st["step"] += 1

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[STATE_TAG] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(state_dict, dict) and isinstance(state_dict.get("param_groups"), list):
            # saved before these options existed: keep that behaviour (every step, vectors too)
            groups = [{**OLD_STATE_DEFAULTS, **g} for g in state_dict["param_groups"]]
            state_dict = {**state_dict, "param_groups": groups}
        check_state_dict(self, state_dict, ("state", "param_groups"), self.defaults)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_TAG})
