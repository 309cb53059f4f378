"""Algorithms over linear operators (or dense tensors), returning frozen result objects."""

__all__: list[str] = []

from .diagonal import DiagonalResult, exact_diagonal, hutchinson_diagonal, xdiag  # noqa: E402
from .solve import CGResult, CGState, CGStatus, cg_solve, minres_solve  # noqa: E402
from .trace import (  # noqa: E402
    TraceMethod,
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    trace,
    xtrace,
)

__all__ += [
    "CGResult",
    "CGState",
    "CGStatus",
    "cg_solve",
    "minres_solve",
    "DiagonalResult",
    "TraceMethod",
    "TraceResult",
    "exact_diagonal",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "trace",
    "xtrace",
    "xdiag",
]

from .matrix_functions import matrix_inverse_root  # noqa: E402

__all__ += ["matrix_inverse_root"]

from ._results import EigenResult, SpectralDensity, Status  # noqa: E402
from .density import spectral_density  # noqa: E402
from .eigen import Criterion, Which, top_eigenpairs  # noqa: E402
from .lanczos import LanczosDecomposition, lanczos  # noqa: E402
from .power import power_iteration  # noqa: E402

__all__ += [
    "Criterion",
    "EigenResult",
    "LanczosDecomposition",
    "SpectralDensity",
    "Status",
    "Which",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "top_eigenpairs",
]
