"""``hesse compress``: pruning and quantization report of a model (table, JSON, PNG).

One subcommand, one public function: :func:`hesse.compress.compression_report`. With no
``--model`` it trains a small ReLU MLP on digits (``--widths``, default 64-128-10).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["add_parser"]

_LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.replace(",", " ").split()]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "compress",
        help="pruning (OBS/OBD/magnitude) and quantization (OBS/RTN) report",
        description=(
            "Prune a model one-shot at several sparsities (OBS, OBD, magnitude) and quantize it "
            "at several bit widths (layer-wise second-order OBS/GPTQ vs round-to-nearest, and "
            "mixed precision from HAWQ-v2 sensitivity), then measure test accuracy and loss. "
            "With no --model it trains a small ReLU MLP on digits. Writes compress.json, "
            "compress.md and compress.png to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="callable returning a trained nn.Module (module path or file.py:name)",
    )
    p.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="callable returning calibration/curvature data (X, y) or batches",
    )
    p.add_argument(
        "--test-data",
        metavar="MODULE:FACTORY",
        help="callable returning evaluation data (default: --data)",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="state_dict to load into --model")
    p.add_argument("--loss", choices=sorted(_LOSSES), default="ce")
    p.add_argument("--widths", default="64,128,10", help="default workload: MLP layer widths")
    p.add_argument("--activation", default="relu", help="default workload: activation")
    p.add_argument("--steps", type=int, default=300, help="default workload: Adam steps")
    p.add_argument("--sparsity", default="0.5,0.7,0.8,0.9", help="pruning levels")
    p.add_argument("--prune-methods", default="magnitude,obd,obs")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--bits", default="2,3,4,8", help="uniform bit widths")
    p.add_argument("--quant-methods", default="rtn,obs")
    p.add_argument(
        "--average-bits",
        default="3",
        help="mixed-precision budgets in bits per weight ('' to skip)",
    )
    p.add_argument("--block-size", type=int, default=128, help="OBS pruning block size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hesse-compress", help="output folder")
    p.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from .report import compression_report

    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".hesse-probe-", dir=out.parent))
        if out.exists() and not out.is_dir():
            raise OSError(f"{out} exists and is not a folder")
    except OSError as e:
        raise UsageError(f"cannot write to --out {args.out!r}: {e}") from e
    try:
        sparsities = _floats(args.sparsity)
        bits = [int(b) for b in _floats(args.bits)]
        average_bits = _floats(args.average_bits) if args.average_bits.strip() else []
        widths = [int(w) for w in _floats(args.widths)]
    except ValueError as e:
        raise UsageError(f"cannot parse a number list: {e}") from e
    prune_methods = [m for m in args.prune_methods.replace(",", " ").split() if m]
    quant_methods = [m for m in args.quant_methods.replace(",", " ").split() if m]
    if args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}.")
    loss_fn = _LOSSES[args.loss]()
    if args.model is None:
        if args.data or args.test_data or args.checkpoint:
            raise UsageError("--data/--test-data/--checkpoint need --model as well.")
        if len(widths) < 2 or widths[0] != 64 or widths[-1] != 10 or min(widths) < 1:
            raise UsageError(
                f"--widths must start with 64 and end with 10 for digits, got {args.widths!r}."
            )
        from ..data import default_workload

        try:
            w = default_workload(
                seed=args.seed, widths=widths, activation=args.activation, steps=args.steps
            )
        except ValueError as e:
            raise UsageError(str(e)) from e
        model, train, test, name = w.model, w.train, w.test, w.name
    else:
        from ..report.analyze import _load_factory

        if args.data is None:
            raise UsageError("--model needs --data MODULE:FACTORY.")
        model = _load_factory(args.model, "model")
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model returned {type(model).__name__}, not an nn.Module.")
        if args.checkpoint:
            try:
                state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
                model.load_state_dict(state)
            except Exception as e:
                raise UsageError(f"--checkpoint {args.checkpoint!r}: {e}") from e
        train = _load_factory(args.data, "data")
        test = _load_factory(args.test_data, "test-data") if args.test_data else None
        name = args.model
    try:
        report = compression_report(
            model,
            loss_fn,
            train,
            test,
            sparsities=sparsities,
            prune_methods=prune_methods,
            bits=bits,
            quant_methods=quant_methods,
            average_bits=average_bits,
            scope=args.scope,
            prune_kwargs={"block_size": args.block_size},
            name=name,
            generator=torch.Generator().manual_seed(args.seed),
            progress=not args.quiet,
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(str(e).splitlines()[0]) from e
    except RuntimeError as e:
        raise UsageError(f"model and data do not fit together: {str(e).splitlines()[0]}") from e
    print(report.to_markdown())
    files = report.save(out, plot=not args.no_plots)
    print(f"wrote {len(files)} files to {out}/: " + ", ".join(f.name for f in files))
    return 0
