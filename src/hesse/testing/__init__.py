"""Public test kit: dense references and operator conformance checks."""

from .checks import check_operator, dense_ggn, dense_hessian

__all__ = ["check_operator", "dense_ggn", "dense_hessian"]

from .optim import (  # noqa: E402
    QuadraticModule,
    check_optimizer,
    make_least_squares_problem,
    make_mlp_problem,
    poison,
)
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
    "make_least_squares_problem",
    "make_mlp_problem",
    "mgh_problems",
    "minimize",
    "poison",
    "rosenbrock",
]
