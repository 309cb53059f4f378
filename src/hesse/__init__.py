"""hesse: the Hessian in deep learning, for PyTorch.

Exact curvature products (Hessian, GGN, Fisher) as matrix-free linear operators, the spectral
toolkit on top of them, analyses (critical points, speed limits, sharpness), second-order
optimizers (:mod:`hesse.optim`), Hessian-aware compression (:mod:`hesse.compress`) and
plots (:mod:`hesse.plot`).
"""

__version__ = "0.1.0"

from . import compress as compress
from ._checks import NonFiniteError
from .analysis.blocks import BlockSpectra, block_spectra
from .analysis.critical import (
    classify_critical_point,
    layer_max_stable_lr,
    max_stable_lr,
    stopping_rule,
)
from .analysis.preflight import PreflightEstimate, estimate
from .analysis.tracker import SharpnessTracker
from .linalg import (
    CGResult,
    DiagonalResult,
    EigenResult,
    SpectralDensity,
    TraceResult,
    cg_solve,
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    minres_solve,
    power_iteration,
    spectral_density,
    top_eigenpairs,
    trace,
    xdiag,
    xtrace,
)
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
    curvature_operator,
    hessian_of,
)
from .report import load_report

__all__ = [
    "BlockSpectra",
    "CGResult",
    "CurvatureOperator",
    "DenseOperator",
    "DiagonalOperator",
    "DiagonalResult",
    "EigenResult",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "LinearOperator",
    "LowRankOperator",
    "NonFiniteError",
    "Objective",
    "PreflightEstimate",
    "SharpnessTracker",
    "SpectralDensity",
    "TraceResult",
    "__version__",
    "aslinearoperator",
    "block_spectra",
    "cg_solve",
    "classify_critical_point",
    "compress",
    "curvature_operator",
    "estimate",
    "exact_diagonal",
    "hessian_of",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "layer_max_stable_lr",
    "load_report",
    "max_stable_lr",
    "minres_solve",
    "power_iteration",
    "spectral_density",
    "stopping_rule",
    "top_eigenpairs",
    "trace",
    "xdiag",
    "xtrace",
]
