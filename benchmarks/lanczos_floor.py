"""Floor of single-vector (and block) Krylov methods for the top-k eigenvalues.

Runs unrestarted, fully reorthogonalised (block) Lanczos on the dense float64 Hessian of the
default digits MLP and reports, per start seed, the first basis size at which the k largest
Ritz values are all within ``tol`` (relative) of the true eigenvalues: no stopping rule can
certify earlier, so this is the least number of products any such method needs. Next to it,
what ``hesse.top_eigenpairs`` used (default and ``verify_matvecs=0``) and its error.

    python benchmarks/lanczos_floor.py [--k 10] [--tol 1e-3] [--seeds 20] [--blocks 1 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import hesse
from hesse.data.digits import default_workload


def floor(D: torch.Tensor, lam: torch.Tensor, k: int, tol: float, b: int, seed: int) -> int:
    n = D.shape[0]
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, b, generator=g, dtype=torch.float64))[0]
    V = Q
    while True:
        th = torch.linalg.eigvalsh(V.T @ D @ V).flip(0)[:k]
        if th.numel() >= k and float(((th - lam[:k]).abs() / lam[:k].abs()).max()) <= tol:
            return V.shape[1]
        W = D @ Q
        for _ in range(2):
            W = W - V @ (V.T @ W)
        Q = torch.linalg.qr(W)[0]
        V = torch.cat([V, Q], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = default_workload()
    H = hesse.HessianOperator(w.model, w.loss_fn, w.train)
    D = H.to_dense().double()
    lam = torch.linalg.eigvalsh(0.5 * (D + D.T)).flip(0)
    k, tol, seeds = args.k, args.tol, range(args.seeds)
    for b in args.blocks:
        f = [floor(D, lam, k, tol, b, s) for s in seeds]
        print(f"floor, block size {b}: median {statistics.median(f)} ({min(f)}-{max(f)})")
    for vm in (None, 0):
        c, e = [], []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            r = hesse.top_eigenpairs(H, k, tol=tol, verify_matvecs=vm, generator=g)
            c.append(r.num_matvecs)
            e.append(float(((r.eigenvalues.double() - lam[:k]).abs() / lam[:k]).max()))
        print(
            f"top_eigenpairs verify_matvecs={vm}: median {statistics.median(c)} "
            f"({min(c)}-{max(c)}) matvecs, max error {max(e):.1e}"
        )


if __name__ == "__main__":
    main()
