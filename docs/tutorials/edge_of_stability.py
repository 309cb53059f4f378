# %% [markdown]
# # Edge of stability
#
# Gradient descent with step size `eta` is stable on the local quadratic model of the loss
# only while `eta * lambda_max < 2`. Cohen et al. (ICLR 2021) observed that full-batch
# gradient descent on neural networks first *sharpens* (`lambda_max` grows) until it reaches
# `2 / eta`, and then hovers at that edge while the loss keeps falling, non-monotonically.
#
# `hesse.SharpnessTracker` measures this during training. It builds the curvature operator
# once on a fixed measurement batch and warm-starts every Lanczos run from the previous top
# eigenvector, so a check after the first costs only a few Hessian-vector products.

# %%
import warnings

import torch
from torch import nn

import hesse
import hesse.plot
from hesse.analysis import EdgeOfStabilityWarning
from hesse.data import load_digits_tensors, make_mlp

torch.set_num_threads(1)
(X, y), _ = load_digits_tensors(seed=0)
X, y = X[:200], y[:200]  # a small full batch keeps this tutorial a few seconds
Y = nn.functional.one_hot(y, 10).to(X.dtype)  # MSE on one-hot targets, as in Cohen et al.
loss_fn = nn.MSELoss()

# %% [markdown]
# One run per learning rate, from the same initialisation. The tracker reads the learning
# rate from the optimizer and records `lambda_max`, the ratio `eta * lambda_max / 2` and the
# loss every 10 steps.

# %%
runs = {}
for lr in (0.5, 1.0, 2.0, 3.0):
    model = make_mlp((64, 32, 10), "tanh", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = hesse.SharpnessTracker(
        model,
        loss_fn,
        (X, Y),
        every=10,
        optimizer=opt,
        generator=torch.Generator().manual_seed(0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeOfStabilityWarning)  # we expect to cross it
        for _ in range(600):
            opt.zero_grad()
            loss_fn(model(X), Y).backward()
            opt.step()
            tracker.step()
    runs[f"lr={lr:g}"] = tracker

print(
    f"{'run':>7} {'2/lr':>6} {'first lam':>9} {'last lam':>8} {'max ratio':>9} "
    f"{'2nd-half ratio':>14} {'HVP/check':>9} {'loss':>8}"
)
for name, tr in runs.items():
    h = tr.history
    ratios = torch.tensor([r.ratio for r in h])
    second = ratios[len(ratios) // 2 :]
    print(
        f"{name:>7} {2 / h[0].lr:6.3f} {h[0].lambda_max:9.3f} {h[-1].lambda_max:8.3f} "
        f"{float(ratios.max()):9.3f} {float(second.mean()):8.3f} +- {float(second.std()):.3f} "
        f"{tr.mean_matvecs_after_first():9.1f} {h[-1].loss:8.4f}"
    )

# %% [markdown]
# With the small learning rates the sharpness rises and stays below the limit
# (ratio < 1). With `lr = 2` it sharpens up to `2 / lr`, overshoots once (the loss spikes)
# and then hovers at the edge; `lr = 3` starts almost at its limit and stays there. In both,
# the ratio over the second half of training is 1 to within a few percent. After the first check
# each measurement costs only a handful of Hessian-vector products (`HVP/check`).

# %%
hesse.plot.plot_sharpness(runs)

# %% [markdown]
# The history is plain data: `tracker.records()` is a list of dicts, `tracker.to_csv(path)`
# and `tracker.to_json(path)` write it (and with `csv_path=` the tracker rewrites the file
# after every check, so an interrupted run keeps what it measured).

# %%
runs["lr=2"].records()[-1]
