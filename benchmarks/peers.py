"""hesse against its peers, same process, one thread: time, HVPs and error vs a float64 reference.

Peers: PyHessian, curvlinops (+ scipy ``eigsh`` on its operator) and hessian-eigenthings, as
installed by ``pip install -c constraints.txt -e ".[bench]"`` (this script installs nothing).

Tasks on each model (full digits training batch, cross-entropy, float32 like the peers' defaults):

* ``top1``   largest Hessian eigenvalue, relative error
* ``top10``  10 largest eigenvalues, max relative error
* ``lmin``   smallest eigenvalue (inside the negative cluster), relative error
* ``trace``  trace, relative error
* ``density`` spectral density, Wasserstein-1 distance between the estimated spectral measure
  and the exact eigenvalues, divided by the spectral range (small models only)

References are computed once in float64 and cached: the full spectrum by ``torch.linalg.eigvalsh``
of the dense Hessian (small models); ``scipy.sparse.linalg.eigsh`` at tol 1e-10 (large model);
the trace exactly from the Hessian diagonal by BackPACK's ``DiagHessian`` (checked against
``hesse.linalg.exact_diagonal`` on the small models).

Every (task, method) pair builds its operator from scratch inside the timed region, runs
``--repeats`` times interleaved with the others (different seeds), and reports medians of
the CPU time of the (single) thread, ``time.thread_time``, which other processes on a shared
machine do not inflate. hesse is a row of every table, next to each peer.

Usage::

    python benchmarks/peers.py                     # all models, all tasks, 3 repeats
    python benchmarks/peers.py --models mlp-small --tasks trace,density --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import hesse
from hesse.data import load_digits_tensors, make_mlp, train_full_batch

warnings.filterwarnings("ignore")

# -- problems -----------------------------------------------------------------------------------


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    small: bool  # dense float64 reference affordable

    @property
    def n(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def build_problem(name: str) -> Problem:
    (X, y), _ = load_digits_tensors(torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    if name == "mlp-small":
        model = make_mlp((64, 32, 10), "tanh")
        train_full_batch(model, loss_fn, X, y, steps=300)
        return Problem("MLP 64-32-10 tanh", model, loss_fn, X, y, True)
    if name == "mlp-large":
        model = make_mlp((64, 256, 256, 10), "relu")
        train_full_batch(model, loss_fn, X, y, steps=300)
        return Problem("MLP 64-256-256-10 relu", model, loss_fn, X, y, False)
    if name == "cnn":
        X4 = X.reshape(-1, 1, 8, 8)
        model = make_cnn()
        train_full_batch(model, loss_fn, X4, y, steps=300)
        return Problem("CNN 2xconv3x3-8/16 + linear", model, loss_fn, X4, y, True)
    raise SystemExit(f"unknown model {name!r}; choose from mlp-small, mlp-large, cnn")


# -- references (float64, cached) ---------------------------------------------------------------


def exact_trace_backpack(p: Problem) -> float:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model = extend(copy.deepcopy(p.model).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    loss = loss_fn(model(p.X.double()), p.y)
    with backpack(DiagHessian()):
        loss.backward()
    return float(sum(q.diag_h.sum() for q in model.parameters()))


def reference(p: Problem, key: str, cache_dir: str, tasks: list[str]) -> dict[str, Any]:
    """Float64 reference quantities for ``tasks``, computed on demand and cached on disk."""
    path = os.path.join(cache_dir, f"ref-{key}.pt")
    ref: dict[str, Any] = torch.load(path, weights_only=False) if os.path.exists(path) else {}
    before = set(ref)
    t0 = time.perf_counter()
    model64 = copy.deepcopy(p.model).double()
    op = hesse.HessianOperator(model64, p.loss_fn, (p.X.double(), p.y))
    if "trace" in tasks and "trace" not in ref:
        ref["trace"] = exact_trace_backpack(p)
    if p.small and "eigenvalues" not in ref:
        H = op.to_dense(block_size=128)
        ev = torch.linalg.eigvalsh(0.5 * (H + H.T)).numpy()
        ref["eigenvalues"] = ev
        ref["trace_dense"] = float(H.trace())
        ref["top"] = np.sort(ev)[::-1][:10].copy()
        ref["lmin"] = float(ev[0])
    if not p.small:
        from scipy.sparse.linalg import eigsh

        S = op.to_scipy()
        v0 = np.random.default_rng(0).standard_normal(p.n)
        if {"top1", "top10"} & set(tasks) and "top" not in ref:
            top = eigsh(S, k=10, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)
            ref["top"] = np.sort(top)[::-1].copy()
        if "lmin" in tasks and "lmin" not in ref:
            lmin = eigsh(S, k=1, which="SA", tol=1e-8, v0=v0, return_eigenvectors=False)
            ref["lmin"] = float(lmin[0])
    if set(ref) != before:
        ref.setdefault("seconds", {})[",".join(sorted(set(ref) - before))] = (
            time.perf_counter() - t0
        )
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(ref, path)
    return ref


# -- HVP counting wrappers ----------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0


def count_curvlinops(op: Any, counter: Counter) -> Any:
    inner = op._matmat

    def _matmat(M):  # list format, trailing dim = columns
        counter.n += M[0].shape[-1]
        return inner(M)

    op._matmat = _matmat
    return op


def count_eigenthings(op: Any, counter: Counter) -> Any:
    inner = op.matvec

    def matvec(v):
        counter.n += 1
        return inner(v)

    op.matvec = matvec
    return op


def pyhessian_module(counter: Counter) -> Any:
    import pyhessian  # noqa: F401  (the package re-exports the class under the module's name)

    ph = sys.modules["pyhessian.hessian"]

    if not hasattr(ph, "_hesse_orig_hvp"):
        ph._hesse_orig_hvp = ph.hessian_vector_product
    orig = ph._hesse_orig_hvp

    def hvp(gradsH, params, v):
        counter.n += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = hvp
    torch.eig = _legacy_eig  # shim for PyHessian's density: torch.eig was removed (torch 1.9)
    return ph


def _legacy_eig(A: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.eig`` of torch < 1.9: ``(n, 2)`` real/imag eigenvalues and real eigenvectors."""
    w, V = torch.linalg.eig(A)
    return torch.stack([w.real, w.imag], 1), V.real


def fresh_grads(model: nn.Module) -> None:
    for q in model.parameters():
        q.grad = None


# -- methods ------------------------------------------------------------------------------------
# Each returns (value, num_hvps); value is a float, an array (top10) or (nodes, weights) (density).


def hesse_op(p: Problem) -> hesse.HessianOperator:
    return hesse.HessianOperator(p.model, p.loss_fn, (p.X, p.y))


def m_hesse_top(k: int, which: str = "largest"):
    def run(p: Problem, seed: int):
        op = hesse_op(p)
        g = torch.Generator().manual_seed(seed)
        r = hesse.top_eigenpairs(op, k=k, which=which, generator=g)
        v = r.eigenvalues.double().numpy()
        return (v if k > 1 else float(v[0])), op.num_matvecs

    return run


def m_pyhessian_top(k: int):
    def run(p: Problem, seed: int):
        c = Counter()
        ph = pyhessian_module(c)
        torch.manual_seed(seed)  # PyHessian draws from the global RNG
        h = ph.hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=False)
        ev, _ = h.eigenvalues(top_n=k)
        fresh_grads(p.model)
        v = np.sort(np.array(ev, dtype=np.float64))[::-1]
        return (v if k > 1 else float(v[0])), c.n

    return run


def curvlinops_op(p: Problem, c: Counter) -> Any:
    from curvlinops import HessianLinearOperator

    op = HessianLinearOperator(
        p.model,
        p.loss_fn,
        [q for q in p.model.parameters() if q.requires_grad],
        [(p.X, p.y)],
        progressbar=False,
        check_deterministic=False,
    )
    return count_curvlinops(op, c)


def m_eigsh(k: int, which: str):
    def run(p: Problem, seed: int):
        from scipy.sparse.linalg import eigsh

        c = Counter()
        S = curvlinops_op(p, c).to_scipy()
        v0 = np.random.default_rng(seed).standard_normal(p.n).astype(np.float32)
        ev = eigsh(S, k=k, which=which, tol=1e-3, v0=v0, return_eigenvectors=False)
        v = np.sort(ev.astype(np.float64))[::-1]
        return (v if k > 1 else float(v[0] if which == "LA" else v[-1])), c.n

    return run


def eigenthings_op(p: Problem, c: Counter) -> Any:
    import hessian_eigenthings as he

    op = he.HessianOperator(p.model, [(p.X, p.y)], he.supervised_loss(p.loss_fn))
    return count_eigenthings(op, c)


def m_eigenthings_lanczos(k: int, which: str, max_iter: int | None = None):
    def run(p: Problem, seed: int):
        import hessian_eigenthings as he

        c = Counter()
        r = he.lanczos(eigenthings_op(p, c), k=k, which=which, seed=seed, max_iter=max_iter)
        v = np.sort(r.eigenvalues.double().numpy())[::-1]
        return (v if k > 1 else float(v[0] if which == "LA" else v[-1])), c.n

    return run


def m_hesse_trace(fn: Callable, budget: int):
    def run(p: Problem, seed: int):
        op = hesse_op(p)
        r = fn(op, budget, generator=torch.Generator().manual_seed(seed))
        return float(r.estimate), op.num_matvecs

    return run


def m_curvlinops_trace(name: str, budget: int):
    def run(p: Problem, seed: int):
        import curvlinops

        c = Counter()
        torch.manual_seed(seed)  # curvlinops draws from the global RNG
        est = getattr(curvlinops, name)(curvlinops_op(p, c), budget)
        return float(est), c.n

    return run


def m_pyhessian_trace(p: Problem, seed: int):
    c = Counter()
    ph = pyhessian_module(c)
    torch.manual_seed(seed)
    h = ph.hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=False)
    samples = h.trace()  # defaults: maxIter=100, tol=1e-3
    fresh_grads(p.model)
    return float(np.mean(samples)), c.n


def m_eigenthings_trace(p: Problem, seed: int):
    import hessian_eigenthings as he

    c = Counter()
    r = he.trace(eigenthings_op(p, c), num_matvecs=99, method="hutch++", seed=seed)
    return float(r.estimate), c.n


def m_hesse_density(num_probes: int = 8, num_steps: int = 64):
    def run(p: Problem, seed: int):
        op = hesse_op(p)
        r = hesse.spectral_density(
            op,
            num_probes=num_probes,
            num_steps=num_steps,
            generator=torch.Generator().manual_seed(seed),
        )
        return (r.nodes.double().numpy(), r.weights.double().numpy()), op.num_matvecs

    return run


def m_pyhessian_density(iters: int, n_v: int):
    def run(p: Problem, seed: int):
        c = Counter()
        ph = pyhessian_module(c)
        torch.manual_seed(seed)
        h = ph.hessian(p.model, p.loss_fn, data=(p.X, p.y), cuda=False)
        ev, w = h.density(iter=iters, n_v=n_v)
        fresh_grads(p.model)
        return (np.array(ev, dtype=np.float64), np.array(w, dtype=np.float64)), c.n

    return run


def m_curvlinops_density(ncv: int, repeats: int):
    def run(p: Problem, seed: int):
        from curvlinops import lanczos_approximate_spectrum

        c = Counter()
        torch.manual_seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - eigsh inside curvlinops uses the global RNG
        grid, dens = lanczos_approximate_spectrum(curvlinops_op(p, c), ncv, num_repeats=repeats)
        g, d = grid.double().numpy(), dens.double().numpy().clip(min=0)
        return (g[None], (d / d.sum())[None]), c.n

    return run


def m_eigenthings_density(p: Problem, seed: int):
    import hessian_eigenthings as he

    c = Counter()
    r = he.spectral_density(eigenthings_op(p, c), seed=seed)  # 10 runs x 80 steps
    return (r.raw_eigenvalues.double().numpy(), r.raw_weights.double().numpy()), c.n


METHODS: dict[str, list[tuple[str, Callable]]] = {
    "top1": [
        ("hesse top_eigenpairs", m_hesse_top(1)),
        ("PyHessian power iteration", m_pyhessian_top(1)),
        ("curvlinops + eigsh", m_eigsh(1, "LA")),
        ("hessian-eigenthings lanczos (default 2k steps)", m_eigenthings_lanczos(1, "LA")),
        ("hessian-eigenthings lanczos (20 steps)", m_eigenthings_lanczos(1, "LA", 20)),
    ],
    "top10": [
        ("hesse top_eigenpairs", m_hesse_top(10)),
        ("PyHessian power iteration", m_pyhessian_top(10)),
        ("curvlinops + eigsh", m_eigsh(10, "LA")),
        ("hessian-eigenthings lanczos (default 2k steps)", m_eigenthings_lanczos(10, "LA")),
        ("hessian-eigenthings lanczos (50 steps)", m_eigenthings_lanczos(10, "LA", 50)),
    ],
    "lmin": [
        ("hesse top_eigenpairs smallest", m_hesse_top(1, "smallest")),
        ("curvlinops + eigsh SA", m_eigsh(1, "SA")),
        ("hessian-eigenthings lanczos SA (default 2k steps)", m_eigenthings_lanczos(1, "SA")),
        ("hessian-eigenthings lanczos SA (100 steps)", m_eigenthings_lanczos(1, "SA", 100)),
    ],
    "trace": [
        ("hesse xtrace (100)", m_hesse_trace(hesse.xtrace, 100)),
        ("hesse xtrace (50)", m_hesse_trace(hesse.xtrace, 50)),
        ("hesse hutchpp_trace (99)", m_hesse_trace(hesse.hutchpp_trace, 99)),
        ("curvlinops xtrace (100)", m_curvlinops_trace("xtrace", 100)),
        ("curvlinops hutchpp_trace (99)", m_curvlinops_trace("hutchpp_trace", 99)),
        ("PyHessian trace (Hutchinson, default)", m_pyhessian_trace),
        ("hessian-eigenthings hutch++ (99)", m_eigenthings_trace),
    ],
    "density": [
        ("hesse spectral_density (8x64)", m_hesse_density(8, 64)),
        ("hesse spectral_density (4x64)", m_hesse_density(4, 64)),
        ("PyHessian density (1x100, default)", m_pyhessian_density(100, 1)),
        ("PyHessian density (8x100)", m_pyhessian_density(100, 8)),
        ("curvlinops lanczos_approximate_spectrum (128)", m_curvlinops_density(128, 1)),
        ("hessian-eigenthings spectral_density (10x80)", m_eigenthings_density),
    ],
}

TASK_TITLES = {
    "top1": "top-1 eigenvalue (relative error)",
    "top10": "top-10 eigenvalues (max relative error)",
    "lmin": "lambda_min (relative error)",
    "trace": "trace (relative error)",
    "density": "spectral density (Wasserstein-1 / spectral range)",
}


def error(task: str, value: Any, ref: dict[str, Any]) -> float:
    if task == "top1":
        return abs(value - ref["top"][0]) / abs(ref["top"][0])
    if task == "top10":
        v = np.sort(np.asarray(value))[::-1][:10]
        if v.size < 10:
            return float("nan")
        return float(np.max(np.abs(v - ref["top"][:10]) / np.abs(ref["top"][:10])))
    if task == "lmin":
        return abs(value - ref["lmin"]) / abs(ref["lmin"])
    if task == "trace":
        return abs(value - ref["trace"]) / abs(ref["trace"])
    if task == "density":
        from scipy.stats import wasserstein_distance

        nodes, weights = value
        nodes, weights = np.asarray(nodes).ravel(), np.asarray(weights).ravel()
        keep = weights > 0
        ev = ref["eigenvalues"]
        w1 = wasserstein_distance(nodes[keep], ev, u_weights=weights[keep])
        return float(w1 / (ev.max() - ev.min()))
    raise ValueError(task)


# -- driver -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    rows: list[dict[str, Any]] = []
    for key in args.models.split(","):
        t0 = time.perf_counter()
        p = build_problem(key)
        print(f"# {p.name}: n = {p.n}, N = {len(p.y)} (trained in {time.perf_counter() - t0:.1f}s)")
        tasks = args.tasks.split(",")
        if not p.small:  # no exact spectrum: no density; lmin's eigsh reference takes long
            skip = ("density",) if args.large_all else ("lmin", "density")
            tasks = [t for t in tasks if t not in skip]
        ref = reference(p, key, args.cache_dir, tasks)
        print(f"#   reference ready (seconds when computed: {ref.get('seconds')})", flush=True)
        for task in tasks:
            methods = METHODS[task]
            if args.only:
                methods = [m for m in methods if any(s in m[0] for s in args.only.split(","))]
            times: dict[str, list[float]] = {m[0]: [] for m in methods}
            hvps: dict[str, list[int]] = {m[0]: [] for m in methods}
            errs: dict[str, list[float]] = {m[0]: [] for m in methods}
            failed: dict[str, str] = {}
            for rep in range(args.repeats):
                for label, fn in methods:
                    if label in failed:
                        continue
                    try:
                        s = time.thread_time()  # CPU time of this (single) thread
                        value, nh = fn(p, 1000 * rep + 17)
                        times[label].append(time.thread_time() - s)
                    except Exception as exc:  # a peer failing is a result, not a crash
                        failed[label] = f"{type(exc).__name__}: {exc}"[:120]
                        continue
                    hvps[label].append(nh)
                    errs[label].append(error(task, value, ref))
            for label, _ in methods:
                row = {"model": p.name, "n": p.n, "task": task, "method": label}
                if label in failed:
                    row["failed"] = failed[label]
                else:
                    row.update(
                        time_s=statistics.median(times[label]),
                        hvps=statistics.median(hvps[label]),
                        error=statistics.median(errs[label]),
                        error_max=max(errs[label]),
                        repeats=len(times[label]),
                    )
                rows.append(row)
                print("   ", json.dumps(row), flush=True)
    return rows


TARGET_ERROR = {"top1": 1e-3, "top10": 1e-3, "lmin": 1e-3, "trace": 1e-3, "density": 1e-3}


def baseline_peer(peers: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The fastest peer whose median error meets the task's target, else the most accurate."""
    if not peers:
        return None
    ok = [r for r in peers if r["error"] <= TARGET_ERROR[task]]
    if ok:
        return min(ok, key=lambda r: r["time_s"])
    return min(peers, key=lambda r: r["error"])


def markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        n = next(r["n"] for r in rows if r["model"] == model)
        out.append(f"\n### {model} (n = {n})\n")
        for task in dict.fromkeys(r["task"] for r in rows if r["model"] == model):
            sel = [r for r in rows if r["model"] == model and r["task"] == task]
            peers = [r for r in sel if not r["method"].startswith("hesse") and "time_s" in r]
            base = baseline_peer(peers, task)
            name = base["method"] if base else "none"
            out.append(
                f"**{TASK_TITLES[task]}**; baseline peer for the time ratio: {name} (the "
                f"fastest peer with median error <= {TARGET_ERROR[task]:g}, else the most "
                "accurate)\n"
            )
            out.append(
                "| method | time (s) | HVPs | error (median) | error (max) | time / baseline |"
            )
            out.append("|---|---:|---:|---:|---:|---:|")
            for r in sel:
                if "failed" in r:
                    out.append(f"| {r['method']} | failed: {r['failed']} | | | | |")
                    continue
                ratio = f"{r['time_s'] / base['time_s']:.2f}" if base else ""
                out.append(
                    f"| {r['method']} | {r['time_s']:.3f} | {r['hvps']:.0f} | {r['error']:.2e} | "
                    f"{r['error_max']:.2e} | {ratio} |"
                )
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp-small,cnn,mlp-large")
    ap.add_argument("--tasks", default="top1,top10,lmin,trace,density")
    ap.add_argument("--only", default="", help="comma-separated substrings of method labels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "hesse-bench-cache"))
    ap.add_argument(
        "--large-all",
        action="store_true",
        help="also run lmin on the large model (its eigsh reference takes long)",
    )
    ap.add_argument("--json", default="", help="also write the raw rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print(
        f"# torch {torch.__version__}, threads={torch.get_num_threads()}, flush_denormal on, "
        f"python {sys.version.split()[0]}"
    )
    rows = run(args)
    md = markdown(rows)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
