"""Cost of one Hessian-vector product relative to one gradient (run by anyone; not a test).

MLP 64-256-256-10 (ReLU) on the full digits training batch, float32, one thread,
flush-denormal on. Prints the median over interleaved repeats of

* one gradient (forward + backward),
* hesse HessianOperator products: rev-rev on the cached graph (default), rev-rev without the
  cache, fwd-rev (torch.func), each for a block of k = 1, 4, 16 vectors (time per vector),
* the GGN product,
* a plain-autograd baseline: ``grad(create_graph) + grad(g, v)`` per vector (what PyHessian does),
* plain cached-graph torch: ``grad(g, v, retain_graph=True)`` through one cached
  ``create_graph`` gradient per vector (the floor hesse's cached products must match),

and, next to the times, the matrix-multiply FLOPs of each case per vector relative to the
gradient's (``torch.utils.flop_counter.FlopCounterMode``, which counts mm/addmm/bmm/conv): the
arithmetic floor. Reverse-over-reverse on a cached graph differentiates the backward pass
(two products per layer, each of whose backward costs two) and then the forward pass again
(its activations depend on the parameters), so an MLP's exact HVP costs 6 products per layer
against the gradient's 3: 2.0x, not the 1.33x a "one more backward" count suggests.

Usage::

    python benchmarks/hvp.py [--repeats 15] [--widths 64 256 256 10] [--activation relu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hesse
from hesse.data import load_digits_tensors, make_mlp


def timer(fn):
    """CPU time of this thread (one torch thread): other processes on a shared machine
    do not inflate it, unlike wall-clock time."""
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def flops(fn) -> int:
    """Matrix-multiply FLOPs of one call (mm, addmm, bmm, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 256, 10])
    ap.add_argument("--activation", default="relu")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    (X, y), _ = load_digits_tensors(torch.float32)
    model = make_mlp(args.widths, args.activation, seed=0)
    loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)

    H = hesse.HessianOperator(model, loss_fn, (X, y))
    H_nocache = hesse.HessianOperator(model, loss_fn, (X, y), cache_graph=False)
    H_fwd = hesse.HessianOperator(model, loss_fn, (X, y), mode="fwd-rev")
    G = hesse.GGNOperator(model, loss_fn, (X, y))
    gen = torch.Generator().manual_seed(0)
    blocks = {k: torch.randn(n, k, generator=gen) for k in (1, 4, 16)}

    def gradient():
        loss = loss_fn(model(X), y)
        torch.autograd.grad(loss, params)

    def plain_hvp(V):
        for j in range(V.shape[1]):
            loss = loss_fn(model(X), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            vs = hesse.func.unravel(V[:, j], dict(model.named_parameters()))
            torch.autograd.grad(g, params, list(vs.values()))

    g_cached = torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True)
    sizes = [p.numel() for p in params]

    def plain_cached(V):
        """The bare loop hesse must match: backward through one cached create_graph gradient."""
        for j in range(V.shape[1]):
            vs = [t.view_as(p) for t, p in zip(V[:, j].split(sizes), params)]
            out = torch.autograd.grad(g_cached, params, vs, retain_graph=True)
            torch.cat([o.reshape(-1) for o in out])

    cases = {"gradient": (gradient, 1)}
    for k, V in blocks.items():
        cases[f"hesse rev-rev cached, k={k}"] = (lambda V=V: H @ V, k)
        cases[f"hesse rev-rev no cache, k={k}"] = (lambda V=V: H_nocache @ V, k)
        cases[f"hesse fwd-rev, k={k}"] = (lambda V=V: H_fwd @ V, k)
        cases[f"hesse GGN cached, k={k}"] = (lambda V=V: G @ V, k)
    cases["plain autograd grad+grad, k=1"] = (lambda: plain_hvp(blocks[1]), 1)
    for k in (1, 16):
        cases[f"plain cached-graph torch, k={k}"] = (lambda V=blocks[k]: plain_cached(V), k)

    for fn, _ in cases.values():  # warm up (and build the caches once, outside the timing)
        fn()
    counts = {name: flops(fn) / k for name, (fn, k) in cases.items()}  # caches are built now
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, (fn, k) in cases.items():  # interleaved
            times[name].append(timer(fn) / k)

    g = statistics.median(times["gradient"])
    print(
        f"MLP {'-'.join(map(str, args.widths))} {args.activation}, n={n}, N={len(y)}, "
        f"float32, 1 thread, median of {args.repeats} interleaved repeats"
    )
    print(f"{'case':38s} {'CPU ms/vector':>14s} {'x gradient':>11s} {'FLOPs x gradient':>17s}")
    f = counts["gradient"]
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:38s} {1e3 * m:14.2f} {m / g:11.2f} {counts[name] / f:17.2f}")


if __name__ == "__main__":
    main()
