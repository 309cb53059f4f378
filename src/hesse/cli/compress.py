"""``hesse compress``: pruning and quantization report (:func:`hesse.compress.compression_report`).

With no ``--model`` it trains a small ReLU MLP on digits (``--widths``, default 64-128-10);
``--workload lm`` compresses the shipped language model (every Linear layer and the tied
embedding / output layer), calibrated on training windows, and reports test perplexity.
Every option is checked before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import (
    OutputDir,
    UsageError,
    add_model_options,
    add_output_options,
    add_runtime_options,
    check_model_args,
    library_errors,
    load_model_and_data,
    new_parser,
    setup_runtime,
)

__all__ = ["add_parser"]

FILES = ("compress.json", "compress.md", "compress.png")
PRUNE_METHODS = ("magnitude", "obd", "obs")
QUANT_METHODS = ("rtn", "obs")
PRUNE_CURVATURES = ("ggn", "fisher", "layerwise")
# defaults per workload (--model uses the digits column)
DEFAULTS = {
    "digits": dict(
        sparsity="0.5,0.7,0.8,0.9",
        prune_methods="magnitude,obd,obs",
        bits="2,3,4,8",
        average_bits="3",
        scope="global",
        prune_curvature="ggn",
    ),
    # GPTQ/SparseGPT setting: 4/3 bits, 50% per layer with the layer-wise Hessian; no
    # HAWQ mixed precision (its Hutchinson traces of the LM's Hessian take minutes)
    "lm": dict(
        sparsity="0.5",
        prune_methods="magnitude,obs",
        bits="4,3",
        average_bits="",
        scope="layer",
        prune_curvature="layerwise",
    ),
}


def _floats(text: str, opt: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise UsageError(f"--{opt} {text!r}: not a list of numbers ({e}).") from e


def _names(text: str, opt: str, allowed: tuple[str, ...]) -> list[str]:
    names = [m for m in text.replace(",", " ").split() if m]
    bad = [m for m in names if m not in allowed]
    if bad:
        raise UsageError(f"--{opt}: unknown {', '.join(bad)}; expected some of {list(allowed)}.")
    return names


def add_parser(subparsers: Any, name: str = "compress") -> None:
    p = new_parser(
        subparsers,
        name,
        help="pruning (OBS/OBD/magnitude) and quantization (OBS/RTN) report",
        description=(
            "Prune a model one-shot at several sparsities (OBS, OBD, magnitude) and quantize it "
            "at several bit widths (layer-wise second-order OBS/GPTQ vs round-to-nearest, and "
            "mixed precision from HAWQ-v2 sensitivity), then measure test accuracy (perplexity "
            "for --workload lm) and loss. With no --model it trains a small ReLU MLP on "
            "digits; --workload lm compresses the shipped language model (all Linear layers and "
            "the tied embedding/output layer), calibrated on --calib training windows. Writes "
            "compress.json, compress.md and compress.png to --out."
        ),
    )
    add_model_options(p, test_data=True)
    g = p.add_argument_group("default workload")
    g.add_argument("--widths", default="64,128,10", help="digits MLP layer widths")
    g.add_argument("--activation", default="relu", help="digits MLP activation")
    g.add_argument("--steps", type=int, default=300, help="full-batch Adam training steps")
    g.add_argument(
        "--calib",
        type=int,
        default=128,
        help="--workload lm: training windows (64 characters each) for calibration",
    )
    g.add_argument(
        "--test-windows",
        type=int,
        help="--workload lm: held-out windows for the test perplexity (default: all 640)",
    )
    g = p.add_argument_group("compression (defaults: digits / --workload lm)")
    g.add_argument("--sparsity", help="pruning levels (fractions) (default: 0.5,0.7,0.8,0.9 / 0.5)")
    g.add_argument(
        "--prune-methods", help="pruning methods (default: magnitude,obd,obs / magnitude,obs)"
    )
    g.add_argument(
        "--prune-curvature",
        choices=PRUNE_CURVATURES,
        help="OBS curvature: exact GGN or empirical Fisher blocks of the loss, or each "
        "layer's output reconstruction Hessian 2 X^T X (SparseGPT; needs --scope layer) "
        "(default: ggn / layerwise)",
    )
    g.add_argument(
        "--scope",
        choices=["global", "layer"],
        help="prune to the sparsity over all layers at once, or in every layer "
        "(default: global / layer)",
    )
    g.add_argument("--bits", help="uniform bit widths (default: 2,3,4,8 / 4,3)")
    g.add_argument("--quant-methods", default="rtn,obs", help="quantization methods")
    g.add_argument(
        "--average-bits",
        help="mixed-precision budgets in bits per weight, each >= the smallest of --bits "
        "('' to skip) (default: 3 / '')",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=128,
        help="OBS pruning block size (entries; columns per lazy block for layerwise)",
    )
    add_runtime_options(p)
    add_output_options(p, "hesse-compress")
    p.set_defaults(func=_run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every option parsed and cross-checked (before any model is built)."""
    kind = "lm" if args.model is None and args.workload == "lm" else "digits"
    for k, v in DEFAULTS[kind].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    sparsities = _floats(args.sparsity, "sparsity")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise UsageError(f"--sparsity: each level must be in [0, 1), got {bad}.")
    bits_f = _floats(args.bits, "bits")
    if any(b != int(b) or not 1 <= b <= 16 for b in bits_f):
        raise UsageError(f"--bits: whole numbers from 1 to 16 expected, got {args.bits!r}.")
    bits = [int(b) for b in bits_f]
    average = _floats(args.average_bits, "average-bits") if args.average_bits.strip() else []
    if average and _names(args.quant_methods, "quant-methods", QUANT_METHODS):
        low = [a for a in average if not bits or a < min(bits)]
        if low:
            have = f"is {min(bits)} bits" if bits else "does not exist (no --bits)"
            raise UsageError(
                f"--average-bits {', '.join(f'{a:g}' for a in low)} cannot be met: the "
                f"smallest width in --bits {have}, and a mixed-precision budget allocates "
                "among those widths. Add a smaller width to --bits, raise --average-bits, or "
                "pass --average-bits '' to skip mixed precision."
            )
    if args.steps < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}.")
    if args.block_size < 1:
        raise UsageError(f"--block-size must be >= 1, got {args.block_size}.")
    widths = [int(w) for w in _floats(args.widths, "widths")]
    if args.model is None and (
        len(widths) < 2 or widths[0] != 64 or widths[-1] != 10 or min(widths) < 1
    ):
        raise UsageError(
            f"--widths must start with 64 and end with 10 for digits, got {args.widths!r}."
        )
    if args.calib < 1:
        raise UsageError(f"--calib must be >= 1, got {args.calib}.")
    if args.test_windows is not None and args.test_windows < 1:
        raise UsageError(f"--test-windows must be >= 1, got {args.test_windows}.")
    prune_methods = _names(args.prune_methods, "prune-methods", PRUNE_METHODS)
    if args.prune_curvature == "layerwise":
        if "obd" in prune_methods:
            raise UsageError(
                "--prune-curvature layerwise is an OBS option; drop obd from --prune-methods "
                "or pick --prune-curvature ggn/fisher."
            )
        if args.scope != "layer":
            raise UsageError(
                "--prune-curvature layerwise needs --scope layer (layer-wise reconstruction "
                "errors are not comparable across layers)."
            )
    return dict(
        sparsities=sparsities,
        prune_methods=prune_methods,
        bits=bits,
        quant_methods=_names(args.quant_methods, "quant-methods", QUANT_METHODS),
        average_bits=average,
        scope=args.scope,
        prune_kwargs={"block_size": args.block_size, "curvature": args.prune_curvature},
        metric="perplexity" if kind == "lm" else "accuracy",
        widths=widths,
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..compress import compression_report

    device = setup_runtime(args)
    check_model_args(args)
    if args.train_mode:
        raise UsageError(
            "--train-mode is not supported by hesse compress: its curvature statistics and "
            "accuracy are measured in eval mode (hesse.compress has no train-mode option yet)."
        )
    kw = _settings(args)
    widths = kw.pop("widths")
    out = OutputDir(args.out, FILES, overwrite=args.overwrite)
    if args.model is None and args.workload == "lm":
        loaded = load_model_and_data(args, device, num_train=args.calib, num_test=args.test_windows)
    elif args.model is None:
        if args.activation not in ("tanh", "relu", "gelu", "sigmoid"):
            raise UsageError(
                f"--activation {args.activation!r}: expected tanh, relu, gelu or sigmoid."
            )
        if not args.no_progress:
            print(
                f"training the digits MLP {widths} ({args.steps} Adam steps) ...", file=sys.stderr
            )
        loaded = load_model_and_data(
            args, device, widths=widths, activation=args.activation, steps=args.steps
        )
    else:
        loaded = load_model_and_data(args, device)
    with library_errors():
        report = compression_report(
            loaded.model,
            loaded.loss_fn,
            loaded.train,
            loaded.test,
            **kw,
            name=loaded.name,
            generator=torch.Generator().manual_seed(args.seed),
            progress=not args.no_progress,
        )
    print(report.to_markdown())
    files = out.write(lambda d: report.save(d, plot=not args.no_plots))
    print(f"wrote {len(files)} files to {args.out}/: " + ", ".join(f.name for f in files))
    return 0
