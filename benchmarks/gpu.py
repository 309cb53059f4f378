"""hesse on one GPU: a GPT-2-small-shaped model (124M), float32 and bfloat16, one table.

For each dtype (``float32``: Hessian and GGN; ``bfloat16``: GGN) on random weights of a
Hugging Face ``GPT2LMHeadModel`` with GPT-2 small's shape (12 layers, d=768, 12 heads,
vocabulary 50257) and random tokens generated locally (no download), its own causal-LM loss
(``loss_fn=None``):

* one gradient, one curvature-vector product (median of ``--repeats``, after the product
  that builds the cached graph) and their ratio;
* the top-10 eigenvalues (:func:`hesse.top_eigenpairs`, ``--tol``) with products used and time;
* a spectral density (:func:`hesse.spectral_density`, ``--probes`` x ``--steps``) with time;
* peak GPU memory of the whole row.

bfloat16 products are seen by the algorithms through a float32 view (vectors cast down for
each product, results up), so bases, QR and Ritz problems run in float32.

Times are CUDA-synchronised wall times. Designed to finish in under 5 minutes on one
datacenter GPU; on a machine without CUDA it says so and exits (status 0) unless
``--device cpu`` is given, which runs the same pieces (use ``--tiny`` on a CPU: a 2-layer,
d=64 model with vocabulary 512, seconds).

Usage::

    python benchmarks/gpu.py                       # CUDA, GPT-2 small shape, batch 4 x 256
    python benchmarks/gpu.py --device cpu --tiny   # the same pieces at toy size, on CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

import hesse

SHAPES = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64),
    "toy": dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16),  # unit tests
}


def build(shape: str, dtype: torch.dtype, device: str, batch: int, seq: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        **SHAPES[shape], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False
    )
    torch.manual_seed(seed)  # HF initialises from the global RNG; this is a benchmark
    model = GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return model, [{"input_ids": ids, "labels": ids}]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[Any, float]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


class Float32View(hesse.LinearOperator):
    """A low-precision operator seen in float32: vectors are cast down for each product and
    the results up, so the algorithms (bases, QR, Ritz problems) run in float32."""

    def __init__(self, op: hesse.LinearOperator):
        super().__init__(op.shape, torch.float32, op.device, symmetric=op.symmetric, psd=op.psd)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op._matmat(V.to(self.op.dtype)).to(torch.float32)


def row(curvature: str, dtype: torch.dtype, args) -> dict[str, Any]:
    dev = args.device
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, data = build(args.shape, dtype, dev, args.batch, args.seq)
    op = hesse.curvature_operator(curvature, model, None, data)
    if dtype != torch.float32:
        op = Float32View(op)
    n = op.shape[0]
    gen = torch.Generator(device=dev).manual_seed(0)
    v = torch.randn(n, generator=gen, device=dev, dtype=torch.float32)
    gradient = (op.op if isinstance(op, Float32View) else op).gradient
    grads = [timed(gradient, dev)[1] for _ in range(args.repeats)]
    _, first = timed(lambda: op @ v, dev)  # builds the cached graph
    prods = [timed(lambda: op @ v, dev)[1] for _ in range(args.repeats)]
    eig, t_eig = timed(lambda: hesse.top_eigenpairs(op, 10, tol=args.tol, generator=gen), dev)
    dens, t_dens = timed(
        lambda: hesse.spectral_density(
            op, num_probes=args.probes, num_steps=args.steps, generator=gen
        ),
        dev,
    )
    g, p = statistics.median(grads), statistics.median(prods)
    out = {
        "dtype": str(dtype).removeprefix("torch."),
        "curvature": curvature,
        "n": n,
        "grad_s": g,
        "first_product_s": first,
        "product_s": p,
        "product_over_grad": p / g,
        "top10": [round(float(x), 6) for x in eig.eigenvalues],
        "top10_converged": bool(eig.converged),
        "top10_matvecs": eig.num_matvecs,
        "top10_s": t_eig,
        "density_matvecs": dens.num_matvecs,
        "density_s": t_dens,
    }
    if dev.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"{title}\n",
        "| dtype | curvature | product / gradient | gradient s | product s | top-10 "
        "(matvecs, s, converged) | density (matvecs, s) | peak GiB |",
        "|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['curvature']} | {r['product_over_grad']:.2f} | "
            f"{r['grad_s']:.3f} | {r['product_s']:.3f} | {r['top10_matvecs']}, "
            f"{r['top10_s']:.1f}, {r['top10_converged']} | {r['density_matvecs']}, "
            f"{r['density_s']:.1f} | {r.get('peak_gib', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--tiny", action="store_true", help="toy model (for CPU checks)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print(
                "benchmarks/gpu.py: no CUDA device here; nothing to measure. Run it on a "
                "machine with a GPU, or pass --device cpu --tiny to check its pieces."
            )
            return 0
        args.device = "cuda"
    args.shape = "tiny" if args.tiny else "gpt2-small"
    if args.tiny:
        args.seq = min(args.seq, 32)
    plan = [("hessian", torch.float32), ("ggn", torch.float32), ("ggn", torch.bfloat16)]
    rows = []
    for curvature, dtype in plan:
        rows.append(row(curvature, dtype, args))
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    title = (
        f"{args.shape}, batch {args.batch} x {args.seq} tokens, {name}, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(table(rows, title))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
