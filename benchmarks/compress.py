"""Compression targets of issue 7 on small ReLU MLPs trained on digits (one shot, no fine-tuning).

    python benchmarks/compress.py [--quick] [--json out.json]

Measures:
  1. accuracy at 70% global sparsity: OBS vs OBD vs magnitude vs dense (several models/seeds);
  2. OBS single-weight check on the digits model: quadratic-model loss increase vs saliency;
  3. layer output error of the second-order (OBS/GPTQ) quantizer / round-to-nearest at 3 and
     2 bits, on every layer (and against RTN with a searched clipping grid);
  4. Spearman correlation of the HAWQ-v2 sensitivity with the measured loss increase.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from hesse.compress import (
    compressible_weights,
    curvature_blocks,
    evaluate,
    layer_sensitivity,
    prune,
    quantize,
)
from hesse.compress.saliency import layer_obs_saliency
from hesse.data import default_workload


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pruning(models, sparsity=0.7):
    rows = []
    for widths, seed in models:
        wl = default_workload(widths=widths, activation="relu", seed=seed)
        row = {"model": wl.name, "seed": seed, "dense": wl.accuracy()}
        for method in ("magnitude", "obd", "obs"):
            m = copy.deepcopy(wl.model)
            t0 = time.process_time()
            prune(m, wl.loss_fn, wl.train, sparsity, method=method)
            row[method] = evaluate(m, wl.loss_fn, wl.test)["accuracy"]
            row[f"{method}_cpu_s"] = time.process_time() - t0
        row["obs_gap_points"] = 100 * (row["dense"] - row["obs"])
        rows.append(row)
        log(f"prune {sparsity}: {row}")
    return rows


def sweep(widths, sparsities=(0.5, 0.7, 0.8, 0.9)):
    wl = default_workload(widths=widths, activation="relu")
    out = []
    for s in sparsities:
        row = {"sparsity": s}
        for method in ("magnitude", "obd", "obs"):
            m = copy.deepcopy(wl.model)
            prune(m, wl.loss_fn, wl.train, s, method=method)
            row[method] = evaluate(m, wl.loss_fn, wl.test)["accuracy"]
        out.append(row)
        log(f"sweep {wl.name}: {row}")
    return out


def obs_check(widths=(64, 128, 10), layer="2", damping=1e-2):
    """Saliency vs 0.5 d^T (G + lambda I) d with the GGN block from hesse.GGNOperator."""
    import hesse

    wl = default_workload(widths=widths, activation="relu")
    model = copy.deepcopy(wl.model).double()
    data = tuple(t.double() if t.is_floating_point() else t for t in wl.train)
    ref = next(r for r in compressible_weights(model) if r.module_name == layer)
    G = hesse.GGNOperator(model, wl.loss_fn, data, params=[ref.param_name]).to_dense()
    H = G + damping * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    blocks = curvature_blocks(model, wl.loss_fn, data, block_size=None, layers=[layer])
    mask = torch.ones_like(ref.weight, dtype=torch.bool)
    sal = layer_obs_saliency(ref, blocks[ref.name], mask, damping=damping).reshape(-1)
    w = ref.weight.detach().reshape(-1)
    Hinv = torch.linalg.inv(H)
    rel = []
    for q in range(w.numel()):
        d = -(w[q] / Hinv[q, q]) * Hinv[:, q]
        inc = 0.5 * d @ H @ d
        rel.append(float((sal[q] - inc).abs() / inc.abs().clamp_min(1e-300)))
    out = {"layer": ref.name, "weights": w.numel(), "max_rel_error": max(rel)}
    log(f"OBS single-weight check: {out}")
    return out


def quantization(widths, bits=(3, 2)):
    wl = default_workload(widths=widths, activation="relu")
    out = []
    for b in bits:
        res = {}
        for label, method, kw in (
            ("rtn", "rtn", {}),
            ("rtn_search", "rtn", {"grid": "search"}),
            ("obs", "obs", {}),
            ("gptq_plain", "obs", {"grid": "minmax", "refine": 0}),
        ):
            m = copy.deepcopy(wl.model)
            r = quantize(m, wl.train, b, method=method, **kw)
            res[label] = {"layer_error": r.layer_error, **evaluate(m, wl.loss_fn, wl.test)}
        ratio = {
            k: res["obs"]["layer_error"][k] / res["rtn"]["layer_error"][k]
            for k in res["rtn"]["layer_error"]
        }
        ratio_s = {
            k: res["obs"]["layer_error"][k] / res["rtn_search"]["layer_error"][k]
            for k in res["rtn"]["layer_error"]
        }
        ratio_p = {
            k: res["gptq_plain"]["layer_error"][k] / res["rtn"]["layer_error"][k]
            for k in res["rtn"]["layer_error"]
        }
        row = {
            "model": wl.name,
            "bits": b,
            "obs_over_rtn": ratio,
            "obs_over_rtn_search": ratio_s,
            "gptq_plain_over_rtn": ratio_p,
            "accuracy": {k: v["accuracy"] for k, v in res.items()},
            "dense_accuracy": wl.accuracy(),
        }
        out.append(row)
        log(f"quantize: {row}")
    return out


def sensitivity(widths, bits=(2, 3, 4)):
    wl = default_workload(widths=widths, activation="relu")
    r = layer_sensitivity(
        wl.model,
        wl.loss_fn,
        wl.train,
        bits,
        measure=True,
        generator=torch.Generator().manual_seed(0),
    )
    row = {
        "model": wl.name,
        "layers": r.layers,
        "spearman_per_bits": {b: r.rank_correlation(b) for b in bits},
        "spearman_all_pairs": r.rank_correlation(),
        "sensitivity": r.sensitivity,
        "measured": r.measured,
        "trace_stderr_rel": {k: r.trace_stderr[k] / r.mean_trace[k] for k in r.layers},
    }
    log(
        f"sensitivity {wl.name}: per bits {row['spearman_per_bits']}, "
        f"all pairs {row['spearman_all_pairs']:.3f}"
    )
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one model per part")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    small, deep = (64, 128, 10), (64, 128, 128, 64, 10)
    models = (
        [(small, 0)] if args.quick else [(small, 0), (small, 1), ((64, 32, 32, 10), 0), (deep, 0)]
    )
    t0 = time.time()
    result = {
        "pruning_70": pruning(models),
        "obs_check": obs_check(),
        "quantization": [
            q for w in ([small] if args.quick else [small, deep]) for q in quantization(w)
        ],
        "sensitivity": [
            sensitivity(w) for w in ([deep] if args.quick else [deep, (64, 128, 128, 128, 64, 10)])
        ],
    }
    if not args.quick:
        result["sweep"] = sweep(small)
    result["wall_s"] = time.time() - t0
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
