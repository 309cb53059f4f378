"""Per-block Hessian spectra of the embedded LM (block heterogeneity, Zhang et al. 2024).

For every weight matrix of the trained LM workload (token/position embeddings, attention
``q``/``k``/``v``/``o`` and MLP ``fc1``/``fc2`` of each layer) computes the top eigenvalue,
trace and SLQ spectral density of its diagonal Hessian block, then the pairwise
Jensen-Shannon distances between the block densities, and writes a heat map. The LM-vs-CNN
table (at initialisation and trained) is ``python benchmarks/lm.py blocks``.

Run (about 4 CPU-minutes on one core)::

    python examples/lm_block_spectra.py --out lm_blocks_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hesse import block_spectra
from hesse.data import lm_workload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=8, help="training windows for the Hessian")
    p.add_argument("--normalize", choices=["none", "radius"], default="none")
    p.add_argument("--out", default="lm_blocks_out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    w = lm_workload(num_train=args.sequences)
    res = block_spectra(
        w.model,
        w.loss_fn,
        w.train,
        normalize=args.normalize,
        generator=torch.Generator().manual_seed(0),
    )
    print(f"{'block':28s} {'n':>6} {'lambda_max':>11} {'trace':>10}")
    for b in res.blocks:
        print(f"{b.name:28s} {b.n:6d} {b.lambda_max:11.4g} {b.trace:10.4g}")
    print(f"mean pairwise JS distance ({args.normalize}): {res.mean_js:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res.plot(out / "lm_block_spectra.png", title="LM workload: Hessian block spectra")
    (out / "lm_block_spectra.json").write_text(json.dumps(res.to_dict(), indent=1))
    print(f"wrote {out / 'lm_block_spectra.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
