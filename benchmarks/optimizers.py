"""Second-order optimizers I: hesse vs Nocedal & Wright, scipy.optimize and torch.optim.

Sections (``--sections nw,scipy,torch,mgh,digits``; ``autoencoder`` adds issue 8's K-FAC /
Shampoo vs Adam table from ``benchmarks/optimizers_kfac.py``):

* ``nw``: Rosenbrock from (-1.2, 1), stop at ||g||_2 <= 1e-5 (Nocedal & Wright 2006, 6.1:
  BFGS 34 iterations, Newton 21).
* ``scipy``: Rosenbrock 2-D (start (-1.2, 1)), Rosenbrock 5-D (scipy tutorial start
  (1.3, 0.7, 0.8, 1.9, 1.2)) and Himmelblau (start (0, 0)), every method stopped by the same
  rule ||g||_inf <= 1e-5 (scipy through a callback raising StopIteration), iterations and
  function evaluations side by side with its scipy counterpart.
* ``torch``: hesse LBFGS vs torch.optim.LBFGS(line_search_fn="strong_wolfe") on the same
  problems (function evaluations, wall time: medians of interleaved repeats).
* ``mgh``: the More-Garbow-Hillstrom set, every method (and scipy BFGS) run until the published
  f* (or a published local minimum) is reached (``Problem.solved``), ||g||_inf <= 1e-8, or 500
  iterations.
* ``digits``: 64-32-10 tanh MLP on digits, full batch, float64: the training loss Adam
  reaches in 500 steps (best of a small lr grid) is the target; each method's iterations,
  evaluations, HVPs and wall time to reach it, with torch.optim.LBFGS alongside.

Run: ``python benchmarks/optimizers.py [--sections ...] [--repeats 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import numpy as np
import scipy.optimize as so
import torch

from hesse.optim import BFGS, DFP, LBFGS, SR1, HessianFree, Newton
from hesse.testing.problems import himmelblau, mgh_problems, minimize, rosenbrock

D = torch.float64


def _np_funcs(problem):
    def f(z):
        return float(problem.fn(torch.tensor(z, dtype=D)))

    def jac(z):
        t = torch.tensor(z, dtype=D, requires_grad=True)
        problem.fn(t).backward()
        return t.grad.numpy().copy()

    def hess(z):
        return torch.autograd.functional.hessian(problem.fn, torch.tensor(z, dtype=D)).numpy()

    def hessp(z, v):
        return hess(z) @ v

    return f, jac, hess, hessp


def scipy_run(problem, x0, method, gtol):
    """scipy.optimize.minimize stopped at ||g||_inf <= gtol by a callback (same rule)."""
    f, jac, hess, hessp = _np_funcs(problem)
    kw = {}
    opts = {"maxiter": 5000}
    if method == "BFGS":
        opts["gtol"] = gtol * 1e-3  # the callback stops it first
    elif method == "L-BFGS-B":
        opts.update(gtol=0.0, ftol=0.0, maxcor=10)
    elif method == "Newton-CG":
        kw["hessp"] = hessp
        opts["xtol"] = 1e-30
    elif method == "trust-ncg":
        kw["hessp"] = hessp
        opts["gtol"] = gtol * 1e-3
    elif method == "trust-exact":
        kw["hess"] = hess
        opts["gtol"] = gtol * 1e-3
    elif method == "trust-constr":
        kw["hess"] = so.SR1()
        opts.update(gtol=gtol * 1e-3, xtol=0.0)
    count = {"nit": 0}

    def callback(intermediate_result):
        count["nit"] += 1
        if np.abs(jac(intermediate_result.x)).max() <= gtol:
            raise StopIteration

    start = np.asarray(x0, dtype=float)
    if np.abs(jac(start)).max() <= gtol:
        return 0, 0, f(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = so.minimize(f, start, jac=jac, method=method, options=opts, callback=callback, **kw)
    return count["nit"], int(r.nfev), float(r.fun)


PAIRS = [
    ("BFGS", BFGS, {}, "BFGS"),
    ("LBFGS", LBFGS, {}, "L-BFGS-B"),
    ("Newton(mode=cg)", Newton, {"mode": "cg"}, "Newton-CG"),
    ("Newton(trust_region, cg)", Newton, {"mode": "cg", "step_rule": "trust_region"}, "trust-ncg"),
    ("Newton(trust_region, exact)", Newton, {"step_rule": "trust_region"}, "trust-exact"),
    ("SR1", SR1, {}, "trust-constr"),
]


def problems_2d5d():
    return [
        ("rosenbrock 2-D", rosenbrock(2), None),
        ("rosenbrock 5-D", rosenbrock(5), torch.tensor([1.3, 0.7, 0.8, 1.9, 1.2], dtype=D)),
        ("himmelblau", himmelblau(), None),
    ]


def section_nw(out):
    print("\n## Nocedal & Wright 6.1: Rosenbrock from (-1.2, 1), ||g||_2 <= 1e-5\n")
    print("| method | iterations | N&W | f evals | ||x - x*||_inf |")
    print("|---|---|---|---|---|")
    rows = []
    for name, cls, kw, ref in [("BFGS", BFGS, {}, 34), ("Newton", Newton, {}, 21)]:
        r = minimize(rosenbrock(2), cls, gtol=1e-5, norm=2, **kw)
        err = float((r.x - 1).abs().max())
        print(f"| {name} | {r.iterations} | {ref} | {r.counters['func_evals']} | {err:.1e} |")
        rows.append(dict(method=name, iterations=r.iterations, reference=ref, x_err=err))
    out["nw"] = rows


def section_scipy(out, gtol=1e-5):
    print("\n## hesse vs scipy.optimize, same rule ||g||_inf <= 1e-5\n")
    print("| problem | hesse method | iters | f evals | scipy method | iters | f evals | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for pname, prob, x0 in problems_2d5d():
        for name, cls, kw, sp in PAIRS:
            r = minimize(prob, cls, x0, gtol=gtol, max_iters=5000, **kw)
            start = prob.x0 if x0 is None else x0.tolist()
            nit, nfev, _ = scipy_run(prob, start, sp, gtol)
            ratio = r.iterations / max(nit, 1)
            print(
                f"| {pname} | {name} | {r.iterations} | {r.counters['func_evals']} | {sp} | "
                f"{nit} | {nfev} | {ratio:.2f} |"
            )
            rows.append(
                dict(
                    problem=pname,
                    method=name,
                    iterations=r.iterations,
                    func_evals=r.counters["func_evals"],
                    f=r.f,
                    scipy=sp,
                    scipy_iterations=nit,
                    scipy_func_evals=nfev,
                    ratio=ratio,
                )
            )
    out["scipy"] = rows


def _torch_lbfgs(prob, x0, gtol):
    x = (prob.start(D) if x0 is None else x0.clone()).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1,
        max_iter=5000,
        max_eval=20000,
        tolerance_grad=gtol,
        tolerance_change=0.0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = prob.fn(x)
        loss.backward()
        return loss

    t = time.perf_counter()
    opt.step(closure)
    sec = time.perf_counter() - t
    st = opt.state[x]
    return st["n_iter"], st["func_evals"], sec, float(prob.fn(x.detach()))


def section_torch(out, repeats=5, gtol=1e-5):
    print("\n## hesse LBFGS vs torch.optim.LBFGS(strong_wolfe), ||g||_inf <= 1e-5\n")
    print(
        "| problem | hesse iters | hesse f evals | torch iters | torch f evals | time hesse/torch |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for pname, prob, x0 in problems_2d5d():
        th, tt = [], []
        for _ in range(repeats):  # interleaved
            r = minimize(prob, LBFGS, x0, gtol=gtol, max_iters=5000)
            th.append(r.seconds)
            ti, tf, sec, _ = _torch_lbfgs(prob, x0, gtol)
            tt.append(sec)
        ratio = statistics.median(th) / statistics.median(tt)
        print(
            f"| {pname} | {r.iterations} | {r.counters['func_evals']} | {ti} | {tf} | "
            f"{ratio:.2f} ({statistics.median(th) * 1e3:.1f} / "
            f"{statistics.median(tt) * 1e3:.1f} ms) |"
        )
        rows.append(
            dict(
                problem=pname,
                hesse_iterations=r.iterations,
                hesse_func_evals=r.counters["func_evals"],
                torch_iterations=ti,
                torch_func_evals=tf,
                hesse_seconds=statistics.median(th),
                torch_seconds=statistics.median(tt),
            )
        )
    out["torch"] = rows


MGH_METHODS = [
    ("BFGS", BFGS, {}),
    ("LBFGS", LBFGS, {}),
    ("DFP", DFP, {}),
    ("SR1", SR1, {}),
    ("Newton", Newton, {}),
    ("Newton-TR", Newton, {"step_rule": "trust_region"}),
    ("Newton-CG", Newton, {"mode": "cg"}),
]


def _stop_when_solved(prob, nit):
    def callback(intermediate_result):  # scipy passes OptimizeResult to this exact name
        nit[0] += 1
        if prob.solved(float(intermediate_result.fun)):
            raise StopIteration

    return callback


def section_mgh(out, gtol=1e-8, max_iters=500):
    print(
        "\n## More-Garbow-Hillstrom set: iterations until f* is reached (* = not reached in "
        "500 iterations or stopped at ||g||_inf <= 1e-8 elsewhere)\n"
    )
    names = [m[0] for m in MGH_METHODS]
    print("| problem | f* | scipy BFGS | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 3) + "|")
    rows = []
    for prob in mgh_problems():
        f, jac, _, _ = _np_funcs(prob)
        nit = [0]
        cb = _stop_when_solved(prob, nit)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sr = so.minimize(f, np.array(prob.x0), jac=jac, method="BFGS", callback=cb,
                             options={"gtol": gtol, "maxiter": max_iters})  # fmt: skip
        cells = [f"{nit[0]}{'' if prob.solved(float(sr.fun)) else '*'}"]
        row = dict(problem=prob.name, f_star=prob.f_star, scipy_bfgs=(nit[0], float(sr.fun)))
        for name, cls, kw in MGH_METHODS:
            r = minimize(prob, cls, gtol=gtol, max_iters=max_iters, until=prob.solved, **kw)
            ok = prob.solved(r.f)
            cells.append(f"{r.iterations}{'' if ok else '*'}")
            row[name] = dict(iterations=r.iterations, f=r.f, solved=ok)
        print(f"| {prob.name} | {prob.f_star:g} | " + " | ".join(cells) + " |", flush=True)
        rows.append(row)
    out["mgh"] = rows


def section_digits(out, adam_steps=500, max_iters=500):
    from torch import nn

    from hesse.data.digits import load_digits_tensors, make_mlp

    (X, y), _ = load_digits_tensors(D)
    loss_fn = nn.CrossEntropyLoss()

    def fresh():
        return make_mlp((64, 32, 10), "tanh", seed=0, dtype=D)

    best = None
    for lr in (3e-3, 1e-2, 3e-2):
        m = fresh()
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        t = time.perf_counter()
        for _ in range(adam_steps):
            opt.zero_grad()
            loss = loss_fn(m(X), y)
            loss.backward()
            opt.step()
        sec = time.perf_counter() - t
        with torch.no_grad():
            final = float(loss_fn(m(X), y))
        if best is None or final < best[1]:
            best = (lr, final, sec)
    lr, target, adam_sec = best
    print(f"\n## digits MLP 64-32-10 tanh, full batch, float64 (n = 2410, N = {len(y)})\n")
    print(
        f"Target: Adam(lr={lr}) after {adam_steps} steps, loss {target:.4g} ({adam_sec:.2f} s).\n"
    )
    print("| method | iterations to target | f evals | HVPs | wall time | time / Adam |")
    print("|---|---|---|---|---|---|")
    rows = [dict(method=f"Adam(lr={lr})", iterations=adam_steps, seconds=adam_sec, loss=target)]
    print(f"| Adam(lr={lr}) | {adam_steps} | {adam_steps} | 0 | {adam_sec:.2f} s | 1.00 |")
    methods = [
        ("Newton (CG, line search)", Newton, {"cg_max_iters": 100}),
        ("Newton (trust region, CG)", Newton, {"step_rule": "trust_region", "cg_max_iters": 100}),
        ("HessianFree (GGN)", HessianFree, {"damping": 1.0}),
        ("BFGS", BFGS, {}),
        ("LBFGS", LBFGS, {}),
        ("DFP", DFP, {}),
        ("SR1", SR1, {}),
    ]
    for name, cls, kw in methods:
        m = fresh()
        opt = cls(m.parameters(), **kw)

        def closure(m=m, opt=opt):
            opt.zero_grad()
            out_ = m(X)
            loss = loss_fn(out_, y)
            loss.backward()
            return loss, out_

        t = time.perf_counter()
        it, reached = 0, False
        while it < max_iters:
            opt.step(closure)
            it += 1
            st = opt.state[next(iter(m.parameters()))]
            cur = float(st["loss"]) if "loss" in st and "x" in st else None
            if cur is None:
                with torch.no_grad():
                    cur = float(loss_fn(m(X), y))
            if cur <= target:
                reached = True
                break
        sec = time.perf_counter() - t
        c = opt.counters
        mark = "" if reached else f" (not reached: {cur:.3g})"
        print(
            f"| {name} | {it}{mark} | {c['func_evals']} | {c['hvps']} | {sec:.2f} s | "
            f"{sec / adam_sec:.2f} |",
            flush=True,
        )
        rows.append(dict(method=name, steps=it, reached=reached, seconds=sec, **c))
    # torch LBFGS: one iteration per step call (max_iter=1); it re-evaluates at each call
    m = fresh()
    opt = torch.optim.LBFGS(
        m.parameters(), max_iter=1, history_size=10, line_search_fn="strong_wolfe"
    )

    def tclosure():
        opt.zero_grad()
        loss = loss_fn(m(X), y)
        loss.backward()
        return loss

    t = time.perf_counter()
    it, cur = 0, math.inf
    while it < max_iters and cur > target:
        opt.step(tclosure)
        it += 1
        with torch.no_grad():
            cur = float(loss_fn(m(X), y))
    sec = time.perf_counter() - t
    fe = opt.state[opt._params[0]]["func_evals"]
    name = "torch.optim.LBFGS(strong_wolfe)"
    print(f"| {name} | {it} | {fe} | 0 | {sec:.2f} s | {sec / adam_sec:.2f} |")
    rows.append(dict(method="torch LBFGS", iterations=it, func_evals=fe, seconds=sec))
    out["digits"] = dict(target=target, adam_lr=lr, rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="nw,scipy,torch,mgh,digits")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out: dict = {}
    secs = args.sections.split(",")
    if "nw" in secs:
        section_nw(out)
    if "scipy" in secs:
        section_scipy(out)
    if "torch" in secs:
        section_torch(out, args.repeats)
    if "mgh" in secs:
        section_mgh(out)
    if "digits" in secs:
        section_digits(out)
    if "autoencoder" in secs:
        import importlib.util
        from pathlib import Path

        spec = importlib.util.spec_from_file_location(
            "optimizers_kfac", Path(__file__).with_name("optimizers_kfac.py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out["autoencoder"] = mod.main(
            ["--tasks", "autoencoder", "--repeats", str(min(args.repeats, 3))]
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
