# %% [markdown]
# # Loss landscape of a trained network
#
# We train the default workload (a 64-32-10 tanh MLP on scikit-learn's digits, `n = 2410`
# parameters), then look at the curvature of its training loss around the trained weights:
# the top of the Hessian spectrum, the whole spectral density, and slices of the loss along
# the sharpest directions next to their quadratic model. Everything here is matrix-free: the
# Hessian is never formed.

# %%
import torch

import hesse
import hesse.plot
from hesse.analysis import loss_slice, loss_surface_2d
from hesse.data import default_workload

torch.set_num_threads(1)
w = default_workload()  # deterministic: 300 full-batch Adam steps from seed 0
X, y = w.train
print(f"{w.name}: {X.shape[0]} training samples, test accuracy {w.accuracy():.3f}")

# %% [markdown]
# ## The top of the spectrum
#
# `HessianOperator` binds model, loss and data into the Hessian of the *mean* training loss
# over all `N` samples. `top_eigenpairs` runs thick-restart Lanczos; every product `H @ v`
# costs about two gradient evaluations.

# %%
H = hesse.HessianOperator(w.model, w.loss_fn, w.train)
gen = torch.Generator().manual_seed(0)
top = hesse.top_eigenpairs(H, k=5, generator=gen)
low = hesse.top_eigenpairs(H, k=1, which="smallest", generator=gen)
print("top-5 eigenvalues:", [f"{v:.4g}" for v in top.eigenvalues.tolist()])
print(f"lambda_min: {low.eigenvalues[0]:.3g}   converged: {top.converged and low.converged}")
print(f"Hessian-vector products used: {top.num_matvecs + low.num_matvecs}")

# %% [markdown]
# A negative `lambda_min` far smaller in magnitude than `lambda_max` is the usual picture
# after training: the loss is nearly flat, slightly non-convex, in most directions. The
# learning-rate "speed limit" of gradient descent on the local quadratic model is
# `2 / lambda_max`, and the critical-point classifier says whether the gradient is small
# enough for the eigenvalues to mean "minimum" at all:

# %%
bound = hesse.max_stable_lr(H, generator=gen)
crit = hesse.classify_critical_point(H, generator=gen)
print(f"2 / lambda_max = {bound.value:.4g}")
print(f"critical point: {crit.kind}")
print(f"gradient norm {crit.gradient_norm:.2g} vs grad_tol {crit.grad_tol:g}")

# %% [markdown]
# ## The spectral density
#
# Stochastic Lanczos quadrature (SLQ) estimates the whole eigenvalue density from a few
# random probes. Deflating the top eigenpairs found above removes the outliers from the
# probes so the bulk is resolved better. The band is the spread across probes.

# %%
dens = hesse.spectral_density(H, num_probes=3, num_steps=40, deflate=top, generator=gen)
print(dens)
hesse.plot.plot_spectral_density(dens, outliers=top)

# %% [markdown]
# ## One-dimensional slices
#
# `loss_slice` evaluates the exact loss on a line `theta_0 + alpha d` and the quadratic
# model `L0 + alpha g.d + alpha^2 / 2 d^T H d` built from one gradient and one Hessian
# product. Along the top eigenvector (unit norm) the model is good near `alpha = 0`; a
# filter-normalised random direction (Li et al., 2018; as long as the weights themselves)
# shows how flat the landscape is in a typical direction.

# %%
s_top = loss_slice(w.model, w.loss_fn, w.train, "top", radius=3.0, num_points=31, generator=gen)
s_rnd = loss_slice(w.model, w.loss_fn, w.train, "random", radius=1.0, num_points=31, generator=gen)
for s in (s_top, s_rnd):
    print(
        f"{s.direction_kind:>6}: |d| = {s.direction_norm:6.2f}, d^T H d = {s.curvature:.4g}, "
        f"max |loss - quadratic| = {s.max_quadratic_error:.3g}"
    )
hesse.plot.plot_loss_slice(s_top)

# %% [markdown]
# The quadratic model holds for `|alpha|` up to about 0.5; beyond that the loss rises far
# faster than `lambda_max alpha^2 / 2`: the cross-entropy of a confident classifier grows
# almost linearly once predictions start to flip, so the second-order picture is a local
# one. The random direction has the length of the weights themselves (`|d|` above), and
# its curvature per unit length, `d^T H d / |d|^2`, is a tiny fraction of `lambda_max`:
# most directions are nearly flat.

# %%
hesse.plot.plot_loss_slice(s_rnd)

# %% [markdown]
# ## A two-dimensional slice
#
# The plane spanned by the two top eigenvectors, next to its quadratic model on the same
# colour levels: where the two panels differ, the second-order Taylor model has stopped
# describing the loss.

# %%
surf = loss_surface_2d(w.model, w.loss_fn, w.train, "top", radius=3.0, num_points=15, generator=gen)
print("eigenvalues of the plane:", [f"{v:.4g}" for v in surf.eigenvalues.tolist()])
hesse.plot.plot_loss_surface_2d(surf)

# %% [markdown]
# ## Hessian or Gauss-Newton?
#
# The generalised Gauss-Newton `G = J^T H_L J` drops the second derivatives of the network
# and is positive semi-definite. Near a minimum of a well-fit model the two are close at the
# top of the spectrum; see [Which curvature?](../guide/curvature.md) for when they differ.

# %%
G = hesse.GGNOperator(w.model, w.loss_fn, w.train)
top_g = hesse.top_eigenpairs(G, k=5, generator=gen)
for h, g in zip(top.eigenvalues.tolist(), top_g.eigenvalues.tolist()):
    print(f"Hessian {h:.4g}   GGN {g:.4g}")
