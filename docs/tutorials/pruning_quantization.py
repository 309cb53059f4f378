# %% [markdown]
# # OBS pruning and quantization
#
# Which weights can go? Magnitude pruning removes the smallest `|w_q|`. Optimal Brain Damage
# (LeCun et al., 1990) scores a weight by the loss increase its removal costs on the
# quadratic model with a diagonal curvature, `H_qq w_q^2 / 2`. Optimal Brain Surgeon
# (Hassibi & Stork, 1993) uses the full (block) inverse curvature, scores
# `w_q^2 / (2 [H^-1]_qq)` and *updates the remaining weights* to compensate. The same idea
# applied to rounding instead of zeroing is layer-wise OBS quantization (GPTQ).
#
# `hesse.compress` computes saliencies apart from any change to the model; `prune` and
# `quantize` then change the model in place, so we work on copies.

# %%
import copy

import torch

from hesse.compress import (
    allocate_bits,
    evaluate,
    layer_sensitivity,
    prune,
    quantize,
    sparsity_of,
)
from hesse.data import default_workload

torch.set_num_threads(1)
w = default_workload()
base = evaluate(w.model, w.loss_fn, w.test)
print(f"dense model: test loss {base['loss']:.3f}, accuracy {base['accuracy']:.3f}")

# %% [markdown]
# ## Pruning: magnitude vs OBD vs OBS
#
# One shot, global scope, no fine-tuning afterwards. OBD and OBS use the generalised
# Gauss-Newton of the training loss (`curvature="ggn"`, PSD, so the scores are
# non-negative); OBS removes weights in `num_steps` rounds inside blocks of 128 weights of a
# row, updating the survivors after each round.

# %%
print(f"{'sparsity':>8} {'method':>9} {'test loss':>9} {'accuracy':>8}")
for sparsity in (0.7, 0.85):
    for method in ("magnitude", "obd", "obs"):
        m = copy.deepcopy(w.model)
        prune(m, w.loss_fn, w.train, sparsity, method=method)
        ev = evaluate(m, w.loss_fn, w.test)
        achieved = sparsity_of(m)["global"]
        print(f"{achieved:8.2f} {method:>9} {ev['loss']:9.3f} {ev['accuracy']:8.3f}")

# %% [markdown]
# On this model OBD's diagonal does no better than magnitude: it ignores the strong
# correlations between the weights of a layer. OBS, with the block inverse and its update of
# the surviving weights, keeps clearly more accuracy at both sparsities.
#
# ## Quantization: round-to-nearest vs OBS
#
# `quantize(model, data, bits)` replaces every Linear weight by its values on a per-row
# `bits`-bit grid (fake quantization). `"obs"` minimises each layer's output error on the
# calibration inputs, `||(W - Q) X^T||^2`, with the layer-input Hessian `2 X^T X`.

# %%
print(f"{'bits':>4} {'method':>6} {'test loss':>9} {'accuracy':>8}  layer output error")
for bits in (2, 3):
    for method in ("rtn", "obs"):
        m = copy.deepcopy(w.model)
        q = quantize(m, w.train, bits, method=method)
        ev = evaluate(m, w.loss_fn, w.test)
        errs = ", ".join(f"{k}: {v:.3f}" for k, v in q.layer_error.items())
        print(f"{bits:4d} {method:>6} {ev['loss']:9.3f} {ev['accuracy']:8.3f}  {errs}")

# %% [markdown]
# OBS cuts each layer's output error severalfold against round-to-nearest at the same bits;
# on this small, well-conditioned model that buys little test accuracy (differences of a few
# test samples), the output error is the quantity the method optimises.
#
# ## Mixed precision from the Hessian trace
#
# Not all layers are equally sensitive. HAWQ-v2 scores layer `l` at `b` bits by its mean
# Hessian trace times the squared rounding perturbation,
# `tr(H_ll) / n_l * ||Q_b(W_l) - W_l||^2`; `allocate_bits` then picks, exactly, the
# assignment of bits per layer with the smallest total score under a size budget.

# %%
sens = layer_sensitivity(
    w.model, w.loss_fn, w.train, bits=(2, 3, 4, 8), generator=torch.Generator().manual_seed(0)
)
for layer in sens.layers:
    print(f"{layer}: n = {sens.num_weights[layer]}, mean trace = {sens.mean_trace[layer]:.3g}")
alloc = allocate_bits(sens, average_bits=2.5)
print("bits per layer:", alloc.bits, f"({alloc.size_bits} bits in all)")
m = copy.deepcopy(w.model)
quantize(m, w.train, alloc.bits, method="obs")
ev = evaluate(m, w.loss_fn, w.test)
print(
    f"mixed precision, average 2.5 bits, OBS: test loss {ev['loss']:.3f}, "
    f"accuracy {ev['accuracy']:.3f}"
)

# %% [markdown]
# The same pipeline, with a JSON report and plots, is one command:
# `hesse compress --out DIR` (see `hesse compress --help`).
#
# ## Large models: layer-wise OBS
#
# The loss curvature blocks above cost per-sample Jacobians (GGN rows grow with samples x
# outputs, `N x T x V` for a language model). For large models OBS also runs on each layer's
# *reconstruction* Hessian `H = 2 X^T X` of its calibration inputs, collected by forward hooks
# (the same `H` as `quantize(method="obs")`): `prune(model, None, data, 0.5, method="obs",
# curvature="layerwise", scope="layer")` (SparseGPT, Frantar & Alistarh 2023; the per-layer
# solver is `prune_layer_obs`). It minimises every layer's output error on the calibration data,
# not the loss, so it prunes each layer to the sparsity (no global ranking). A weight tied
# between an embedding and the output layer is compressed once, with the relative output
# errors of both uses (`layer_inputs_hessian`).
#
# On the shipped language model, `hesse compress --workload lm --out DIR` quantizes every
# Linear layer and the tied embedding to 4 and 3 bits and prunes them to 50% per layer
# (magnitude vs layer-wise OBS), calibrated on 128 training windows, and reports the test
# perplexity of each against the float model (`benchmarks/README.md` has the table).
