"""Losses known in output space: likelihood rows, closed-form output Hessians, samplers.

An :class:`OutputLoss` is a loss of the model outputs that hesse understands as a sum of
independent negative log-likelihood terms, one per *row*:

========================  ==============================  ============================
loss                      rows (one likelihood each)      output Hessian of one row
========================  ==============================  ============================
``MSELoss``               one per sample, all its outputs ``2 I``
``BCEWithLogitsLoss``     one per sample, all its outputs ``diag(s (1 - s))``
``CrossEntropyLoss``      one per position: ``(N, C)``,   ``diag(p) - p p^T``
                          ``(N, C, d1, ...)`` or, with
                          ``class_dim=-1``, ``(B, T, V)``
========================  ==============================  ============================

Cross-entropy rows whose target equals ``ignore_index`` (and, with ``shift=True``, the last
position of every sequence) contribute nothing. With canonical links the Fisher of each
row's likelihood equals its output Hessian, so exact Fisher == GGN.

The batch loss is ``sum_loss(outputs, targets)`` (sum over the valid terms);
``count(targets)`` is the number of terms ``reduction="mean"`` divides by (valid targets for
cross-entropy, elements for MSE/BCE). :class:`hesse.Objective` divides the sum by the count
of the *whole data set*, so the mean does not depend on the batching.

All products are closed forms on the rows: nothing here builds a ``C x C`` matrix or
differentiates through ``log_softmax``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["OutputLoss", "LossAt", "output_loss"]

_KINDS = ("mse", "ce", "bce")


class OutputLoss(nn.Module):
    """A loss in output space (see the module docstring).

    Args:
        kind: ``"mse"``, ``"ce"`` or ``"bce"``.
        reduction: ``"mean"`` or ``"sum"``.
        ignore_index: cross-entropy targets with this value are ignored (``-100``).
        class_dim: cross-entropy class dimension of the outputs: ``1`` (PyTorch's
            convention: ``(N, C)`` or ``(N, C, d1, ...)`` against targets ``(N, d1, ...)``)
            or ``-1`` (language-model logits ``(B, T, V)`` against targets ``(B, T)``).
        shift: causal language modelling: the logits at position ``t`` predict the target
            at ``t + 1`` (``logits[:, :-1]`` against ``targets[:, 1:]``); needs
            ``class_dim=-1``.

    Example:
        >>> loss = OutputLoss("ce", class_dim=-1, shift=True)
        >>> logits = torch.zeros(2, 4, 5, dtype=torch.float64)
        >>> labels = torch.tensor([[1, 2, 3, -100], [0, 1, -100, -100]])
        >>> int(loss.count(labels))  # targets 2, 3, (-100), 1, (-100), (-100)
        3
        >>> float(loss(logits, labels))  # uniform prediction over 5 classes
        1.6094379124341003
    """

    def __init__(
        self,
        kind: str,
        reduction: str = "mean",
        *,
        ignore_index: int = -100,
        class_dim: int = 1,
        shift: bool = False,
    ):
        super().__init__()  # a module, so that hooks (K-FAC's statistics) see its calls
        if kind not in _KINDS:
            raise ValueError(f"Invalid kind={kind!r}; expected one of {_KINDS}.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction={reduction!r}; expected 'mean' or 'sum'.")
        if class_dim not in (1, -1):
            raise ValueError(f"Invalid class_dim={class_dim!r}; expected 1 or -1.")
        if shift and (kind != "ce" or class_dim != -1):
            raise ValueError("shift=True needs kind='ce' and class_dim=-1 (logits (B, T, V)).")
        self.kind, self.reduction = kind, reduction
        self.ignore_index = int(ignore_index)
        self.class_dim, self.shift = class_dim, bool(shift)

    def __repr__(self) -> str:
        extra = ""
        if self.kind == "ce":
            extra = f", ignore_index={self.ignore_index}, class_dim={self.class_dim}"
            extra += ", shift=True" if self.shift else ""
        return f"OutputLoss({self.kind!r}, {self.reduction!r}{extra})"

    # -- validation ---------------------------------------------------------------------
    def _soft(self, outputs: Tensor, targets: Tensor) -> bool:
        """Cross-entropy with class-probability targets (same shape as the outputs)."""
        return targets.dtype.is_floating_point and targets.shape == outputs.shape

    def check(self, outputs: Tensor, targets: Tensor, where: str = "") -> None:
        """Raise a clear error if ``targets`` do not fit ``outputs`` (shapes and dtypes only)."""
        at = f" ({where})" if where else ""
        if not isinstance(outputs, Tensor):
            raise TypeError(f"Model outputs must be a tensor; got {type(outputs).__name__}{at}.")
        if self.kind in ("mse", "bce"):
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"{self._name()} targets must have the shape of the outputs; got outputs "
                    f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}{at}. PyTorch "
                    "would broadcast them silently; reshape the targets, e.g. "
                    "y.view_as(outputs) or y.unsqueeze(-1)."
                )
            return
        cd = self._cdim(outputs)
        if outputs.ndim < 2 or (self.shift and outputs.ndim != 3):
            want = "(B, T, V)" if self.shift else "(N, C) or (N, C, d1, ...)"
            raise ValueError(
                f"CrossEntropyLoss expects outputs {want}; got {tuple(outputs.shape)}{at}."
            )
        C = outputs.shape[cd]
        if C < 2:
            raise ValueError(
                f"CrossEntropyLoss over {C} class: the loss is identically zero. A model with "
                f"one output needs a loss for one output (nn.BCEWithLogitsLoss for two classes, "
                f"nn.MSELoss for regression); got outputs {tuple(outputs.shape)}{at}."
            )
        if self._soft(outputs, targets):
            return
        self.check_dtype(targets, where, soft_ok=False)
        want = list(outputs.shape)
        del want[cd]
        if list(targets.shape) != want:
            hint = ""
            if (
                self.class_dim == 1
                and outputs.ndim >= 3
                and list(targets.shape) == list(outputs.shape[:-1])
            ):
                hint = (
                    " These look like language-model logits (B, T, V): use "
                    "hesse.func.output_loss(loss_fn, class_dim=-1) (shift=True for causal LM)."
                )
            raise ValueError(
                f"CrossEntropyLoss targets must have shape {tuple(want)} for outputs "
                f"{tuple(outputs.shape)} (class dim {self.class_dim}); got "
                f"{tuple(targets.shape)}{at}.{hint}"
            )

    def check_dtype(self, targets: Tensor, where: str = "", soft_ok: bool = True) -> None:
        """Cross-entropy targets must be class indices (or class probabilities, which need
        a class dimension); checked without the outputs."""
        if self.kind != "ce" or not targets.dtype.is_floating_point:
            return
        if soft_ok and targets.ndim >= 2:
            return
        at = f" ({where})" if where else ""
        raise TypeError(
            f"CrossEntropyLoss targets must be class indices of an integer dtype "
            f"(torch.long); got {targets.dtype}{at}. Use y.long() (or class "
            "probabilities of the outputs' shape)."
        )

    def label_range(self, targets: Tensor) -> Tensor | None:
        """``(min, max)`` of the valid class-index targets (``None`` for other losses)."""
        if self.kind != "ce" or targets.dtype.is_floating_point:
            return None
        t = self._shift_targets(targets)
        valid = t != self.ignore_index
        big = torch.iinfo(t.dtype).max
        lo = torch.where(valid, t, big).amin() if t.numel() else t.new_tensor(big)
        hi = torch.where(valid, t, -big).amax() if t.numel() else t.new_tensor(-big)
        return torch.stack([lo, hi])

    def _name(self) -> str:
        return {"mse": "MSELoss", "bce": "BCEWithLogitsLoss", "ce": "CrossEntropyLoss"}[self.kind]

    # -- rows ---------------------------------------------------------------------------
    def _cdim(self, outputs: Tensor) -> int:
        return 1 if self.class_dim == 1 else outputs.ndim - 1

    def _shift_targets(self, targets: Tensor) -> Tensor:
        return targets[:, 1:] if self.shift else targets

    def _valid(self, outputs: Tensor, targets: Tensor) -> Tensor | None:
        """Mask of the valid cross-entropy rows (``None``: all valid)."""
        if self.kind != "ce" or self._soft(outputs, targets):
            return None
        return (self._shift_targets(targets) != self.ignore_index).reshape(-1)

    def count(self, targets: Tensor) -> Tensor:
        """Number of terms ``reduction="mean"`` divides by (a 0-d tensor; no host sync).

        MSE/BCE: every element; cross-entropy: the valid targets (class probabilities:
        every position).
        """
        if self.kind != "ce":
            return torch.tensor(targets.numel(), device=targets.device)
        t = self._shift_targets(targets)
        if t.dtype.is_floating_point:  # class probabilities: one term per position
            C = t.shape[1] if self.class_dim == 1 else t.shape[-1]
            return torch.tensor(t.numel() // max(C, 1), device=t.device)
        return (t != self.ignore_index).sum()

    def rows(self, T: Tensor, lead: int = 0) -> Tensor:
        """Outputs-shaped ``T`` (with ``lead`` leading dims) as rows ``(*lead, M, C)``."""
        L = T.shape[:lead]
        if self.kind != "ce":
            return T.reshape(*L, T.shape[lead], -1)
        if self.shift:
            T = T[(slice(None),) * (lead + 1) + (slice(0, -1),)]
        cd = lead + (1 if self.class_dim == 1 else T.ndim - lead - 1)
        C = T.shape[cd]
        return T.movedim(cd, -1).reshape(*L, -1, C)

    def unrows(self, R: Tensor, shape: torch.Size, lead: int = 0) -> Tensor:
        """Inverse of :meth:`rows` (zeros at the shifted-out last positions)."""
        L = R.shape[:lead]
        if self.kind != "ce":
            return R.reshape(*L, *shape)
        shape = list(shape)
        if self.shift:
            shape[1] -= 1
        if self.class_dim == 1:
            moved = [shape[0], *shape[2:], shape[1]]
            out = R.reshape(*L, *moved).movedim(-1, lead + 1)
        else:
            out = R.reshape(*L, *shape)
        if self.shift:
            pad = torch.zeros_like(out.narrow(lead + 1, 0, 1))
            out = torch.cat([out, pad], dim=lead + 1)
        return out

    # -- values -------------------------------------------------------------------------
    def sum_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Sum of the valid per-term losses (differentiable in ``outputs``)."""
        if self.kind == "mse":
            return ((outputs - targets) ** 2).sum()
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
        f = self.rows(outputs)
        if self._soft(outputs, targets):
            return F.cross_entropy(f, self.rows(targets), reduction="sum")
        t = self._shift_targets(targets).reshape(-1)
        return F.cross_entropy(f, t, ignore_index=self.ignore_index, reduction="sum")

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss of one batch on its own (``sum_loss``, divided by ``count`` for mean)."""
        s = self.sum_loss(outputs, targets)
        if self.reduction == "sum":
            return s
        return s / self.count(targets).to(s.dtype)

    def at(self, outputs: Tensor, targets: Tensor) -> LossAt:
        """The loss frozen at ``(outputs, targets)`` for repeated output-space products."""
        return LossAt(self, outputs, targets)


class LossAt:
    """An :class:`OutputLoss` at fixed outputs and targets (softmax/sigmoid computed once).

    Every method returns tensors in the outputs' shape (with a leading dimension for
    several columns); rows that are ignored contribute zeros. All quantities are of the
    *sum* loss; multiply by the objective's batch weight for the reduced one.
    """

    def __init__(self, loss: OutputLoss, outputs: Tensor, targets: Tensor):
        self.loss = loss
        f = outputs.detach()
        self.shape = f.shape
        self.outputs, self.targets = f, targets
        self.mask = loss._valid(f, targets)
        if loss.kind == "ce":
            # only the row log-normalisers are kept; p is recomputed where it is needed, so a
            # large vocabulary holds no extra (M, C) buffer between products
            self._lse = torch.logsumexp(loss.rows(f), dim=-1, keepdim=True)  # (M, 1)
        elif loss.kind == "bce":
            self.s = torch.sigmoid(f)

    @property
    def p(self) -> Tensor:
        """Cross-entropy: the softmax probabilities as rows ``(M, C)`` (a new tensor)."""
        p = self.loss.rows(self.outputs) - self._lse
        return p.exp_()

    def _masked(self, R: Tensor) -> Tensor:
        """Zero the ignored rows of ``R`` (a new tensor of ours), in place."""
        return R if self.mask is None else R.mul_(self.mask.unsqueeze(-1).to(R.dtype))

    def hessian_mp(self, W: Tensor) -> Tensor:
        """``H_out W`` for ``W`` of shape ``(k, *outputs.shape)`` (closed form, per row).

        Returns a new tensor (callers may scale it in place).
        """
        kind = self.loss.kind
        if kind == "mse":
            return 2.0 * W
        if kind == "bce":
            return (self.s * (1 - self.s)) * W
        U = self.loss.rows(W, lead=1)  # (k, M, C)
        p = self.p
        HU = U * p  # p * u - p (p^T u) in one (k, M, C) buffer besides p
        HU.addcmul_(p, HU.sum(-1, keepdim=True), value=-1.0)
        del p
        return self.loss.unrows(self._masked(HU), self.shape, lead=1)

    def hessian_sqrt(self) -> Tensor:
        """Columns ``S`` ``(C, *outputs.shape)`` with ``sum_c s_c s_c^T = H_out`` per row.

        ``C`` is the row width (classes for cross-entropy, a sample's outputs for MSE/BCE).
        MSE: ``sqrt(2) e_c``; BCE: ``sqrt(s(1-s)) e_c``; cross-entropy: ``sqrt(p_c)(e_c - p)``
        (``(D - p sqrt(p)^T)(D - sqrt(p) p^T) = diag(p) - p p^T`` with ``D = diag(sqrt p)``).
        """
        kind = self.loss.kind
        f = self.outputs
        if kind in ("mse", "bce"):
            flat = f.reshape(f.shape[0], -1)
            C = flat.shape[1]
            eye = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1)  # (C, 1, C)
            if kind == "mse":
                cols = (2.0**0.5) * eye.expand(C, flat.shape[0], C)
            else:
                s = self.s.reshape(flat.shape)
                cols = eye * (s * (1 - s)).sqrt().unsqueeze(0)
            return cols.reshape(C, *f.shape)
        p = self.p
        sq = p.sqrt()
        cols = -(sq.T.unsqueeze(-1) * p.unsqueeze(0))  # (C, M, C)
        torch.diagonal(cols, dim1=0, dim2=2).add_(sq)
        return self.loss.unrows(self._masked(cols), self.shape, lead=1)

    def grad(self) -> Tensor:
        """``r = d sum_loss / d outputs``: per row, the gradient of that row's loss."""
        kind, f, t = self.loss.kind, self.outputs, self.targets
        if kind == "mse":
            return 2.0 * (f - t.to(f.dtype))
        if kind == "bce":
            return self.s - t.to(f.dtype)
        if self.loss._soft(f, t):
            return self.loss.unrows(self.p - self.loss.rows(t.to(f.dtype)), self.shape)
        ti = self.loss._shift_targets(t).reshape(-1, 1)
        r = self.p
        r.scatter_add_(1, ti.clamp_min(0), torch.full_like(r[:, :1], -1.0))
        return self.loss.unrows(self._masked(r), self.shape)

    def sampled_grads(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """``r`` at ``num_samples`` targets drawn from the model per row ``(S, *outputs.shape)``.

        MSE: ``y ~ N(f, I/2)``; BCE: ``y ~ Bernoulli(s)``; cross-entropy:
        ``y ~ Categorical(p)``. ``E[r r^T] = H_out`` per row.
        """
        kind, f, S = self.loss.kind, self.outputs, num_samples
        if kind == "mse":
            noise = torch.randn((S, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
            return -(2.0**0.5) * noise  # 2 (f - y) with y = f + noise / sqrt(2)
        if kind == "bce":
            u = torch.rand((S, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
            return self.s.unsqueeze(0) - (u < self.s).to(f.dtype)
        p = self.p
        idx = torch.multinomial(p, S, replacement=True, generator=generator)  # (M, S)
        r = p.unsqueeze(0).repeat(S, 1, 1)  # (S, M, C)
        r.scatter_add_(2, idx.T.unsqueeze(-1), torch.full_like(r[..., :1], -1.0))
        return self.loss.unrows(self._masked(r), self.shape, lead=1)

    def outer_mp(self, R: Tensor, W: Tensor) -> Tensor:
        """``sum_s r_s (r_s^T W)`` row by row, for ``R`` ``(S, *out)`` and ``W`` ``(k, *out)``.

        With ``R = grad()[None]`` this is the per-row (per-token for cross-entropy,
        per-sample for MSE/BCE) empirical Fisher in output space; with
        ``R = sampled_grads(S)`` the Monte-Carlo Fisher (times ``S``).
        """
        Rr = self.loss.rows(R, lead=1)  # (S, M, C)
        Wr = self.loss.rows(W, lead=1)  # (k, M, C)
        coef = torch.einsum("smc,kmc->skm", Rr, Wr)
        out = torch.einsum("skm,smc->kmc", coef, Rr)
        return self.loss.unrows(out, self.shape, lead=1)


def output_loss(
    loss_fn: Any, *, class_dim: int | None = None, shift: bool | None = None
) -> OutputLoss:
    """The :class:`OutputLoss` of ``loss_fn``; raise ``NotImplementedError`` if unknown.

    Args:
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (no class weights or label
            smoothing), ``nn.BCEWithLogitsLoss`` (no ``weight``/``pos_weight``), or an
            :class:`OutputLoss` (returned as is unless ``class_dim``/``shift`` are given).
        class_dim: cross-entropy class dimension, ``1`` (default) or ``-1`` for
            language-model logits ``(B, T, V)``.
        shift: causal language modelling (``logits[:, :-1]`` against ``targets[:, 1:]``).

    Raises:
        NotImplementedError: a loss with no known likelihood (use the autograd paths,
            :class:`hesse.GGNOperator` / :class:`hesse.HessianOperator`, with it).
        ValueError: a reduction other than ``"mean"``/``"sum"``.
    """
    if isinstance(loss_fn, OutputLoss):
        if class_dim is None and shift is None:
            return loss_fn
        return OutputLoss(
            loss_fn.kind,
            loss_fn.reduction,
            ignore_index=loss_fn.ignore_index,
            class_dim=loss_fn.class_dim if class_dim is None else class_dim,
            shift=loss_fn.shift if shift is None else shift,
        )
    red = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise NotImplementedError(
                "CrossEntropyLoss with class weights or label smoothing is not a likelihood; "
                "Fisher operators and K-FAC need it without them (GGNOperator and "
                "HessianOperator take it through autograd)."
            )
        return OutputLoss(
            "ce",
            red,
            ignore_index=loss_fn.ignore_index,
            class_dim=1 if class_dim is None else class_dim,
            shift=bool(shift),
        )
    kind = {nn.MSELoss: "mse", nn.BCEWithLogitsLoss: "bce"}.get(type(loss_fn))
    if kind == "bce" and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
        raise NotImplementedError(
            "BCEWithLogitsLoss with weight/pos_weight is not a likelihood; Fisher operators "
            "and K-FAC need it without them (GGNOperator and HessianOperator take it "
            "through autograd)."
        )
    if kind is None:
        raise NotImplementedError(
            f"No likelihood known for {type(loss_fn).__name__}; Fisher operators and K-FAC "
            "support nn.MSELoss, nn.CrossEntropyLoss and nn.BCEWithLogitsLoss. GGNOperator "
            "and HessianOperator work with any scalar loss."
        )
    if class_dim not in (None, 1) or shift:
        raise ValueError("class_dim and shift apply to CrossEntropyLoss only.")
    return OutputLoss(kind, red)
