"""``hesse track``: train with a torch optimizer while tracking sharpness
(:class:`hesse.SharpnessTracker`): the edge-of-stability experiment as a command."""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
import warnings
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

FILES = ("sharpness.csv", "sharpness.json", "sharpness.png")


def add_parser(subparsers: Any, name: str = "track") -> None:
    p = new_parser(
        subparsers,
        name,
        help="train with a torch optimizer for N steps while tracking sharpness",
        description=(
            "Train a model with a torch.optim optimizer and measure the top Hessian eigenvalue "
            "lambda_max every --every steps (warm-started Lanczos), with the stability limit "
            "2/lr and the edge-of-stability ratio lr * lambda_max / 2 (for Adam-like "
            "optimizers also the preconditioned sharpness). With no model it trains the digits "
            "MLP from its initialisation. Writes sharpness.csv, sharpness.json and "
            "sharpness.png to --out; Ctrl-C keeps the checks made so far."
        ),
    )
    add_model_options(p)
    g = p.add_argument_group("training")
    g.add_argument("--optimizer", default="SGD", help="a torch.optim class: SGD, Adam, AdamW, ...")
    g.add_argument("--lr", type=float, default=0.5, help="learning rate")
    g.add_argument(
        "--optimizer-args",
        default="",
        metavar="K=V,...",
        help="more optimizer arguments as Python literals, e.g. 'momentum=0.9' or "
        "'betas=(0.9, 0.99)' (default: none)",
    )
    g.add_argument("--steps", type=int, default=200, help="optimizer steps")
    g.add_argument("--every", type=int, default=10, help="measure every this many steps")
    g.add_argument(
        "--curvature",
        choices=["hessian", "ggn", "fisher"],
        default="hessian",
        help="matrix whose top eigenvalue is tracked",
    )
    g.add_argument("--tol", type=float, default=1e-3, help="relative eigenvalue tolerance")
    g.add_argument("--per-layer", action="store_true", help="also track each layer's block")
    g.add_argument("--lambda-min", action="store_true", help="also track the smallest eigenvalue")
    add_runtime_options(p)
    add_output_options(p, "hesse-track")
    p.set_defaults(func=_run)


def _optimizer_args(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("expected K=V pairs")
        for kw in call.keywords:
            out[kw.arg] = ast.literal_eval(kw.value)
    except (SyntaxError, ValueError) as e:
        raise UsageError(
            f"--optimizer-args {text!r}: expected K=V pairs of Python literals "
            f"(e.g. 'momentum=0.9'): {e}"
        ) from e
    return out


def _optimizer_class(name: str) -> Any:
    import torch

    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = sorted(
            k
            for k, v in vars(torch.optim).items()
            if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and k != "Optimizer"
        )
        raise UsageError(f"--optimizer {name!r}: not a torch.optim optimizer; one of {names}.")
    return cls


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.tracker import EdgeOfStabilityWarning, SharpnessTracker

    device = setup_runtime(args)
    check_model_args(args)
    cls = _optimizer_class(args.optimizer)
    opt_kwargs = _optimizer_args(args.optimizer_args)
    for opt, v, lo in (("steps", args.steps, 1), ("every", args.every, 1)):
        if v < lo:
            raise UsageError(f"--{opt} {v}: must be >= {lo}.")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be > 0.")
    out = OutputDir(args.out, FILES, overwrite=args.overwrite)
    extra = {"steps": 0} if args.model is None and (args.workload or "digits") == "digits" else {}
    loaded = load_model_and_data(args, device, **extra)
    model, loss_fn, data = loaded.model, loaded.loss_fn, loaded.train
    batches = [data] if isinstance(data, tuple) else data
    first = next(iter(batches), None)
    if first is None:
        raise UsageError("--data gave no batches.")
    model.train(args.train_mode)
    with library_errors():
        optimizer = cls(model.parameters(), lr=args.lr, **opt_kwargs)
        tracker = SharpnessTracker(
            model,
            loss_fn,
            first,
            every=args.every,
            optimizer=optimizer,
            curvature=args.curvature,
            tol=args.tol,
            per_layer=args.per_layer,
            track_lambda_min=args.lambda_min,
            train_mode=args.train_mode,
            generator=torch.Generator().manual_seed(args.seed),
        )

    def save(folder: Any) -> list[Any]:
        files = [tracker.to_csv(folder / FILES[0]), tracker.to_json(folder / FILES[1])]
        if not args.no_plots and tracker.history:
            files.append(folder / FILES[2])
            tracker.plot(files[-1])
        return files

    def inputs(b: Any) -> tuple[Any, Any]:
        return b[0], b[1]

    stream = itertools.cycle(batches) if isinstance(batches, list) else _repeat(batches)
    show = not args.no_progress
    try:
        with warnings.catch_warnings(), library_errors():
            warnings.simplefilter("ignore", EdgeOfStabilityWarning)
            for step in range(1, args.steps + 1):
                X, y = inputs(next(stream))
                optimizer.zero_grad()
                loss = loss_fn(model(X), y)
                if not torch.isfinite(loss):
                    raise UsageError(
                        f"the loss became {float(loss)} at step {step}: training diverged "
                        f"(lr {args.lr:g} is too large for this model?). The checks so far "
                        f"are in {args.out}/."
                    )
                loss.backward()
                optimizer.step()
                rec = tracker.step()
                if rec is not None and show:
                    ratio = "n/a" if rec.ratio is None else f"{rec.ratio:.3f}"
                    print(
                        f"step {step:>6}  loss {float(loss):.4g}  lambda_max "
                        f"{rec.lambda_max:.4g}  lr*lambda_max/2 {ratio}",
                        file=sys.stderr,
                    )
    except BaseException:
        if tracker.history:
            files = out.write(save)
            print(
                f"hesse track: saved {len(tracker.history)} checks to {args.out}/ "
                f"({', '.join(f.name for f in files)})",
                file=sys.stderr,
            )
        raise
    files = out.write(save)
    h = tracker.history
    lams = [r.lambda_max for r in h]
    print(
        f"hesse track: {args.steps} {args.optimizer} steps (lr {args.lr:g}), {len(h)} checks; "
        f"lambda_max {lams[0]:.4g} -> {lams[-1]:.4g} (max {max(lams):.4g}); "
        f"stability limit 2/lr = {2 / args.lr:.4g}"
        if h
        else f"hesse track: {args.steps} steps, no checks (every {args.every})."
    )
    print(f"wrote {len(files)} files to {args.out}/: " + ", ".join(f.name for f in files))
    return 0


def _repeat(batches: Any):
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            return
