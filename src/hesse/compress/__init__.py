"""Hessian-aware compression: pruning (OBD/OBS) and quantization.

Saliencies (:mod:`hesse.compress.saliency`) are computed apart from any mutation; :func:`prune`
and :func:`quantize` then change the model in place.
"""

from ._layers import WeightRef, compressible_weights
from .prune import PruneMethod, prune, sparsity_of
from .saliency import (
    curvature_blocks,
    curvature_diagonal,
    magnitude_saliency,
    obd_saliency,
    obs_saliency,
    obs_single_update,
)

__all__ = [
    "PruneMethod",
    "WeightRef",
    "compressible_weights",
    "curvature_blocks",
    "curvature_diagonal",
    "magnitude_saliency",
    "obd_saliency",
    "obs_saliency",
    "obs_single_update",
    "prune",
    "sparsity_of",
]
