"""The embedded LM workload (issue 16): corpus, shipped weights, block spectra, adaptive edge
of stability, quantization/pruning and optimizer tables.

Subcommands (each prints its table; ``--json PATH`` also writes it)::

    python benchmarks/lm.py corpus DIR     # regenerate lm_train.txt / lm_test.txt (CPython 3.11)
    python benchmarks/lm.py weights        # retrain the shipped weights (~50 s CPU), print losses
    python benchmarks/lm.py workload       # train/test loss of the shipped model vs unigram
    python benchmarks/lm.py blocks --out DIR    # block heterogeneity: JS table, LM vs CNN
    python benchmarks/lm.py compress       # test perplexity: float, RTN/OBS 4/3 bits, pruning

All runs use one thread (``torch.set_num_threads(1)``) and fixed seeds; times are CPU time of
the main thread (``time.thread_time``).
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

from hesse.data import lm as lm_data


def build_corpus(out_dir: str | Path, per_module: int = 4000) -> dict[str, int]:
    """Docstrings of the top-level stdlib modules, sorted by module, ASCII only; at most
    ``per_module`` characters per module; every tenth docstring goes to the test split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    per: collections.Counter[str] = collections.Counter()
    kept = []
    for f in sorted(root.glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, kinds):
                continue
            d = ast.get_docstring(node, clean=True)
            if not d:
                continue
            d = "".join(c for c in d.replace("\t", "    ") if c == "\n" or 32 <= ord(c) < 127)
            d = "\n".join(line.rstrip() for line in d.splitlines()).strip()
            if len(d) < 40 or per[f.stem] + len(d) > per_module:
                continue
            per[f.stem] += len(d)
            kept.append(d)
    out = Path(out_dir)
    train = [d for i, d in enumerate(kept) if i % 10 != 9]
    test = [d for i, d in enumerate(kept) if i % 10 == 9]
    (out / "lm_train.txt").write_text("\n\n".join(train) + "\n", encoding="ascii")
    (out / "lm_test.txt").write_text("\n\n".join(test) + "\n", encoding="ascii")
    return {"modules": len(per), "train_docs": len(train), "test_docs": len(test)}


def workload_row(w: lm_data.LMWorkload) -> dict[str, float]:
    full_train = lm_data.lm_sequences(lm_data.lm_corpus("train"), w.model.config.context)
    with torch.no_grad():
        train_loss = float(w.loss_fn(w.model(full_train[0]), full_train[1]))
    return {
        "params": sum(p.numel() for p in w.model.parameters()),
        "train_loss": train_loss,
        "test_loss": w.loss("test"),
        "unigram_train": lm_data.unigram_loss(full_train[1], full_train[1]),
        "unigram_test": w.unigram_loss("test"),
        "test_accuracy": w.accuracy("test"),
    }


def cmd_weights(args: argparse.Namespace) -> dict:
    model = lm_data.CausalTransformer(seed=0)
    X, y = lm_data.lm_sequences(lm_data.lm_corpus("train"), model.config.context)
    t = time.thread_time()
    hist = lm_data.train_lm(model, X, y, seed=0)
    cpu = time.thread_time() - t
    path = Path(lm_data.__file__).with_name("lm_weights.npz")
    lm_data.save_lm_weights(model, path, seed=0, steps=len(hist), torch=torch.__version__)
    row = {"train_cpu_s": cpu, "last_batch_loss": hist[-1], **workload_row(lm_data.lm_workload())}
    print(f"wrote {path}")
    return row


def cmd_workload(args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    w = lm_data.lm_workload()
    return {"load_s": time.perf_counter() - t, **workload_row(w)}


def make_cnn(seed: int = 0) -> torch.nn.Sequential:
    """A ReLU CNN for 8x8 digits of about the LM's size (241,546 parameters): conv 1-32-64,
    max-pool, conv 64-128-128, global average pool, linear 128-10."""
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def cnn_task(seed: int = 0, steps: int = 300, batch_size: int = 128):
    """``(model_at_init, trained_model, loss_fn, (X, y) train, (X, y) test)`` for the CNN:
    Adam(1e-3) on random minibatches of the digits training images (fixed generator)."""
    import copy

    from hesse.data import load_digits_tensors

    (Xtr, ytr), (Xte, yte) = load_digits_tensors(seed=seed)
    Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    init = make_cnn(seed)
    model = copy.deepcopy(init)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(Xtr), (batch_size,), generator=g)
        opt.zero_grad()
        loss_fn(model(Xtr[i]), ytr[i]).backward()
        opt.step()
    return init.eval(), model.eval(), loss_fn, (Xtr, ytr), (Xte, yte)


def cmd_blocks(args: argparse.Namespace) -> dict:
    """Mean pairwise JS distance of the diagonal Hessian blocks (every weight matrix), LM vs
    CNN, at initialisation and trained, both normalisations (one SLQ run serves both)."""
    import dataclasses

    from hesse.analysis import block_spectra

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = lm_data.lm_workload(num_train=args.lm_sequences)
    lm_init = lm_data.CausalTransformer(seed=0).eval()
    cnn_init, cnn, cnn_loss, cnn_train, cnn_test = cnn_task()
    with torch.no_grad():
        cnn_acc = float((cnn(cnn_test[0]).argmax(1) == cnn_test[1]).double().mean())
    cnn_data = (cnn_train[0][: args.cnn_images], cnn_train[1][: args.cnn_images])
    cases = {
        "LM init": (lm_init, w.loss_fn, w.train),
        "LM trained": (w.model, w.loss_fn, w.train),
        "CNN init": (cnn_init, cnn_loss, cnn_data),
        "CNN trained": (cnn, cnn_loss, cnn_data),
    }
    rows = {}
    for name, (model, loss_fn, data) in cases.items():
        t = time.thread_time()
        res = block_spectra(
            model,
            loss_fn,
            data,
            num_probes=args.probes,
            num_steps=args.steps,
            num_matvecs=args.eig_matvecs,
            generator=torch.Generator().manual_seed(0),
        )
        cpu = time.thread_time() - t
        # the same quadratures on the radius-normalised grid (no new products)
        from hesse.analysis.blocks import _common_densities, js_distance

        grid, dens, sig = _common_densities(res.blocks, "radius", 512, None)
        js = js_distance(dens.unsqueeze(1), dens.unsqueeze(0)).fill_diagonal_(0.0)
        res_r = dataclasses.replace(
            res, grid=grid, densities=dens, js=js, normalize="radius", sigma=sig
        )
        tag = name.lower().replace(" ", "_")
        res.save(out / f"blocks_{tag}.json")
        res.plot(out / f"blocks_{tag}.png", title=f"{name}: Hessian block spectra")
        res_r.plot(out / f"blocks_{tag}_radius.png", title=f"{name}: normalised block spectra")
        lam = [b.lambda_max for b in res.blocks]
        rows[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "blocks": len(res.blocks),
            "mean_js_raw": res.mean_js,
            "mean_js_radius": res_r.mean_js,
            "lambda_max_ratio": max(lam) / max(min(lam), 1e-30),
            "num_matvecs": res.num_matvecs,
            "cpu_s": cpu,
            "lambda_max": {b.name: b.lambda_max for b in res.blocks},
        }
        print(
            f"{name:12s} blocks={len(res.blocks):3d} JS raw={res.mean_js:.3f} "
            f"radius={res_r.mean_js:.3f} cpu={cpu:.0f}s",
            flush=True,
        )
    rows["meta"] = {
        "lm_test_loss": w.loss(),
        "cnn_test_accuracy": cnn_acc,
        "lm_sequences": args.lm_sequences,
        "cnn_images": args.cnn_images,
        "probes": args.probes,
        "steps": args.steps,
        "eig_matvecs": args.eig_matvecs,
    }
    return rows


def perplexity(model: torch.nn.Module, data: tuple) -> float:
    import math

    with torch.no_grad():
        return math.exp(float(lm_data.lm_loss()(model(data[0]), data[1])))


def cmd_compress(args: argparse.Namespace) -> dict:
    """Test perplexity of the shipped LM after 4/3-bit quantization (RTN vs the second-order
    quantizer) and 50% pruning (magnitude vs layer-wise OBS), calibration on training
    windows; once for every Linear layer plus the tied embedding/output layer ("all") and
    once for the Linear layers only ("linear", the tied weight stays float)."""
    import copy

    from hesse import compress

    w = lm_data.lm_workload(num_train=args.calib)
    refs = [r.name for r in compress.compressible_weights(w.model)]
    linear = [
        r.module_name for r in compress.compressible_weights(w.model) if r.name != "tok.weight"
    ]
    rows: dict[str, dict] = {"float": {"ppl": perplexity(w.model, w.test)}}
    print(f"compressible weights ({len(refs)}): {refs[:3]} ...", flush=True)

    def run(key: str, fn) -> None:
        m = copy.deepcopy(w.model)
        t = time.thread_time()
        extra = fn(m) or {}
        rows[key] = {"ppl": perplexity(m, w.test), "cpu_s": time.thread_time() - t, **extra}
        print(key, rows[key], flush=True)

    for which, layers in (("all", None), ("linear", linear)):
        for bits in args.bits:
            for method in ("rtn", "obs"):

                def q(m, bits=bits, method=method, layers=layers):
                    res = compress.quantize(m, w.train, bits, method=method, layers=layers)
                    err = res.layer_error
                    return {
                        "layers": len(res.bits),
                        "mean_layer_error": sum(err.values()) / len(err),
                    }

                run(f"{which} {bits}-bit {method}", q)
        for method, scope, kw in (
            ("magnitude", "global", {}),
            ("magnitude", "layer", {}),
            ("obs", "layer", {"curvature": "layerwise"}),
        ):

            def p(m, method=method, scope=scope, kw=kw, layers=layers):
                compress.prune(
                    m,
                    w.loss_fn,
                    w.train,
                    args.sparsity,
                    method=method,
                    scope=scope,
                    layers=layers,
                    **kw,
                )
                return {"sparsity": compress.sparsity_of(m, layers)["global"]}

            run(f"{which} prune {args.sparsity:g} {method} {scope}", p)
    f = rows["float"]["ppl"]
    for r in rows.values():
        r["vs_float"] = r["ppl"] / f - 1.0
    rows["meta"] = {"compressed": refs, "calib_sequences": args.calib}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("dir")
    sub.add_parser("weights")
    sub.add_parser("workload")
    b = sub.add_parser("blocks")
    b.add_argument("--out", default="lm_blocks_out")
    b.add_argument("--lm-sequences", type=int, default=8)
    b.add_argument("--cnn-images", type=int, default=128)
    b.add_argument("--probes", type=int, default=2)
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--eig-matvecs", type=int, default=30)
    q = sub.add_parser("compress")
    q.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    q.add_argument("--calib", type=int, default=128, help="calibration training sequences")
    q.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "corpus":
        if sys.version_info[:2] != (3, 11):
            print("warning: the shipped corpus was built from CPython 3.11", file=sys.stderr)
        result = build_corpus(args.dir)
    else:
        result = {
            "weights": cmd_weights,
            "workload": cmd_workload,
            "blocks": cmd_blocks,
            "compress": cmd_compress,
        }[args.cmd](args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
