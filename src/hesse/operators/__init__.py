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
from .factory import Curvature, curvature_operator
from .function import FunctionHessianOperator, hessian_of
from .kfac import KFACOperator

__all__ = [
    "Curvature",
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
    "curvature_operator",
    "hessian_of",
]
