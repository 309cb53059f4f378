"""Top Hessian eigenvalue of a GPT-style language model at 10M / 112M / 300M parameters.

Random weights, token data generated locally (no download), float32, eval mode, the math
attention backend (hesse selects it for its products). Reports, as one JSON line:

* the pre-flight :func:`hesse.estimate` (peak memory and time per HVP predicted from two
  small probes), made before the run;
* gradient time, first HVP (builds the cached double-backward graph), median HVP time;
* the top eigenvalue by a three-vector Lanczos recurrence (memory ``3 n``; eigenvalue error
  bound ``min(r, r^2 / gap)`` from the tridiagonal matrix, stopped at ``tol`` relative),
  HVPs to converge and total time;
* the measured peak resident set size (``VmHWM``, whole process) and the exact peak of
  tensor allocations during the Lanczos run (:class:`hesse.analysis.AllocationTracker`),
  against the pre-flight.

Sizes (``--size``): ``10m`` (8 blocks, d=256), ``112m`` (14 blocks, d=768, the issue's model),
``300m`` (22 blocks, d=1024); vocabulary 8192, batch 4 x 128 tokens.

``--ranks 2`` runs two gloo processes (forked), each with half of the batch, against
``--ranks 1``: the same operator (all-reduced), the same answer. One thread per rank by
default (``--threads``): on a shared machine two OpenMP threads per process were 10x slower
than one (spin-waiting under oversubscription).

``--products``: time and exact peak tensor memory of one gradient, one HVP and one GGN-vector
product of a GPT-style LM with vocabulary 32k on 4 x 256 tokens (``--layers 4 --d 256``
by default), each on a fresh operator (its peak includes what it caches).

Usage::

    python benchmarks/scale.py --products [--layers 4 --d 256 --vocab 32000]
    python benchmarks/scale.py --size 10m [--ranks 1|2] [--tol 1e-3] [--max-hvps 40]
    python benchmarks/scale.py --size 10m --check   # also hesse.top_eigenpairs, for parity

Memory caution: 112M needs about 5-6 GB, 300M about 14-16 GB; check ``free -g`` first, or
run with ``--estimate-only`` to get the pre-flight figure alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import hesse
from hesse.analysis.preflight import AllocationTracker, process_memory

SIZES = {
    "10m": dict(layers=8, d=256, heads=8),
    "112m": dict(layers=14, d=768, heads=12),
    "300m": dict(layers=22, d=1024, heads=16),
}
VOCAB, SEQ, BATCH = 8192, 128, 4


class GPT(nn.Module):
    """Pre-norm causal transformer LM from standard ``nn.TransformerEncoderLayer`` blocks."""

    def __init__(self, layers: int, d: int, heads: int, vocab: int = VOCAB, seq: int = SEQ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        h = self.tok(tokens) + self.pos[:T]
        for blk in self.blocks:
            h = blk(h, src_mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)  # (B*T, vocab)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets.flatten())


def make_problem(size: str, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(**SIZES[size]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def lanczos_top(
    op, tol: float, max_hvps: int, generator: torch.Generator, log=None, time_budget=None
):
    """Largest eigenvalue by the Lanczos three-term recurrence (3 vectors of memory).

    No reorthogonalisation (ghost copies only appear after the top Ritz value has
    converged). Error bound of the top Ritz value: ``min(r, r^2 / gap)`` with
    ``r = beta_j |s_j|`` the residual and ``gap`` the distance to the next Ritz value.
    """
    n = op.shape[1]
    v = torch.randn(n, dtype=op.dtype, generator=generator)
    v /= torch.linalg.vector_norm(v)
    v_prev, beta = None, 0.0
    alphas: list[float] = []
    betas: list[float] = []
    times: list[float] = []
    theta = err = float("nan")
    thetas: list[float] = []
    start = time.perf_counter()
    for j in range(max_hvps):
        t0 = time.perf_counter()
        w = op @ v
        times.append(time.perf_counter() - t0)
        alpha = float(torch.dot(w, v))
        w.sub_(v, alpha=alpha)
        if v_prev is not None:
            w.sub_(v_prev, alpha=beta)
        c = float(torch.dot(w, v))  # one local reorthogonalisation against v (cheap)
        w.sub_(v, alpha=c)
        alphas.append(alpha + c)
        beta = float(torch.linalg.vector_norm(w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            b = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(b, 1) + torch.diag(b, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta = float(evals[-1])
        r = beta * abs(float(evecs[-1, -1]))
        gap = float(evals[-1] - evals[-2]) if j else 0.0  # unknown after one step
        err = min(r, r * r / gap) if gap > 0 else r
        thetas.append(theta)
        if log:
            log(f"  hvp {j + 1}: {times[-1]:.2f} s  theta={theta:.6g}  err<={err:.2e}")
        if err <= tol * abs(theta) or beta == 0.0:
            return theta, err, j + 1, times, True, thetas
        if time_budget is not None and time.perf_counter() - start > time_budget:
            return theta, err, j + 1, times, False, thetas
        betas.append(beta)
        w.div_(beta)
        v_prev, v = v, w
        del w
    return theta, err, max_hvps, times, False, thetas


def run(args, rank: int = 0, world: int = 1) -> dict:
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    model, X, y = make_problem(args.size)
    if world > 1:
        per = BATCH // world
        X, y = X[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    n = sum(p.numel() for p in model.parameters())
    kw = dict(reduction="mean", micro_batch_size=args.micro_batch_size)
    H = hesse.HessianOperator(model, lm_loss, (X, y), **kw)
    out: dict = {"size": args.size, "n": n, "ranks": world, "threads": torch.get_num_threads()}
    out["rss_after_build_gb"] = process_memory()["rss"] / 1e9
    if not args.no_estimate:
        t0 = time.perf_counter()
        est = hesse.estimate(H, extra_vectors=1, generator=torch.Generator().manual_seed(5))
        out["estimate_seconds"] = time.perf_counter() - t0
        out["est_peak_gb"] = est.peak_bytes / 1e9
        out["est_extra_gb"] = est.extra_peak_bytes / 1e9
        out["est_graph_gb"] = est.graph_bytes / 1e9
        out["est_hvp_s"] = est.seconds_per_product
        out["est_first_hvp_s"] = est.seconds_first_product
        if log:
            log(str(est))
        if args.estimate_only:
            return out
    t0 = time.perf_counter()
    H.gradient()
    out["gradient_s"] = time.perf_counter() - t0
    tracker = AllocationTracker()  # exact allocations of the run, next to the RSS
    t0 = time.perf_counter()
    with tracker:
        res = lanczos_top(
            H, args.tol, args.max_hvps, torch.Generator().manual_seed(7), log, args.time_budget
        )
    total = time.perf_counter() - t0
    out["allocated_peak_gb"] = tracker.peak / 1e9
    theta, err, hvps, times, converged, thetas = res
    out.update(
        lambda_max=theta,
        error_bound=err,
        rel_error_bound=err / abs(theta),
        converged=converged,
        hvps=hvps,
        first_hvp_s=times[0],
        median_hvp_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
        lanczos_s=total,
        thetas=thetas,
        hvp_times=times,
    )
    if args.check:
        t0 = time.perf_counter()
        ref = hesse.top_eigenpairs(H, 1, tol=args.tol, generator=torch.Generator().manual_seed(8))
        out["top_eigenpairs_lambda"] = float(ref.eigenvalues[0])
        out["top_eigenpairs_matvecs"] = ref.num_matvecs
        out["top_eigenpairs_s"] = time.perf_counter() - t0
    peak = process_memory()["peak_rss"]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        out["peak_rss_per_rank_gb"] = [p / 1e9 for p in peaks]
        out["peak_rss_gb"] = sum(peaks) / 1e9
    else:
        out["peak_rss_gb"] = peak / 1e9
    if "est_peak_gb" in out:
        out["est_vs_measured_peak"] = out["est_peak_gb"] / (peak / 1e9)
        out["est_vs_allocated_peak"] = out["est_extra_gb"] / out["allocated_peak_gb"]
    return out


def _rank_main(rank: int, world: int, store: str, args) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = run(args, rank, world)
        if rank == 0:
            print(json.dumps(out), flush=True)
    finally:
        dist.destroy_process_group()


def products(args) -> dict:
    """Time and peak tensor memory of one gradient, one HVP and one GGN-vector product for a
    GPT-style LM with a large vocabulary (issue 14.5: GGN-vp peak <= 1.5x a gradient's).

    Each product is measured on a fresh operator, so its peak includes building what it
    caches (the double-backward graph for the HVP, the output graph for the GGN); the
    cached product after it is timed too. Peaks are exact tensor allocations
    (:class:`hesse.analysis.AllocationTracker`) above what was live before.
    """
    torch.manual_seed(0)
    model = GPT(args.layers, args.d, args.heads, vocab=args.vocab, seq=args.seq).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    data = (tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1))  # logits are (B*T, V)
    n = sum(p.numel() for p in model.parameters())
    out = {"n": n, "vocab": args.vocab, "tokens": f"{args.batch} x {args.seq}"}
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    for name in ("gradient", "hessian", "ggn"):
        op = hesse.curvature_operator(
            "hessian" if name == "gradient" else name, model, nn.CrossEntropyLoss(), data
        )
        tracker = AllocationTracker()
        t0 = time.thread_time()
        with tracker:
            op.gradient() if name == "gradient" else op @ v
        out[f"{name}_s"] = time.thread_time() - t0
        out[f"{name}_peak_gb"] = tracker.peak / 1e9
        if name != "gradient":
            t0 = time.thread_time()
            op @ v
            out[f"{name}_cached_s"] = time.thread_time() - t0
        del op
    out["ggn_peak_over_gradient"] = out["ggn_peak_gb"] / out["gradient_peak_gb"]
    out["hvp_peak_over_gradient"] = out["hessian_peak_gb"] / out["gradient_peak_gb"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="10m")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="per rank (default 1)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-hvps", type=int, default=40)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="stop Lanczos after (s)")
    ap.add_argument("--no-estimate", action="store_true")
    ap.add_argument("--estimate-only", action="store_true")
    ap.add_argument("--check", action="store_true", help="also run hesse.top_eigenpairs")
    ap.add_argument(
        "--products",
        action="store_true",
        help="time and peak memory of gradient, HVP and GGN-vp (vocab 32k, 4 x 256 tokens)",
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    if args.products:
        torch.set_num_threads(args.threads)
        print(json.dumps(products(args)), flush=True)
        return
    if args.ranks == 1:
        torch.set_num_threads(args.threads)
        print(json.dumps(run(args)), flush=True)
        return
    store = os.path.join(tempfile.mkdtemp(), "store")
    torch.multiprocessing.start_processes(
        _rank_main, args=(args.ranks, store, args), nprocs=args.ranks, start_method="fork"
    )


if __name__ == "__main__":
    main()
