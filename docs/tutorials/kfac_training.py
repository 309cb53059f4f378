# %% [markdown]
# # K-FAC training
#
# K-FAC (Martens & Grosse, 2015) approximates each layer's block of the Fisher (equivalently,
# for these losses, the generalised Gauss-Newton) by a Kronecker product `A ⊗ G` of two small
# matrices: `A` from the layer's inputs, `G` from the gradients at its outputs. Inverting it
# costs two small eigendecompositions per layer instead of one of size `n`. hesse offers it
# two ways:
#
# * `hesse.optim.KFAC(model, loss_fn, lr=...)`: a `torch.optim.Optimizer` (momentum SGD on
#   the K-FAC direction);
# * `hesse.optim.KFACPreconditioner(model, loss_fn)`: rewrites `p.grad` in place between
#   `loss.backward()` and `opt.step()`, so it works under *any* torch optimizer.
#
# `hesse.optim.Shampoo` is a standalone optimizer with a Kronecker-factored preconditioner
# of its own (from gradient statistics instead of the Fisher).
#
# We train the digits MLP with mini-batches and compare them with SGD and Adam, same budget.

# %%
import matplotlib.pyplot as plt
import torch
from torch import nn

from hesse.data import load_digits_tensors, make_mlp
from hesse.optim import KFAC, KFACPreconditioner, Shampoo

torch.set_num_threads(1)
(X, y), (X_test, y_test) = load_digits_tensors(seed=0)
loss_fn = nn.CrossEntropyLoss()
batches = list(zip(X.split(128), y.split(128)))  # fixed order: 12 mini-batches per epoch


def train(make_opt, epochs=6):
    """Train a fresh MLP (same initialisation each time); return the full-batch train losses."""
    model = make_mlp((64, 32, 10), "tanh", seed=0)
    opt, pre = make_opt(model)
    history = []
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            if pre is not None:
                pre.step()  # p.grad <- K-FAC preconditioned gradient
            opt.step()
        with torch.no_grad():
            history.append(float(loss_fn(model(X), y)))
    with torch.no_grad():
        acc = float((model(X_test).argmax(1) == y_test).double().mean())
    return history, acc


gen = torch.Generator().manual_seed(0)
setups = {
    "SGD (lr 0.1, momentum 0.9)": lambda m: (
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        None,
    ),
    "Adam (lr 1e-2)": lambda m: (torch.optim.Adam(m.parameters(), lr=1e-2), None),
    "KFAC (lr 0.02)": lambda m: (KFAC(m, loss_fn, lr=0.02, damping=3e-2, generator=gen), None),
    "SGD + KFACPreconditioner": lambda m: (
        torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9),
        KFACPreconditioner(m, loss_fn, damping=3e-2, generator=gen),
    ),
    "Shampoo (default)": lambda m: (Shampoo(m.parameters()), None),
}
results = {name: train(make) for name, make in setups.items()}
print(f"{'optimizer':>27} {'train loss after each epoch':>45} {'test acc':>8}")
for name, (hist, acc) in results.items():
    print(f"{name:>27} " + " ".join(f"{v:6.3f}" for v in hist) + f" {acc:8.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for name, (hist, _) in results.items():
    ax.semilogy(range(1, len(hist) + 1), hist, marker="o", label=name)
ax.set_xlabel("epoch (12 mini-batches of 128)")
ax.set_ylabel("full-batch training loss")
ax.legend(fontsize=8)
ax.set_title("Digits MLP 64-32-10: same initialisation, same batches")
fig

# %% [markdown]
# What to take away: per step, the two K-FAC variants drive the training loss down an order
# of magnitude faster than SGD and Adam, Shampoo about three times faster (test accuracy is
# about the same: on this small data set all of them fit it). The damping (`3e-2` here, with `lr = 0.02`) is the
# knob that matters: too small and the steps along low-curvature directions get noisy. The
# `KFAC` optimizer adapts it by default (`adapt_damping=5`: the Levenberg-Marquardt rule of
# Martens & Grosse, one extra forward pass every 5 steps); the preconditioner keeps it fixed.
# K-FAC's extra cost is a few small matrix products per layer per step (the optimizer
# refreshes its factors and their eigendecompositions every 20 steps,
# `factor_update_interval = inverse_update_interval = 20`; the preconditioner its factors
# every step and its eigendecompositions every 10). A tiny MLP is not
# a benchmark: `benchmarks/optimizers_kfac.py` compares both optimizers, with their default
# arguments, to AdamW on a transformer LM, a CNN and a deep autoencoder.
