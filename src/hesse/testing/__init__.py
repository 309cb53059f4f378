"""Public test kit: dense references and operator conformance checks."""

from .checks import check_operator, dense_ggn, dense_hessian

__all__ = ["check_operator", "dense_ggn", "dense_hessian"]
