"""Hessian-aware compression: pruning (OBD/OBS) and quantization.

Saliencies (:mod:`hesse.compress.saliency`) are computed apart from any mutation; :func:`prune`
and :func:`quantize` then change the model in place.

Example:
    >>> from hesse.data import default_workload
    >>> w = default_workload(widths=(64, 128, 10), activation="relu")   # doctest: +SKIP
    >>> masks = prune(w.model, w.loss_fn, w.train, 0.7, method="obs")   # doctest: +SKIP
    >>> sens = layer_sensitivity(w.model, w.loss_fn, w.train, bits=(2, 4, 8))  # doctest: +SKIP
    >>> alloc = allocate_bits(sens, average_bits=4.0)                    # doctest: +SKIP
    >>> quantize(w.model, w.train, alloc.bits, method="obs").layer_error  # doctest: +SKIP

Large models (SparseGPT-style, each layer's reconstruction Hessian ``2 X^T X`` from forward
hooks, no loss curvature): ``prune(model, None, calib, 0.5, curvature="layerwise",
scope="layer")``.

On the command line: ``hesse compress --out DIR`` (see :func:`compression_report`);
``hesse compress --workload lm`` for the shipped language model (test perplexity).
"""

from .prune import PruneMethod, prune, prune_layer_obs, sparsity_of
from .quantize import (
    QuantizeResult,
    QuantMethod,
    inverse_cholesky,
    layer_hessians,
    layer_inputs_hessian,
    quantization_grid,
    quantize,
    quantize_obs,
    quantize_rtn,
)
from .report import CompressionReport, compression_report, evaluate
from .saliency import (
    WeightRef,
    compressible_weights,
    curvature_blocks,
    curvature_diagonal,
    magnitude_saliency,
    obd_saliency,
    obs_saliency,
    obs_single_update,
)
from .sensitivity import (
    BitAllocation,
    SensitivityResult,
    allocate_bits,
    layer_sensitivity,
    spearman,
)

__all__ = [
    "BitAllocation",
    "CompressionReport",
    "compression_report",
    "evaluate",
    "PruneMethod",
    "QuantMethod",
    "QuantizeResult",
    "SensitivityResult",
    "allocate_bits",
    "inverse_cholesky",
    "layer_hessians",
    "layer_inputs_hessian",
    "layer_sensitivity",
    "quantization_grid",
    "quantize",
    "quantize_obs",
    "quantize_rtn",
    "spearman",
    "WeightRef",
    "compressible_weights",
    "curvature_blocks",
    "curvature_diagonal",
    "magnitude_saliency",
    "obd_saliency",
    "obs_saliency",
    "obs_single_update",
    "prune",
    "prune_layer_obs",
    "sparsity_of",
]
