"""Public test kit: dense references and operator conformance checks."""

from .checks import check_operator, dense_ggn, dense_hessian

__all__ = ["check_operator", "dense_ggn", "dense_hessian"]

from .optim import QuadraticModule, check_optimizer, make_mlp_problem  # noqa: E402
from .problems import (  # noqa: E402
    MinimizeResult,
    Problem,
    get_problem,
    himmelblau,
    mgh_problems,
    minimize,
    rosenbrock,
)

__all__ += [
    "MinimizeResult",
    "Problem",
    "QuadraticModule",
    "check_optimizer",
    "get_problem",
    "himmelblau",
    "make_mlp_problem",
    "mgh_problems",
    "minimize",
    "rosenbrock",
]
