# %% [markdown]
# # Curvature of a language model
#
# hesse ships a small language model so that this runs anywhere, offline: a pre-norm causal
# transformer (4 blocks, `d_model = 64`, 4 heads, 208,000 parameters) trained on characters
# of the docstrings of Python's standard library, with its weights in the package.
# `lm_workload()` loads it in about a second; its loss is `TokenCrossEntropy`, the mean
# cross-entropy over all `(B, T)` positions of `(B, T, V)` logits.
#
# We take the curvature of its training loss on a small fixed sample of sequences, compare
# the Hessian with the Gauss-Newton, and look at the spectrum block by block.

# %%
import torch

import hesse
import hesse.plot
from hesse.analysis import block_spectra
from hesse.data import lm_workload

torch.set_num_threads(1)
w = lm_workload(num_train=2, num_test=64)  # 2 training sequences of 64 characters
X, y = w.train
n = sum(p.numel() for p in w.model.parameters())
print(f"{w.name}: {n} parameters, analysis batch {tuple(X.shape)} -> logits (B, T, V)")
print(
    f"held-out loss {w.loss():.3f} nats/char (unigram baseline {w.unigram_loss():.3f}), "
    f"next-character accuracy {w.accuracy():.3f}"
)

# %% [markdown]
# ## Hessian and Gauss-Newton at the top
#
# The operators take the model, its loss and the batch as for any other model; double
# backward through attention works because hesse selects PyTorch's math attention kernel
# inside its products (the fused CPU kernel has no second derivative).

# %%
gen = torch.Generator().manual_seed(0)
H = hesse.HessianOperator(w.model, w.loss_fn, w.train)
G = hesse.curvature_operator("ggn", w.model, w.loss_fn, w.train)
top_h = hesse.top_eigenpairs(H, k=3, tol=1e-2, generator=gen)
top_g = hesse.top_eigenpairs(G, k=3, tol=1e-2, generator=gen)
print(
    "Hessian top-3:",
    [f"{v:.4g}" for v in top_h.eigenvalues.tolist()],
    f"({top_h.num_matvecs} products)",
)
print(
    "GGN     top-3:",
    [f"{v:.4g}" for v in top_g.eigenvalues.tolist()],
    f"({top_g.num_matvecs} products)",
)
print(f"gradient-descent speed limit 2 / lambda_max = {2 / top_h.eigenvalues[0]:.3g}")

# %% [markdown]
# ## The spectrum block by block
#
# `block_spectra` estimates, for each diagonal block of the Hessian (here the attention
# value and the MLP output weight matrices of the first and the last transformer block), its top
# eigenvalue, its trace and its spectral density, and then the Jensen-Shannon distance
# between the block densities. Tiny budgets keep this tutorial fast: two SLQ probes of ten
# steps per block.

# %%
names = [f"blocks.{i}.{m}.weight" for i in (0, 3) for m in ("attn.v", "mlp.fc2")]
bs = block_spectra(H, blocks=names, num_probes=2, num_steps=10, tol=1e-2, generator=gen)
print(f"{'block':>22} {'n':>6} {'lambda_max':>10} {'trace':>16}")
for b in bs.blocks:
    print(f"{b.name:>22} {b.n:6d} {b.lambda_max:10.4g} {b.trace:9.3g} +- {b.trace_stderr:.2g}")
print(f"mean pairwise JS distance between block densities: {bs.mean_js:.3f}")
print(f"products with the full Hessian, all blocks: {bs.num_matvecs}")

# %%
bs.plot()

# %% [markdown]
# The blocks of one network differ by more than an order of magnitude in curvature, and the
# first transformer block is far sharper than the last. The top eigenvalue of the whole
# Hessian is several times that of any of these blocks: the sharpest direction couples
# blocks (and involves the embeddings, which are left out here). One learning rate for all
# parameters is limited by that coupled direction. `benchmarks/lm.py` runs this analysis on
# every block with larger budgets; `hesse analyze` takes any model and data from the
# command line (see [Reading the report](../guide/report.md)).
