"""Overhead of SharpnessTracker on the digits MLP, and its warm-start HVP counts.

Trains the default digits model (MLP 64-32-10, tanh, cross-entropy, float32) with and without
a tracker checking ``lambda_max`` every 10 steps, in interleaved repeats, and reports the median
extra training time. Times are CPU time of the (single) training thread
(``time.thread_time``), which other processes on a shared machine do not inflate; wall-clock
medians are printed next to them.

Configurations (training / measurement batch):

* ``gd-full``:   full-batch GD on the 1437 training digits; measurement batch = all 1437.
* ``gd-sub``:    full-batch GD; measurement batch = a fixed subset of ``--meas`` digits.
* ``sgd-sub``:   mini-batch SGD (batch ``--batch``); measurement batch = fixed subset.
* ``gd-full-shared``: ``gd-full`` with ``tracker.backward()`` in place of ``loss.backward()``:
  the check steps' training gradient is built with ``create_graph=True`` and the check runs
  on that graph (no rebuild).

Run::

    python benchmarks/tracker.py            # ~2-4 minutes on a busy 2-core machine
    python benchmarks/tracker.py --steps 500 --repeats 2   # quicker

Target (issue 6): <= 25% extra training time at one check every 10 steps; after the first
check each check converges to 1e-3 in <= 5 HVPs on average.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn

import hesse
from hesse.data import load_digits_tensors, make_mlp


def train(cfg: str, track: bool, args, data) -> dict:
    (X, y), (Xm, ym) = data[cfg]
    shared = track and cfg.endswith("-shared")
    model = make_mlp((64, 32, 10), "tanh", seed=0)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    tracker = None
    if track:
        tracker = hesse.SharpnessTracker(
            model,
            loss_fn,
            (Xm, ym),
            every=args.every,
            optimizer=opt,
            generator=torch.Generator().manual_seed(0),
            warn=False,
        )
    B = args.batch if cfg.startswith("sgd") else X.shape[0]
    n = X.shape[0]
    c0, w0 = time.thread_time(), time.perf_counter()
    i = 0
    for _ in range(args.steps):
        xb, yb = X[i : i + B], y[i : i + B]
        i = 0 if i + 2 * B > n else i + B
        opt.zero_grad()
        if shared:  # the tracker computes the step's gradient and shares its graph
            tracker.backward()
        else:
            loss_fn(model(xb), yb).backward()
        opt.step()
        if tracker is not None:
            tracker.step()
    out = {"cpu": time.thread_time() - c0, "wall": time.perf_counter() - w0}
    if tracker is not None:
        out["first_hvps"] = tracker.history[0].num_matvecs
        out["mean_hvps"] = tracker.mean_matvecs_after_first()
        out["max_hvps"] = max(r.num_matvecs for r in tracker.history[1:])
        out["converged"] = all(r.converged for r in tracker.history)
        out["check_cpu_ms"] = None
    return out


def components(args, data) -> dict:
    """CPU ms of one training step, one graph build, one HVP, one warm-started check."""
    (X, y), (Xm, ym) = data["gd-full"]
    model = make_mlp((64, 32, 10), "tanh", seed=0)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    tr = hesse.SharpnessTracker(model, loss_fn, (Xm, ym), every=1, optimizer=opt, warn=False)
    H = tr.operator

    def step():
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    for _ in range(5):
        step()
        tr.step()
    T: dict[str, list[float]] = {"train_step": [], "graph_build": [], "hvp": [], "check": []}
    v = tr._v.clone()
    for _ in range(30):
        t0 = time.thread_time()
        step()
        T["train_step"].append(time.thread_time() - t0)
        t0 = time.thread_time()
        tr.measure()
        T["check"].append(time.thread_time() - t0)
        step()
        t0 = time.thread_time()
        list(H._batch_caches())
        T["graph_build"].append(time.thread_time() - t0)
        t0 = time.thread_time()
        H.matvec(v)
        T["hvp"].append(time.thread_time() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in T.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="SharpnessTracker overhead on the digits MLP.")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--meas", type=int, default=256, help="measurement subset size")
    p.add_argument("--configs", nargs="+", default=["gd-full", "gd-sub", "sgd-sub"])
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.simplefilter("ignore")
    (X, y), _ = load_digits_tensors(torch.float32)
    sub = (X[: args.meas], y[: args.meas])
    data = {
        "gd-full": ((X, y), (X, y)),
        "gd-full-shared": ((X, y), (X, y)),
        "gd-sub": ((X, y), sub),
        "sgd-sub": ((X, y), sub),
    }

    results = {}
    # One untracked baseline per training loop (the gd-* configs all train full-batch GD on
    # the same data), run interleaved with the tracked runs of every config, so that all
    # overheads are ratios from the same stretch of time.
    loops = {cfg: ("sgd" if cfg.startswith("sgd") else "gd") for cfg in args.configs}
    base = {loop: [] for loop in set(loops.values())}
    runs = {cfg: [] for cfg in args.configs}
    for _ in range(args.repeats):
        for loop in base:
            base[loop].append(train("sgd-sub" if loop == "sgd" else "gd-full", False, args, data))
        for cfg in args.configs:
            runs[cfg].append(train(cfg, True, args, data))
    for cfg in args.configs:
        tracked = runs[cfg]
        b_cpu = statistics.median(r["cpu"] for r in base[loops[cfg]])
        t_cpu = statistics.median(r["cpu"] for r in tracked)
        b_wall = statistics.median(r["wall"] for r in base[loops[cfg]])
        t_wall = statistics.median(r["wall"] for r in tracked)
        res = {
            "overhead_cpu": t_cpu / b_cpu - 1,
            "overhead_wall": t_wall / b_wall - 1,
            "train_ms_per_step_cpu": 1e3 * b_cpu / args.steps,
            "first_check_hvps": tracked[0]["first_hvps"],
            "mean_hvps_after_first": statistics.mean(r["mean_hvps"] for r in tracked),
            "max_hvps_after_first": max(r["max_hvps"] for r in tracked),
            "all_converged": all(r["converged"] for r in tracked),
        }
        results[cfg] = res
        print(
            f"{cfg:14s} overhead {100 * res['overhead_cpu']:6.1f}% CPU "
            f"({100 * res['overhead_wall']:6.1f}% wall)  train {res['train_ms_per_step_cpu']:.2f} "
            f"ms/step  HVPs/check: first {res['first_check_hvps']}, then mean "
            f"{res['mean_hvps_after_first']:.2f} (max {res['max_hvps_after_first']})  "
            f"converged {res['all_converged']}"
        )
    comp = components(args, data)
    results["components_ms_cpu_gd_full"] = comp
    print("CPU ms (full batch 1437):", {k: round(v, 2) for k, v in comp.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
