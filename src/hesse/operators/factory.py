"""One factory from a curvature name to its operator (used by the CLI, tracker, compress)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from torch import nn

from .._checks import check_choice
from .curvature import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator

__all__ = ["Curvature", "curvature_operator"]


class Curvature(str, enum.Enum):
    """The curvature names, one meaning each (see :func:`curvature_operator`)."""

    HESSIAN = "hessian"
    GGN = "ggn"
    FISHER_EXACT = "fisher_exact"
    FISHER_MC = "fisher_mc"
    FISHER_EMPIRICAL = "fisher_empirical"


CURVATURES = tuple(c.value for c in Curvature)


def curvature_operator(
    curvature: str | Curvature,
    model: nn.Module,
    loss_fn: Callable | None,
    data: Any,
    **kwargs: Any,
) -> CurvatureOperator:
    """The curvature operator named ``curvature`` of ``(model, loss_fn, data)``.

    ============================  =========================================================
    ``"hessian"``                 :class:`HessianOperator`: ``d^2 L / d theta^2``
    ``"ggn"``                     :class:`GGNOperator`: ``J^T H_out J``
    ``"fisher_exact"``            :class:`FisherOperator` ``kind="exact"``:
                                  ``J^T E_{y~p(y|f)}[r r^T] J`` (= GGN for MSE/CE/BCE)
    ``"fisher_mc"``               ``kind="mc"``: targets sampled from the model
                                  (``num_samples``, ``generator``)
    ``"fisher_empirical"``        ``kind="empirical"``: ``r`` at the observed targets, per
                                  row (per token for cross-entropy over sequences)
    ============================  =========================================================

    Args:
        curvature: one of the names above (or a :class:`Curvature`).
        model, loss_fn, data: see :class:`hesse.Objective` (``loss_fn=None``: the loss a
            Hugging Face model trains with).
        **kwargs: passed to the operator (``params``, ``batch_adapter``,
            ``output_adapter``, ``cache_graph``, ``micro_batch_size``, ...; ``num_samples``
            and ``generator`` for ``"fisher_mc"``; ``mode`` for ``"hessian"``).

    Example:
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> X = torch.eye(3, dtype=torch.float64)
        >>> H = curvature_operator("hessian", model, nn.MSELoss(reduction="sum"), (X, X[:, :1]))
        >>> H.to_dense()  # 2 X^T X
        tensor([[2., 0., 0.],
                [0., 2., 0.],
                [0., 0., 2.]], dtype=torch.float64)
    """
    name = check_choice(curvature, "curvature", CURVATURES)
    if name == "hessian":
        return HessianOperator(model, loss_fn, data, **kwargs)
    if name == "ggn":
        return GGNOperator(model, loss_fn, data, **kwargs)
    return FisherOperator(model, loss_fn, data, kind=name.removeprefix("fisher_"), **kwargs)
