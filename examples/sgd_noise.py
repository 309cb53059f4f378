"""SGD noise finds flatter minima: final sharpness against batch size on digits.

The same tanh MLP is trained with plain SGD at one learning rate and batch sizes from 8 up to
the full training set, each run until the full training loss falls below ``--target-loss``.
Then the flatness of the solution is measured on the whole training set: ``lambda_max`` of
the Hessian (Lanczos), its trace (Hutch++, with standard error) and epsilon-sharpness. Smaller
batches (more gradient noise) end in flatter minima: lower ``lambda_max`` and trace
(Keskar et al., 2017; Jastrzebski et al., 2018). Epsilon-sharpness is reported too; at a
finite loss threshold it is dominated by the first-order term ``epsilon * ||g||`` (the runs
stop at different gradient norms), so it is not a clean curvature measure here.

Run (a minute or two on one CPU core)::

    python examples/sgd_noise.py --out sgd_noise_out

Writes ``sgd_noise_out/sgd_noise.png`` (final ``lambda_max`` and trace vs batch size, mean and
spread over seeds) and ``sgd_noise_out/sgd_noise.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from hesse.analysis import curvature_operator, curvature_trace, epsilon_sharpness, lambda_max
from hesse.data import load_digits_tensors, make_mlp


def train(batch: int, seed: int, X, Y, loss_fn, args) -> tuple[nn.Module, int, float]:
    model = make_mlp(tuple(args.widths), "tanh", seed=args.init_seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    steps = 0
    while steps < args.max_steps:
        perm = torch.randperm(N, generator=g) if batch < N else torch.arange(N)
        for i in range(0, N - batch + 1, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(model(X[idx]), Y[idx]).backward()
            opt.step()
            steps += 1
        with torch.no_grad():
            full = float(loss_fn(model(X), Y))
        if full < args.target_loss:
            break
    return model, steps, full


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 32, 128, 0], help="0 = full batch"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 32, 10])
    p.add_argument("--target-loss", type=float, default=0.01)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--epsilon", type=float, default=0.1, help="epsilon-sharpness radius")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--out", default="sgd_noise_out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (X, y), _ = load_digits_tensors(torch.float32)
    X, y = X[: args.num_samples], y[: args.num_samples]
    Y, loss_fn = nn.functional.one_hot(y, 10).to(X.dtype), nn.MSELoss()
    N = X.shape[0]
    sizes = [N if b == 0 else b for b in args.batch_sizes]

    rows = []
    print(
        f"{'batch':>6} {'seed':>4} {'steps':>6} {'loss':>8} {'lambda_max':>10} "
        f"{'trace':>12} {'eps-sharp':>10} {'2/lr':>6} {'sec':>5}"
    )
    for B in sizes:
        for seed in args.seeds if B < N else args.seeds[:1]:  # full batch is deterministic
            t0 = time.perf_counter()
            model, steps, loss = train(B, seed, X, Y, loss_fn, args)
            H = curvature_operator(model, loss_fn, (X, Y), "hessian")
            gen = torch.Generator().manual_seed(0)
            lam = float(lambda_max(H, generator=gen).eigenvalues[0])
            tr = curvature_trace(H, num_matvecs=60, generator=gen)
            eps = epsilon_sharpness(
                model, loss_fn, (X, Y), epsilon=args.epsilon, num_steps=10, generator=gen
            )
            row = {
                "batch": B,
                "seed": seed,
                "steps": steps,
                "loss": loss,
                "lambda_max": lam,
                "trace": float(tr.estimate),
                "trace_stderr": float(tr.stderr),
                "epsilon_sharpness": eps.sharpness,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"{B:6d} {seed:4d} {steps:6d} {loss:8.4f} {lam:10.4f} "
                f"{row['trace']:7.2f}+-{row['trace_stderr']:4.2f} {eps.sharpness:10.5f} "
                f"{2 / args.lr:6.2f} {row['seconds']:5.1f}"
            )

    def agg(key):
        means, spreads = [], []
        for B in sizes:
            vals = torch.tensor([r[key] for r in rows if r["batch"] == B], dtype=torch.float64)
            means.append(float(vals.mean()))
            spreads.append(float(vals.std()) if vals.numel() > 1 else 0.0)
        return means, spreads

    lam_mean, lam_sd = agg("lambda_max")
    tr_mean, _ = agg("trace")
    eps_mean, _ = agg("epsilon_sharpness")
    monotone = all(a < b for a, b in zip(lam_mean, lam_mean[1:]))
    summary = {
        "batch_sizes": sizes,
        "lambda_max_mean": lam_mean,
        "lambda_max_std": lam_sd,
        "trace_mean": tr_mean,
        "epsilon_sharpness_mean": eps_mean,
        "lambda_max_increases_with_batch": monotone,
    }
    (out / "sgd_noise.json").write_text(
        json.dumps({"args": vars(args), "runs": rows, "summary": summary}, indent=1)
    )
    print(
        "mean lambda_max by batch size:",
        ", ".join(f"{B}: {m:.3f}" for B, m in zip(sizes, lam_mean)),
    )
    print("smaller batches end flatter (lambda_max increasing with batch size):", monotone)
    try:
        from hesse.plot import plot_sharpness_vs_batch_size

        plot_sharpness_vs_batch_size(
            sizes,
            lam_mean,
            out / "sgd_noise.png",
            errors=lam_sd,
            extra={"trace (Hutch++)": tr_mean},
            title=f"SGD noise (lr={args.lr}, digits N={N}, tanh MLP): final sharpness vs batch",
        )
        print(f"wrote {out / 'sgd_noise.png'}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
