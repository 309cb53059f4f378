"""``hesse analyze``: the curvature report of a model (:func:`hesse.report.analyze`)."""

from __future__ import annotations

import argparse
import shutil
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

from ..report._analyze import CURVATURES, STAGES

FILES = (
    "report.json",
    "report.md",
    "spectral_density.png",
    "spectral_density_log.png",
    "top_eigenvalues.png",
    "per_layer.png",
    "loss_slice.png",
)


def add_parser(subparsers: Any, name: str = "analyze") -> None:
    p = new_parser(
        subparsers,
        name,
        help="curvature report of a model (default: the embedded digits MLP)",
        description=(
            "Analyse the curvature of a model: top eigenvalues and lambda_min (Lanczos), "
            "spectral density (SLQ), trace, critical-point class, condition number, effective "
            "rank, the learning-rate speed limit 2/lambda_max globally and per layer, and a loss "
            "slice along the top eigenvector, each number explained. With no model it analyses "
            "the embedded digits MLP (trained weights ship with hesse). Writes report.json, "
            "report.md and PNG plots to --out. Interrupted runs keep a report of the finished "
            "stages; the same command again continues where it stopped."
        ),
    )
    add_model_options(p)
    g = p.add_argument_group("analysis")
    g.add_argument(
        "--curvature",
        choices=CURVATURES,
        default="hessian",
        help="matrix to analyse: the Hessian, the Gauss-Newton (GGN) or a Fisher "
        "(exact, Monte Carlo, empirical); GGN/Fisher are PSD approximations",
    )
    g.add_argument(
        "--params",
        metavar="NAMES",
        help="comma-separated parameter names or module prefixes to analyse (default: all)",
    )
    g.add_argument("--top-k", type=int, default=10, help="number of top eigenvalues")
    g.add_argument("--num-probes", type=int, default=8, help="random probes of the density (SLQ)")
    g.add_argument("--num-steps", type=int, default=64, help="Lanczos steps per SLQ probe")
    g.add_argument("--trace-matvecs", type=int, default=100, help="products for the trace")
    g.add_argument(
        "--grad-tol", type=float, default=1e-3, help="a gradient norm below this is 'small'"
    )
    g.add_argument(
        "--eig-tol",
        type=float,
        default=1e-3,
        help="eigenvalues within eig-tol * max|lambda| of 0 count as zero",
    )
    g.add_argument("--no-per-layer", action="store_true", help="skip the per-layer blocks")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (the same command without it also "
        "continues; with it, a missing partial run is an error)",
    )
    add_runtime_options(p)
    add_output_options(p, "hesse-report")
    p.set_defaults(func=_run)


def _check(args: argparse.Namespace) -> None:
    for opt, lo in (("top_k", 1), ("num_probes", 1), ("num_steps", 2), ("trace_matvecs", 1)):
        v = getattr(args, opt)
        if v < lo:
            raise UsageError(f"--{opt.replace('_', '-')} {v}: must be >= {lo}.")
    for opt in ("grad_tol", "eig_tol"):
        if not getattr(args, opt) > 0:
            raise UsageError(f"--{opt.replace('_', '-')} {getattr(args, opt)}: must be > 0.")


def _run(args: argparse.Namespace) -> int:
    from ..report import AnalysisReport, analyze

    device = setup_runtime(args)
    check_model_args(args)
    _check(args)
    out = OutputDir(args.out, FILES, overwrite=args.overwrite)
    resumable = (out.work / "meta.json").is_file()
    if args.resume and not resumable:
        raise UsageError(f"--resume: no interrupted run in {args.out!r} to continue.")
    if resumable:
        done = sorted(p.stem for p in out.work.glob("*.json") if p.stem in STAGES)
        print(
            f"hesse analyze: continuing the run saved in {out.work} ({', '.join(done)})",
            file=sys.stderr,
        )
    # The LM workload's curvature sample: 16 sequences (1024 tokens) keep every stage,
    # per-layer included (35 blocks), to a few minutes on one CPU thread.
    sample = {"num_train": 16} if args.model is None and args.workload == "lm" else {}
    loaded = load_model_and_data(args, device, **sample)
    params = [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None
    try:
        with library_errors():
            report = analyze(
                loaded.model,
                loaded.loss_fn,
                loaded.train,
                curvature=args.curvature,
                params=params,
                top_k=args.top_k,
                num_probes=args.num_probes,
                num_steps=args.num_steps,
                trace_matvecs=args.trace_matvecs,
                per_layer=not args.no_per_layer,
                grad_tol=args.grad_tol,
                eig_tol=args.eig_tol,
                seed=args.seed,
                train_mode=args.train_mode,
                progress=not args.no_progress,
                meta=loaded.meta,
                checkpoint_dir=out.work,
            )
    except BaseException as e:
        partial = AnalysisReport.from_checkpoint(out.work) if out.work.is_dir() else None
        if partial is not None and partial.data["stages"]:
            files = out.write(lambda d: partial.save(d, plots=not args.no_plots))
            print(partial.summary())
            print(
                f"hesse analyze: saved the finished stages ({', '.join(partial.data['stages'])})"
                f" to {args.out}/ ({', '.join(f.name for f in files)}), marked incomplete; "
                "run the same command again to continue.",
                file=sys.stderr,
            )
        if isinstance(e, KeyboardInterrupt) and out.work.is_dir():
            # the solvers' hint names their checkpoint= argument: say it in CLI terms
            raise KeyboardInterrupt(
                f"The work done so far is saved in {out.work}; run the same command again "
                "(or add --resume) to continue."
            ) from None
        raise
    files = out.write(lambda d: report.save(d, plots=not args.no_plots))
    shutil.rmtree(out.work, ignore_errors=True)
    print(report.summary())
    print(f"wrote {len(files)} files to {args.out}/: " + ", ".join(f.name for f in files))
    return 0
