"""Deep autoencoder on digits: K-FAC and Shampoo vs Adam (issue 8).

The Martens (2010) deep-autoencoder benchmark scaled down: a 64-128-32-128-64 tanh
autoencoder on the 1437 standardised training digits (8x8), MSE reconstruction loss,
full-batch, float32, one thread. Protocol:

1. Adam with a small lr grid runs 1000 steps each; the best final training loss is the
   target.
2. K-FAC (``hesse.optim.KFAC``, true Fisher by sampling) and Shampoo (``hesse.optim.Shampoo``,
   Adam grafting) run until their training loss first reaches the target (cap 1000 steps).
3. Wall time: ``--repeats`` interleaved rounds (Adam best lr, K-FAC, Shampoo), each timed to
   its first hit of the target (Adam: its whole run if it only gets there at the end); the
   table reports medians and ratios measured in the same run.

Usage::

    python benchmarks/optimizers_kfac.py            # full protocol, ~3-5 min on one core
    python benchmarks/optimizers_kfac.py --quick    # smaller grid, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from hesse.data.digits import load_digits_tensors
from hesse.optim import KFAC, Shampoo

WIDTHS = (64, 128, 32, 128, 64)


def make_autoencoder(seed: int = 0) -> nn.Sequential:
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(WIDTHS) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(g)


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, **kw):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), **kw)
    if name == "kfac":
        return KFAC(model, loss_fn, generator=torch.Generator().manual_seed(0), **kw)
    if name == "shampoo":
        return Shampoo(model.parameters(), **kw)
    raise ValueError(name)


def run(name: str, X: torch.Tensor, steps: int, target: float | None = None, **kw) -> dict:
    """Train from the fixed init; stop at the first loss <= target. Returns history/timing."""
    model = make_autoencoder()
    loss_fn = nn.MSELoss()
    opt = make_optimizer(name, model, loss_fn, **kw)
    history = []
    hit = None
    t0 = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), X)
        loss.backward()
        opt.step()
        value = float(loss.detach())  # one sync per step, the same for every method
        history.append(value)
        if target is not None and value <= target:
            hit = i + 1
            break
    elapsed = time.perf_counter() - t0
    return {"history": history, "hit": hit, "time": elapsed, "final": history[-1]}


KFAC_CONFIG = dict(lr=0.3, momentum=0.9, damping=1e-2, kl_clip=1e-2, inverse_update_interval=10)
SHAMPOO_CONFIG = dict(lr=5e-3, momentum=0.9, epsilon=1e-7, update_interval=10, grafting="adam")


def factor_error() -> dict:
    """Relative Frobenius error of K-FAC layer blocks vs the exact GGN blocks (digits MLP)."""
    import hesse
    from hesse.data.digits import default_workload, make_mlp

    (X, y), _ = load_digits_tensors(torch.float64)
    models = {
        "init": make_mlp(dtype=torch.float64),
        "trained (300 Adam steps)": default_workload(dtype=torch.float64).model,
    }
    out = {}
    for label, model in models.items():
        for N in (1, len(y)):
            data = (X[:N], y[:N])
            K = hesse.KFACOperator(model, nn.CrossEntropyLoss(), data)
            G = hesse.GGNOperator(model, nn.CrossEntropyLoss(), data)
            errs = {}
            for layer in ("0", "2"):
                kb, gb = K.block(layer).to_dense(), G.block(layer).to_dense()
                errs[layer] = float((kb - gb).norm() / gb.norm())
            out[f"{label}, N={N}"] = errs
            print(
                f"digits MLP 64-32-10 {label}, N={N}: "
                + ", ".join(f"layer {k}: {v:.3g}" for k, v in errs.items())
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument(
        "--factor-error",
        action="store_true",
        help="only print the K-FAC vs exact GGN block errors (digits MLP, float64)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.factor_error:
        return factor_error()
    (X, _), _ = load_digits_tensors(torch.float32)
    grid = [1e-2, 2e-2] if args.quick else [3e-3, 1e-2, 2e-2, 3e-2]
    repeats = 1 if args.quick else args.repeats

    print(
        f"# deep autoencoder {'-'.join(map(str, WIDTHS))} tanh, MSE, digits N={len(X)}, "
        f"full batch, float32, 1 thread"
    )
    adam = {}
    for lr in grid:
        r = run("adam", X, args.steps, lr=lr)
        adam[lr] = r
        print(f"adam lr={lr:g}: loss after {args.steps} steps {r['final']:.5f} ({r['time']:.1f} s)")
    best_lr = min(adam, key=lambda k: adam[k]["final"])
    target = adam[best_lr]["final"]
    print(f"target = Adam(lr={best_lr:g}) loss after {args.steps} steps = {target:.5f}")

    times: dict[str, list[float]] = {"adam": [], "kfac": [], "shampoo": []}
    steps: dict[str, int | None] = {}
    finals: dict[str, float] = {}
    configs = {"adam": {"lr": best_lr}, "kfac": KFAC_CONFIG, "shampoo": SHAMPOO_CONFIG}
    for rep in range(repeats):
        for name in ("adam", "kfac", "shampoo"):
            r = run(name, X, args.steps, target=target, **configs[name])
            times[name].append(r["time"])
            steps[name] = r["hit"]
            finals[name] = r["final"]
        print(
            f"round {rep + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items())
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print("| optimizer | config | steps to target | time to target (median) | time / Adam |")
    print("|---|---|---|---|---|")
    for name in ("adam", "kfac", "shampoo"):
        cfg = ", ".join(f"{k}={v}" for k, v in configs[name].items())
        st = steps[name] if steps[name] is not None else f"not reached ({finals[name]:.5f})"
        print(f"| {name} | {cfg} | {st} | {med[name]:.2f} s | {med[name] / med['adam']:.2f} |")
    result = {
        "target": target,
        "adam_grid": {str(k): v["final"] for k, v in adam.items()},
        "best_lr": best_lr,
        "steps_to_target": steps,
        "median_time": med,
        "times": times,
        "configs": {k: {kk: vv for kk, vv in v.items()} for k, v in configs.items()},
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
