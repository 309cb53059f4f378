"""Dense references and the operator conformance checker.

The references are derived independently of hesse's products: the Hessian is
``torch.autograd.functional.hessian`` of the loss on the concatenated data (one plain
backward pass per column; not ``torch.func.hessian``, whose second derivatives through
``nn.LayerNorm`` are silently wrong in torch 2.13); the GGN is the Hessian of the
loss of the *linearised* model ``f0 + J (theta - theta0)`` (``J`` dense, by autograd),
not a second copy of ``J^T H_L J``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..objective import _is_batch, resolve_params
from ..operators.base import aslinearoperator

__all__ = ["check_operator", "dense_hessian", "dense_ggn", "concat_data"]


def concat_data(data: Any) -> tuple[Any, Tensor]:
    """Concatenate an ``(X, y)`` pair or an iterable of them into one batch."""
    batches = [tuple(data)] if _is_batch(data) else list(data)
    Xs = [b[0] for b in batches]
    y = torch.cat([b[1] for b in batches])
    if isinstance(Xs[0], (tuple, list)):
        X = tuple(torch.cat(parts) for parts in zip(*Xs))
    else:
        X = torch.cat(Xs)
    return X, y


def _functional_loss(
    model: nn.Module, loss_fn: Callable, data: Any, params: Any, train_mode: bool
) -> tuple[Callable[[Tensor], Tensor], Tensor, Callable]:
    chosen = resolve_params(model, params)
    names = list(chosen)
    shapes = [p.shape for p in chosen.values()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in chosen.values()])
    others = {k: v.detach() for k, v in model.named_parameters() if k not in chosen}
    buffers = {k: v for k, v in model.named_buffers()}
    X, y = concat_data(data)
    args = tuple(X) if isinstance(X, tuple) else (X,)

    def model_fn(theta: Tensor) -> Tensor:
        state, i = dict(others), 0
        for name, s in zip(names, shapes):
            state[name] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        state.update(buffers)
        flags = [(m, m.training) for m in model.modules()]
        model.train(train_mode)
        try:
            return torch.func.functional_call(model, state, args)
        finally:
            for m, was in flags:  # each module's own flag (a frozen eval-mode part stays so)
                m.training = was

    return (lambda theta: loss_fn(model_fn(theta), y)), theta0, model_fn


def dense_hessian(
    model: nn.Module, loss_fn: Callable, data: Any, *, params: Any = None, train_mode: bool = False
) -> Tensor:
    """Dense Hessian of ``loss_fn(model(X_all), y_all)`` by ``torch.autograd.functional``."""
    f, theta0, _ = _functional_loss(model, loss_fn, data, params, train_mode)
    return torch.autograd.functional.hessian(f, theta0)


def dense_ggn(
    model: nn.Module, loss_fn: Callable, data: Any, *, params: Any = None, train_mode: bool = False
) -> Tensor:
    """Dense GGN as the Hessian of the loss of the linearised model at ``theta0``."""
    _, theta0, model_fn = _functional_loss(model, loss_fn, data, params, train_mode)
    _, y = concat_data(data)
    f0 = model_fn(theta0).detach()
    J = torch.autograd.functional.jacobian(model_fn, theta0).detach().reshape(f0.numel(), -1)

    def lin_loss(d: Tensor) -> Tensor:
        return loss_fn(f0 + (J @ d).reshape(f0.shape), y)

    return torch.autograd.functional.hessian(lin_loss, torch.zeros_like(theta0))


def check_operator(
    op: Any,
    dense: Tensor | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    num_probes: int = 3,
    seed: int = 0,
) -> None:
    """Assert that ``op`` behaves as a linear operator should; raise ``AssertionError`` if not.

    Checks: matvec equals the matching matmat column; linearity; ``to_dense`` equals
    ``matmat(I)`` (and ``dense`` when given); declared ``symmetric``/``psd`` hold; repeated
    products are identical (determinism); ``to_scipy`` agrees with ``matmat``.
    Tolerances default to ``rtol=1e-8`` in float64 and ``1e-4`` in float32.
    """
    op = aslinearoperator(op)
    m, n = op.shape
    if rtol is None:
        rtol = 1e-8 if op.dtype == torch.float64 else 1e-4
    if atol is None:
        atol = rtol
    g = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.randn(n, num_probes, generator=g, dtype=op.dtype).to(op.device)

    def close(a: Tensor, b: Tensor, what: str) -> None:
        scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
        err = float((a - b).abs().max()) if a.numel() else 0.0
        if err > atol * scale + rtol * float(b.abs().max() if b.numel() else 0):
            raise AssertionError(
                f"check_operator: {what} (max abs error {err:.3e}, scale {scale:.3e})."
            )

    AV = op.matmat(V)
    if AV.shape != (m, num_probes):
        raise AssertionError(
            f"check_operator: matmat returned shape {tuple(AV.shape)}, expected {(m, num_probes)}."
        )
    for j in range(num_probes):
        close(op.matvec(V[:, j].contiguous()), AV[:, j], f"matvec != matmat column {j}")
    close(op.matmat(V), AV, "repeated products differ (non-deterministic operator)")
    a, b = 0.7, -1.3
    close(op.matvec(a * V[:, 0] + b * V[:, 1]), a * AV[:, 0] + b * AV[:, 1], "not linear")
    D = op.to_dense()
    close(D @ V, AV, "to_dense() @ V != matmat(V)")
    if dense is not None:
        dense = dense.to(dtype=op.dtype, device=op.device)
        close(D, dense, "to_dense() differs from the reference")
    if op.symmetric:
        close(D, D.T, "declared symmetric but is not")
    if op.psd:
        evals = torch.linalg.eigvalsh(0.5 * (D + D.T).double())
        tol = 1e-6 if op.dtype == torch.float64 else 1e-3
        if float(evals.min()) < -tol * max(float(evals.abs().max()), 1.0):
            raise AssertionError(
                f"check_operator: declared psd but min eigenvalue is {float(evals.min()):.3e}."
            )
    S = op.to_scipy()
    close(
        torch.as_tensor(S.matmat(V.cpu().numpy()), dtype=op.dtype, device=op.device),
        AV,
        "to_scipy().matmat differs",
    )
    if not op.symmetric:
        W = torch.randn(m, 2, generator=g, dtype=op.dtype).to(op.device)
        try:
            close(op.rmatmat(W), D.T @ W, "rmatmat != to_dense().T @ W")
        except NotImplementedError:
            pass
