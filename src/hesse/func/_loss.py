"""Loss functions as likelihoods: output-space Hessians, Fisher covariances and samplers.

For the three supported losses the per-sample loss (``reduction="sum"``) is a negative
log-likelihood up to a constant, and the Fisher of that likelihood equals its Hessian in the
outputs (canonical links), so exact Fisher == GGN:

========================  ============================  =============================
loss                      model distribution            E[r r^T] = output Hessian
========================  ============================  =============================
``MSELoss``               y ~ N(f, I/2)                 2 I
``CrossEntropyLoss``      y ~ Categorical(softmax f)    diag(p) - p p^T
``BCEWithLogitsLoss``     y ~ Bernoulli(sigmoid f)      diag(s (1 - s))
========================  ============================  =============================

``r = d loss_n / d f`` with ``loss_n`` the unreduced per-sample loss. With ``reduction="mean"``
every quantity is scaled by the same constant as the loss (``1/B`` for cross-entropy,
``1/numel`` for MSE and BCE); :func:`reduction_scale` returns it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "loss_kind",
    "reduction_scale",
    "output_fisher_mp",
    "sample_targets",
    "output_grad_unreduced",
]

_KINDS = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "ce", nn.BCEWithLogitsLoss: "bce"}


def loss_kind(loss_fn: nn.Module) -> str:
    """``"mse" | "ce" | "bce"`` for the supported likelihood losses; raise otherwise."""
    for cls, kind in _KINDS.items():
        if isinstance(loss_fn, cls):
            if kind == "ce" and (loss_fn.weight is not None or loss_fn.label_smoothing != 0.0):
                raise NotImplementedError(
                    "Fisher operators need CrossEntropyLoss without class weights or label "
                    "smoothing (they are not a likelihood); use GGNOperator instead."
                )
            if kind == "bce" and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
                raise NotImplementedError(
                    "Fisher operators need BCEWithLogitsLoss without weight/pos_weight; "
                    "use GGNOperator instead."
                )
            return kind
    raise NotImplementedError(
        f"No likelihood known for {type(loss_fn).__name__}; Fisher operators support "
        "nn.MSELoss, nn.CrossEntropyLoss and nn.BCEWithLogitsLoss. GGNOperator and "
        "HessianOperator work with any scalar loss."
    )


def reduction_scale(kind: str, reduction: str, outputs: Tensor) -> float:
    """Ratio of the reduced batch loss to the sum of its unreduced per-sample losses."""
    if reduction == "sum":
        return 1.0
    if kind == "ce":
        return 1.0 / outputs.shape[0]
    return 1.0 / outputs.numel()


def _check_ce(outputs: Tensor) -> None:
    if outputs.ndim != 2:
        raise NotImplementedError(
            f"Fisher for CrossEntropyLoss expects outputs (B, C); got {tuple(outputs.shape)}."
        )


def output_fisher_mp(kind: str, outputs: Tensor, W: Tensor) -> Tensor:
    """``E_y[r r^T] W`` per sample, for ``W`` of shape ``(k, *outputs.shape)`` (closed form)."""
    f = outputs.detach()
    if kind == "mse":
        return 2.0 * W
    if kind == "bce":
        s = torch.sigmoid(f)
        return (s * (1 - s)) * W
    _check_ce(f)
    p = torch.softmax(f, dim=1)
    return p * W - p * (p * W).sum(dim=-1, keepdim=True)


def sample_targets(
    kind: str, outputs: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """Draw ``num_samples`` targets per sample from the model distribution ``p(y | f)``."""
    f = outputs.detach()
    if kind == "mse":
        noise = torch.randn(
            (num_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator
        )
        return f + noise * (0.5**0.5)
    if kind == "bce":
        u = torch.rand((num_samples, *f.shape), dtype=f.dtype, device=f.device, generator=generator)
        return (u < torch.sigmoid(f)).to(f.dtype)
    _check_ce(f)
    p = torch.softmax(f, dim=1)
    idx = torch.multinomial(p, num_samples, replacement=True, generator=generator)  # (B, S)
    return idx.T.contiguous()  # (S, B)


def output_grad_unreduced(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``r = d loss_n / d f`` of the per-sample (sum-reduced) loss, shape of ``outputs``."""
    f = outputs.detach()
    if kind == "mse":
        return 2.0 * (f - targets.to(f.dtype).reshape(f.shape))
    if kind == "bce":
        return torch.sigmoid(f) - targets.to(f.dtype).reshape(f.shape)
    _check_ce(f)
    p = torch.softmax(f, dim=1)
    if targets.dtype.is_floating_point:  # class probabilities
        return p - targets.to(f.dtype)
    return p - torch.nn.functional.one_hot(targets.long(), f.shape[1]).to(f.dtype)
