"""The embedded LM workload (issue 16): corpus, shipped weights, block spectra, adaptive edge
of stability, quantization/pruning and optimizer tables.

Subcommands (each prints its table; ``--json PATH`` also writes it)::

    python benchmarks/lm.py corpus DIR     # regenerate lm_train.txt / lm_test.txt (CPython 3.11)
    python benchmarks/lm.py weights        # retrain the shipped weights (~50 s CPU), print losses
    python benchmarks/lm.py workload       # train/test loss of the shipped model vs unigram

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("dir")
    sub.add_parser("weights")
    sub.add_parser("workload")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "corpus":
        if sys.version_info[:2] != (3, 11):
            print("warning: the shipped corpus was built from CPython 3.11", file=sys.stderr)
        result = build_corpus(args.dir)
    else:
        result = {"weights": cmd_weights, "workload": cmd_workload}[args.cmd](args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
