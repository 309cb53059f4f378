"""hesse: the Hessian in deep learning, for PyTorch.

Exact curvature products (Hessian, GGN, Fisher) as matrix-free linear operators, the spectral
toolkit on top of them, second-order optimizers, Hessian-aware compression and sharpness
tracking.
"""

from ._checks import NonFiniteError
from .objective import Objective
from .operators import (
    CurvatureOperator,
    DenseOperator,
    DiagonalOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    KFACOperator,
    LinearOperator,
    LowRankOperator,
    aslinearoperator,
    hessian_of,
)
from .linalg.diagonal import DiagonalResult, exact_diagonal, hutchinson_diagonal, xdiag
from .linalg.solve import CGResult, cg_solve, minres_solve
from .linalg.trace import TraceResult, hutchinson_trace, hutchpp_trace, trace, xtrace

__version__ = "0.1.0"

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "LinearOperator",
    "LowRankOperator",
    "NonFiniteError",
    "Objective",
    "__version__",
    "aslinearoperator",
    "hessian_of",
    "CGResult",
    "cg_solve",
    "minres_solve",
    "DiagonalResult",
    "TraceResult",
    "exact_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "trace",
    "xtrace",
    "xdiag",
]

from .linalg import (  # noqa: E402
    EigenResult,
    SpectralDensity,
    power_iteration,
    spectral_density,
    top_eigenpairs,
)

__all__ += [
    "EigenResult",
    "SpectralDensity",
    "power_iteration",
    "spectral_density",
    "top_eigenpairs",
]

from .analysis.tracker import SharpnessTracker  # noqa: E402

__all__ += ["SharpnessTracker"]

from .analysis.preflight import PreflightEstimate, estimate  # noqa: E402

__all__ += ["PreflightEstimate", "estimate"]

from .analysis.critical import (  # noqa: E402
    classify_critical_point,
    layer_max_stable_lr,
    max_stable_lr,
    stopping_rule,
)

__all__ += ["classify_critical_point", "layer_max_stable_lr", "max_stable_lr", "stopping_rule"]

from . import compress as compress  # noqa: E402  (hesse.compress.prune, quantize, ...)
