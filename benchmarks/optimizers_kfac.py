"""K-FAC and Shampoo with their default arguments vs AdamW on three tasks (issues 8, 16).

Tasks (float32, one thread, ``torch.set_flush_denormal(True)``):

* ``lm``: the embedded LM workload's causal transformer (``hesse.data.lm``, 208k parameters)
  from its seed-0 *initialisation*; minibatches of 32 training windows (64 characters) drawn
  by a fixed generator, the same sequence for every optimizer; training loss = mean
  cross-entropy (nats/character) on a fixed subset of 64 training windows.
* ``cnn``: the ReLU CNN of ``benchmarks/lm.py`` (``make_cnn``, 241k parameters) on the 8x8
  digits, cross-entropy, minibatches of 128 training images (fixed generator); training loss
  on a fixed subset of 512 training images.
* ``autoencoder``: the Martens (2010) deep-autoencoder benchmark scaled down, a
  64-128-32-128-64 tanh autoencoder on the 1437 standardised training digits, MSE, full batch.

Protocol per task:

1. AdamW (torch defaults but ``lr``) runs ``--steps`` (500) steps from seed 0 for each lr of a
   3-point grid; the lr with the best final training loss is AdamW's lr for every seed.
2. For each of ``--seeds`` seeds (default 3; a seed sets the initialisation, the minibatch
   sequence and K-FAC's sampling generator), interleaved: AdamW at that lr runs ``--steps``
   steps and its final training loss is that seed's target; then
   ``hesse.optim.KFAC(model, loss_fn)`` and ``hesse.optim.Shampoo(params)`` with DEFAULT
   arguments (``--kfac`` / ``--shampoo`` override them, to explore) run until their training
   loss first reaches the target (cap: the same number of steps).
3. The training loss is measured every ``--eval-every`` steps, outside the clock. Time is the
   CPU time of the training thread (``time.thread_time``) of the steps up to the first
   measurement at or below the target. Per seed: steps to target and time / AdamW's time in
   the same seed; the table gives the medians over seeds and the per-seed values. Steps
   are deterministic per seed, but the first crossing of a noisy curve moves by tens of
   steps with rounding-level changes, hence the seeds.

Usage::

    python benchmarks/optimizers_kfac.py                # all three tasks, 3 seeds
    python benchmarks/optimizers_kfac.py --tasks autoencoder --kfac damping=1e-2
    python benchmarks/optimizers_kfac.py --quick        # tiny smoke run (seconds)
    python benchmarks/optimizers_kfac.py --factor-error # K-FAC vs exact GGN blocks
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hesse.data.digits import load_digits_tensors
from hesse.optim import KFAC, Shampoo

WIDTHS = (64, 128, 32, 128, 64)
OPTIMIZERS = ("adamw", "kfac", "shampoo")


def make_autoencoder(seed: int = 0, widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(g)


@dataclass
class Task:
    """One training problem: a fresh model per run, a fixed batch sequence, an eval set."""

    name: str
    description: str
    make_model: Callable[[], nn.Module]
    loss_fn: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    eval_data: tuple[torch.Tensor, torch.Tensor]
    adamw_grid: tuple[float, ...]
    seed: int = 0


def _minibatches(X, y, steps: int, batch_size: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        i = torch.randint(len(X), (batch_size,), generator=g)
        out.append((X[i], y[i]))
    return out


def lm_task(steps: int, quick: bool = False, seed: int = 0) -> Task:
    from hesse.data import lm

    cfg = lm.LMConfig(d_model=16, n_layers=1, n_heads=2, context=16) if quick else lm.LMConfig()
    X, y = lm.lm_sequences(lm.lm_corpus("train"), cfg.context)
    ev = torch.randperm(len(X), generator=torch.Generator().manual_seed(1))[:64]
    model = lm.CausalTransformer(cfg, seed=seed)
    n = sum(p.numel() for p in model.parameters())
    return Task(
        "lm",
        f"causal transformer d{cfg.d_model} l{cfg.n_layers} h{cfg.n_heads} t{cfg.context} "
        f"({n:,} params), minibatch 32 windows, eval 64 training windows",
        lambda: lm.CausalTransformer(cfg, seed=seed),
        lm.lm_loss(),
        _minibatches(X, y, steps, 32, seed),
        (X[ev], y[ev]),
        (1e-3, 3e-3, 1e-2),
        seed,
    )


def cnn_task(steps: int, quick: bool = False, seed: int = 0) -> Task:
    sys.path.insert(0, str(Path(__file__).parent))
    from lm import make_cnn

    (X, y), _ = load_digits_tensors(torch.float32)
    X = X.reshape(-1, 1, 8, 8)
    n = sum(p.numel() for p in make_cnn(0).parameters())
    return Task(
        "cnn",
        f"ReLU CNN make_cnn ({n:,} params), digits, minibatch 128, eval 512 training images",
        lambda: make_cnn(seed),
        nn.CrossEntropyLoss(),
        _minibatches(X, y, steps, 128, seed),
        (X[:512], y[:512]),
        (1e-3, 3e-3, 1e-2),
        seed,
    )


def autoencoder_task(steps: int, quick: bool = False, seed: int = 0) -> Task:
    (X, _), _ = load_digits_tensors(torch.float32)
    widths = (64, 16, 64) if quick else WIDTHS
    return Task(
        "autoencoder",
        f"{'-'.join(map(str, widths))} tanh autoencoder, MSE, digits N={len(X)}, full batch",
        lambda: make_autoencoder(seed, widths),
        nn.MSELoss(),
        [(X, X)] * steps,
        (X, X),
        (3e-3, 1e-2, 3e-2),
        seed,
    )


TASKS = {"lm": lm_task, "cnn": cnn_task, "autoencoder": autoencoder_task}


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, config: dict, seed: int = 0):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **config)
    if name == "kfac":
        with warnings.catch_warnings():  # LayerNorm parameters are trained first-order
            warnings.simplefilter("ignore")
            return KFAC(model, loss_fn, generator=torch.Generator().manual_seed(seed), **config)
    if name == "shampoo":
        return Shampoo(model.parameters(), **config)
    raise ValueError(name)


def evaluate(model: nn.Module, loss_fn: nn.Module, data) -> float:
    with torch.no_grad():
        return float(loss_fn(model(data[0]), data[1]))


def run(task: Task, name: str, config: dict, eval_every: int, target: float | None = None) -> dict:
    """Train a fresh model on ``task.batches``; stop at the first measured loss <= target.

    Returns ``history`` ([(step, training loss)]), ``hit`` (steps to target or ``None``),
    ``time`` (thread CPU seconds of the training steps up to the hit or the end), ``final``.
    """
    model = task.make_model()
    loss_fn = task.loss_fn
    opt = make_optimizer(name, model, loss_fn, config, task.seed)
    history = [(0, evaluate(model, loss_fn, task.eval_data))]
    hit, cpu = None, 0.0
    for step, (inputs, targets) in enumerate(task.batches, 1):
        t0 = time.thread_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        opt.step()
        cpu += time.thread_time() - t0
        if step % eval_every == 0 or step == len(task.batches):
            value = evaluate(model, loss_fn, task.eval_data)
            history.append((step, value))
            if value != value:  # NaN: diverged
                break
            if target is not None and value <= target:
                hit = step
                break
    return {"history": history, "hit": hit, "time": cpu, "final": history[-1][1]}


def parse_config(items: list[str]) -> dict:
    """``["lr=0.1", "kl_clip=None"]`` -> ``{"lr": 0.1, "kl_clip": None}``."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_task(make_task: Callable[[int], Task], configs: dict, eval_every: int, seeds: int) -> dict:
    """AdamW's lr from a grid on seed 0, then per seed: AdamW's target, KFAC and Shampoo."""
    task = make_task(0)
    steps = len(task.batches)
    print(f"\n# {task.name}: {task.description}, {steps} steps, loss every {eval_every}")
    grid = {}
    for lr in task.adamw_grid:
        r = run(task, "adamw", {"lr": lr}, eval_every)
        grid[lr] = r
        print(f"adamw lr={lr:g}: loss after {steps} steps {r['final']:.4f} ({r['time']:.1f} s)")
    best_lr = min(grid, key=lambda k: grid[k]["final"])
    print(f"AdamW lr = {best_lr:g} (best final loss on seed 0)")
    configs = {"adamw": {"lr": best_lr}, **configs}
    per_seed = []
    for seed in range(seeds):
        task = make_task(seed)
        ref = run(task, "adamw", configs["adamw"], eval_every)
        target = ref["final"]
        results = {"adamw": {**ref, "hit": steps}}
        for name in OPTIMIZERS[1:]:
            results[name] = run(task, name, configs[name], eval_every, target)
        per_seed.append({"seed": seed, "target": target, "results": results})
        print(
            f"seed {seed}: target {target:.4f}; "
            + ", ".join(
                f"{k} {r['hit'] if r['hit'] is not None else 'miss'} steps {r['time']:.1f} s"
                for k, r in results.items()
            )
        )
    rows = []
    for name in OPTIMIZERS:
        hits = [p["results"][name]["hit"] for p in per_seed]
        ratios = [p["results"][name]["time"] / p["results"]["adamw"]["time"] for p in per_seed]
        reached = [h for h in hits if h is not None]
        cfg = ", ".join(f"{k}={v}" for k, v in configs[name].items()) or "defaults"
        rows.append(
            {
                "task": task.name,
                "optimizer": name,
                "config": cfg,
                "steps_to_target": hits,
                # a miss counts as more steps than any hit (medians over seeds)
                "median_steps": statistics.median(h if h is not None else math.inf for h in hits),
                "reached": len(reached),
                "time": statistics.median(p["results"][name]["time"] for p in per_seed),
                "ratios": ratios,
                "ratio": statistics.median(ratios),
                "final": [p["results"][name]["final"] for p in per_seed],
                "history": [p["results"][name]["history"] for p in per_seed],
            }
        )
    return {
        "task": task.name,
        "description": task.description,
        "targets": [p["target"] for p in per_seed],
        "best_lr": best_lr,
        "adamw_grid": {str(k): v["final"] for k, v in grid.items()},
        "rows": rows,
    }


def print_table(results: list[dict]) -> None:
    print()
    print(
        "| task | optimizer | config | steps to target, median (per seed) | "
        "CPU time, median | time / AdamW, median (per seed) |"
    )
    print("|---|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            per = ", ".join("miss" if h is None else str(h) for h in row["steps_to_target"])
            med = row["median_steps"]
            med = "miss" if med == math.inf else f"{med:g}"
            ratios = ", ".join(f"{r:.2f}" for r in row["ratios"])
            print(
                f"| {row['task']} | {row['optimizer']} | {row['config']} | {med} ({per}) | "
                f"{row['time']:.1f} s | {row['ratio']:.2f} ({ratios}) |"
            )
    print()
    for res in results:
        grid = ", ".join(f"lr={k}: {v:.4f}" for k, v in res["adamw_grid"].items())
        targets = ", ".join(f"{t:.4f}" for t in res["targets"])
        print(f"{res['task']}: AdamW grid finals (seed 0): {grid}; targets per seed: {targets}")


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
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--quick", action="store_true", help="tiny models, 20 steps, two seeds")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per task (see the protocol)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--kfac", nargs="*", default=[], metavar="KEY=VALUE", help="KFAC kwargs")
    ap.add_argument("--shampoo", nargs="*", default=[], metavar="KEY=VALUE")
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
    steps, seeds, every = args.steps, args.seeds, args.eval_every
    if args.quick:
        steps, seeds, every = 20, 2, 5
    configs = {"kfac": parse_config(args.kfac), "shampoo": parse_config(args.shampoo)}
    results = []
    for name in args.tasks:

        def make_task(seed: int, name: str = name) -> Task:
            task = TASKS[name](steps, args.quick, seed)
            if args.quick:
                task.adamw_grid = task.adamw_grid[1:2]
            return task

        results.append(run_task(make_task, configs, every, seeds))
    print_table(results)
    out = {"steps": steps, "seeds": seeds, "eval_every": every, "tasks": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
