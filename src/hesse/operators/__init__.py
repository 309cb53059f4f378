"""Linear operators: the lazy algebra and the curvature operators of a model."""

from .base import (
    DenseOperator,
    DiagonalOperator,
    IdentityOperator,
    LinearOperator,
    LowRankOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
    aslinearoperator,
)
from .curvature import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator, SubOperator
from .function import FunctionHessianOperator, hessian_of
from .kfac import KFACOperator

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "FisherOperator",
    "FunctionHessianOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "LinearOperator",
    "LowRankOperator",
    "ProductOperator",
    "ScaledOperator",
    "SubOperator",
    "SumOperator",
    "aslinearoperator",
    "hessian_of",
]
