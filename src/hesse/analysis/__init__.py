"""Analyses composed from operators and linalg results (never re-implementing algorithms)."""

from .landscape import (
    LossSlice,
    LossSurface2D,
    loss_slice,
    loss_surface_2d,
    perturbed_parameters,
    random_direction,
)
from .saddle import EscapeStep, NegativeCurvature, detect_negative_curvature, escape_step
from .sharpness import (
    FlatnessMetrics,
    SharpnessResult,
    adaptive_sharpness,
    curvature_operator,
    curvature_trace,
    epsilon_sharpness,
    flatness_metrics,
    lambda_max,
)
from .tracker import (
    EdgeOfStabilityWarning,
    SharpnessRecord,
    SharpnessTracker,
    adam_preconditioner,
    lightning_callback,
)
from .preflight import AllocationTracker, PreflightEstimate, estimate, process_memory

__all__: list[str] = [
    "AllocationTracker",
    "PreflightEstimate",
    "estimate",
    "process_memory",
    "LossSlice",
    "LossSurface2D",
    "loss_slice",
    "loss_surface_2d",
    "perturbed_parameters",
    "random_direction",
    "FlatnessMetrics",
    "SharpnessResult",
    "adaptive_sharpness",
    "curvature_operator",
    "curvature_trace",
    "epsilon_sharpness",
    "flatness_metrics",
    "lambda_max",
    "EdgeOfStabilityWarning",
    "SharpnessRecord",
    "SharpnessTracker",
    "adam_preconditioner",
    "lightning_callback",
    "EscapeStep",
    "NegativeCurvature",
    "detect_negative_curvature",
    "escape_step",
]
