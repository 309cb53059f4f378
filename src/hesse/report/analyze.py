"""``hesse analyze``: a curvature report of a model, with plots.

:func:`analyze` is the API; :func:`add_parser` registers the CLI subcommand that calls it.
It composes the public pieces: a curvature operator, :func:`hesse.top_eigenpairs`,
:func:`hesse.spectral_density`, :func:`hesse.trace`, the analyses of
:mod:`hesse.analysis` and the plots of :mod:`hesse.plot`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from .._checks import check_int
from ..analysis.critical import (
    LRBound,
    classify_critical_point,
    spectrum_summary,
)
from ..analysis.landscape import loss_slice
from ..linalg import spectral_density, top_eigenpairs, trace
from ..operators.base import LinearOperator
from ..operators.curvature import FisherOperator, GGNOperator, HessianOperator

__all__ = ["SCHEMA_VERSION", "analyze", "add_parser", "write_report"]

SCHEMA_VERSION = "hesse.analyze/1"
_LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}
_OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}


class _Progress(LinearOperator):
    """Counts products into a progress bar while delegating to ``op``."""

    def __init__(self, op: LinearOperator, bar: Any):
        super().__init__(op.shape, op.dtype, op.device, symmetric=op.symmetric, psd=op.psd)
        self.op, self.bar = op, bar

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op._matmat(V)
        self.op.num_matvecs += V.shape[1]
        self.bar.update(V.shape[1])
        return out


def _bar(desc: str, enabled: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="HVP",
        disable=not enabled,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _f(x: Any) -> float | None:
    """JSON-safe float (NaN/inf become None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def analyze(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "hessian",
    params: Any = None,
    top_k: int = 10,
    num_probes: int = 8,
    num_steps: int = 64,
    trace_matvecs: int = 100,
    per_layer: bool = True,
    grad_tol: float = 1e-3,
    eig_tol: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Analyse the curvature of ``model`` on ``data``; return the report as a dict.

    Computes, with HVP counts and error bars: the top-``top_k`` eigenvalues and
    ``lambda_min`` (Lanczos), the spectral density (SLQ with the top pairs deflated),
    the trace (XTrace, and the density's implied trace), the critical-point class and the
    second-order stopping rule, condition number of the positive part, effective rank and
    near-null fraction, the speed limit ``2 / lambda_max`` globally and per layer (with
    per-layer ``lambda_max`` and trace), a 1-D loss slice along the top eigenvector with
    the quadratic model, and a Taylor check of that model.

    The result objects themselves are under ``report["_results"]`` (not serialised), for
    :func:`write_report`.
    """
    check_int(top_k, "top_k")
    gen = torch.Generator().manual_seed(seed)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name: str):
        class _Stage:
            def __enter__(self):
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                timings[name] = time.perf_counter() - self.t

        return _Stage()

    Op = _OPERATORS[curvature]
    with stage("operator"):
        op = Op(model, loss_fn, data, params=params)
        loss, grad = op.objective.value_and_grad()
    n = op.shape[0]
    k = min(top_k, max(1, n - 1))

    with stage("top_eigenpairs"), _bar(f"top-{k} eigenvalues", progress) as bar:
        top = top_eigenpairs(_Progress(op, bar), k=k, which="largest", generator=gen)
    with stage("lambda_min"), _bar("lambda_min", progress) as bar:
        low = top_eigenpairs(_Progress(op, bar), k=1, which="smallest", generator=gen)
    with (
        stage("spectral_density"),
        _bar("spectral density", progress, num_probes * num_steps) as bar,
    ):
        density = spectral_density(
            _Progress(op, bar),
            num_probes=num_probes,
            num_steps=min(num_steps, n),
            generator=gen,
            deflate=top,
        )
    with stage("trace"), _bar("trace", progress, trace_matvecs) as bar:
        tr = trace(
            _Progress(op, bar), method="xtrace", num_matvecs=min(trace_matvecs, n), generator=gen
        )

    cp = classify_critical_point(
        op,
        gradient=grad,
        grad_tol=grad_tol,
        eig_tol=eig_tol,
        extremes=(top, low),
        density=density,
        generator=gen,
    )
    summary = spectrum_summary(density, None, null_tol=eig_tol)
    lam_max = float(top.eigenvalues[0])
    bound = LRBound(2.0 / lam_max if lam_max > 0 else math.inf, lam_max, top)

    layers: dict[str, dict] = {}
    if per_layer:
        blocks = op.layer_blocks()
        with stage("per_layer"), _bar("per-layer blocks", progress) as bar:
            for name, block in blocks.items():
                B = _Progress(block, bar)
                nb = block.shape[0]
                if nb <= 2:
                    D = block.to_dense()
                    lam = float(torch.linalg.eigvalsh(0.5 * (D + D.T))[-1])
                    tr_l, tr_err, used_eig, used_tr = float(D.trace()), 0.0, nb, 0
                else:
                    r = top_eigenpairs(B, k=1, which="largest", generator=gen)
                    lam, used_eig = float(r.eigenvalues[0]), r.num_matvecs
                    t = trace(B, method="xtrace", num_matvecs=min(40, nb), generator=gen)
                    tr_l, tr_err, used_tr = float(t.estimate), float(t.stderr), t.num_matvecs
                layers[name] = {
                    "num_params": nb,
                    "lambda_max": lam,
                    "max_stable_lr": 2 / lam if lam > 0 else None,
                    "recommended_lr": 1 / lam if lam > 0 else None,
                    "trace": tr_l,
                    "trace_stderr": _f(tr_err),
                    "hvps": used_eig + used_tr,
                }

    radius = math.sqrt(2.0 * max(float(loss), 0.05) / lam_max) if lam_max > 0 else 1.0
    with stage("loss_slice"):
        direction = top.eigenvectors[:, 0]
        sl = loss_slice(
            model,
            loss_fn,
            data,
            direction,
            radius=radius,
            num_points=41,
            curvature=float(top.eigenvalues[0]),
            params=params,
        )
        taylor = []
        for frac in (0.01, 0.1, 1.0):
            s = loss_slice(
                model,
                loss_fn,
                data,
                direction,
                radius=frac * radius,
                num_points=3,
                curvature=float(top.eigenvalues[0]),
                params=params,
            )
            actual, pred = float(s.losses[-1] - s.loss0), float(s.quadratic[-1] - s.loss0)
            taylor.append(
                {
                    "step": frac * radius,
                    "actual": actual,
                    "predicted": pred,
                    "relative_error": abs(actual - pred) / max(abs(actual), 1e-30),
                }
            )
    timings["total"] = time.perf_counter() - t_all

    report = {
        "schema": SCHEMA_VERSION,
        "hesse_version": __version__,
        "torch_version": torch.__version__,
        "model": {
            "num_params": n,
            "curvature": curvature,
            "dtype": str(op.dtype).replace("torch.", ""),
            "num_samples": op.objective.N,
            "num_batches": op.objective.num_batches,
            "reduction": op.objective.reduction,
            **(meta or {}),
        },
        "seed": seed,
        "loss": float(loss),
        "gradient_norm": cp.gradient_norm,
        "critical_point": {
            "kind": cp.kind,
            "grad_tol": grad_tol,
            "eig_tol": eig_tol,
            "threshold": cp.threshold,
            "negative_fraction": cp.negative_fraction,
            "negative_fraction_stderr": _f(cp.negative_stderr),
            "index_estimate": cp.index,
            "stopping_rule_converged": cp.gradient_norm <= grad_tol
            and cp.lambda_min >= -cp.threshold,
        },
        "eigenvalues": {
            "top": [float(v) for v in top.eigenvalues],
            "top_residual_norms": [float(r) for r in top.residual_norms],
            "top_error_bounds": [float(e) for e in top.error_bounds],
            "top_converged": bool(top.converged),
            "top_hvps": top.num_matvecs,
            "lambda_min": float(low.eigenvalues[0]),
            "lambda_min_residual_norm": float(low.residual_norms[0]),
            "lambda_min_converged": bool(low.converged),
            "lambda_min_hvps": low.num_matvecs,
            "tol": top.tol,
        },
        "trace": {
            "xtrace": float(tr.estimate),
            "xtrace_stderr": _f(tr.stderr),
            "xtrace_hvps": tr.num_matvecs,
            "slq": float(density.trace),
            "slq_stderr": _f(density.trace_stderr),
        },
        "spectrum": {
            "condition_number_positive": _f(summary.condition_number),
            "effective_rank": summary.effective_rank,
            "effective_rank_stderr": _f(summary.effective_rank_stderr),
            "near_null_fraction": summary.near_null_fraction,
            "near_null_fraction_stderr": _f(summary.near_null_stderr),
            "negative_fraction": summary.negative_fraction,
            "negative_fraction_stderr": _f(summary.negative_stderr),
            "null_tol": summary.null_tol,
            "density": {
                "num_probes": density.num_probes,
                "num_steps": density.num_steps,
                "hvps": density.num_matvecs,
                "deflated": k,
            },
        },
        "learning_rate": {
            "max_stable_lr": _f(bound.value),
            "recommended_lr": _f(bound.recommended()),
            "per_layer": layers,
        },
        "loss_slice": {
            "radius": radius,
            "curvature": sl.curvature,
            "slope": sl.slope,
            "max_quadratic_error": sl.max_quadratic_error,
            "taylor_check": taylor,
        },
        "hvps_total": op.num_matvecs,
        "timings_s": timings,
    }
    report["_results"] = {
        "top": top,
        "low": low,
        "density": density,
        "slice": sl,
        "layers": layers,
        "critical": cp,
    }
    return report


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the PNG plots into ``out``.

    Files are written into a temporary folder next to ``out`` and moved in only when all
    succeeded, so an error leaves nothing half-written.
    """
    from ..plot import plot_loss_slice
    from ..plot.spectrum import plot_eigenvalues, plot_layer_curvature, plot_spectral_density

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hesse-report-", dir=out.parent))
    try:
        res = report["_results"]
        data = {k: v for k, v in report.items() if k != "_results"}
        (tmp / "report.json").write_text(json.dumps(data, indent=2))
        plot_spectral_density(res["density"], tmp / "spectral_density.png", outliers=res["top"])
        plot_spectral_density(
            res["density"], tmp / "spectral_density_log.png", log_scale=True, outliers=res["top"]
        )
        plot_eigenvalues(res["top"], tmp / "top_eigenvalues.png")
        if res["layers"]:
            L = res["layers"]
            plot_layer_curvature(
                {k: v["lambda_max"] for k, v in L.items()},
                {k: v["trace"] for k, v in L.items()},
                tmp / "per_layer.png",
                trace_stderr={k: v["trace_stderr"] or 0.0 for k, v in L.items()},
            )
        plot_loss_slice(
            res["slice"],
            tmp / "loss_slice.png",
            title="Loss along the top eigenvector vs the quadratic model",
        )
        (tmp / "report.md").write_text(_markdown(data))
        import matplotlib.pyplot as plt

        plt.close("all")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(report: dict) -> list[tuple[str, str]]:
    e, t, s, c = (
        report["eigenvalues"],
        report["trace"],
        report["spectrum"],
        report["critical_point"],
    )
    lr = report["learning_rate"]

    def g(x: Any, digits: int = 4) -> str:
        return "n/a" if x is None else f"{x:.{digits}g}"

    rows = [
        ("parameters", f"{report['model']['num_params']}"),
        ("loss", g(report["loss"], 6)),
        ("gradient norm", g(report["gradient_norm"])),
        ("critical point", f"{c['kind']} (grad_tol={c['grad_tol']:g}, eig_tol={c['eig_tol']:g})"),
        (
            "second-order stop rule",
            "converged" if c["stopping_rule_converged"] else "not converged",
        ),
        (
            "lambda_max",
            f"{g(e['top'][0], 6)}  (residual {g(e['top_residual_norms'][0], 2)}, "
            f"{e['top_hvps']} HVPs for top-{len(e['top'])})",
        ),
        ("top eigenvalues", ", ".join(g(v, 4) for v in e["top"])),
        (
            "lambda_min",
            f"{g(e['lambda_min'], 6)}  (residual {g(e['lambda_min_residual_norm'], 2)}, "
            f"{e['lambda_min_hvps']} HVPs)",
        ),
        ("trace (XTrace)", f"{g(t['xtrace'], 6)} +- {g(t['xtrace_stderr'], 2)}"),
        ("trace (SLQ)", f"{g(t['slq'], 6)} +- {g(t['slq_stderr'], 2)}"),
        ("negative eigenvalues", f"{c['negative_fraction']:.2%} (~{c['index_estimate']:.0f})"),
        (
            "near-null fraction",
            f"{s['near_null_fraction']:.2%} +- {g(s['near_null_fraction_stderr'], 2)}",
        ),
        ("effective rank", f"{g(s['effective_rank'], 4)} +- {g(s['effective_rank_stderr'], 2)}"),
        ("condition number (+)", g(s["condition_number_positive"])),
        ("max stable lr 2/lambda_max", g(lr["max_stable_lr"])),
    ]
    for name, L in lr["per_layer"].items():
        rows.append(
            (
                f"  layer {name}",
                f"lambda_max {g(L['lambda_max'])}, 2/lambda "
                f"{g(L['max_stable_lr'])}, trace {g(L['trace'])}",
            )
        )
    rows.append(
        ("total HVPs / time", f"{report['hvps_total']} / {report['timings_s']['total']:.1f} s")
    )
    return rows


def _markdown(report: dict) -> str:
    lines = [
        "# hesse analyze report",
        "",
        f"schema `{report['schema']}`, hesse {report['hesse_version']}, torch "
        f"{report['torch_version']}, curvature `{report['model']['curvature']}`, "
        f"dtype {report['model']['dtype']}, seed {report['seed']}",
        "",
        "| quantity | value |",
        "|---|---|",
    ]
    lines += [f"| {k.strip()} | {v} |" for k, v in _rows(report)]
    lines += [
        "",
        "Taylor check along the top eigenvector (actual vs quadratic model):",
        "",
        "| step | actual change | predicted | rel. error |",
        "|---|---|---|---|",
    ]
    for r in report["loss_slice"]["taylor_check"]:
        lines.append(
            f"| {r['step']:.3g} | {r['actual']:.4g} | {r['predicted']:.4g} | "
            f"{r['relative_error']:.2g} |"
        )
    lines += [
        "",
        "![spectral density](spectral_density.png)",
        "![spectral density, log scale](spectral_density_log.png)",
        "![top eigenvalues](top_eigenvalues.png)",
        "![per layer](per_layer.png)",
        "![loss slice](loss_slice.png)",
        "",
    ]
    return "\n".join(lines)


def print_summary(report: dict, file: Any = None) -> None:
    rows = _rows(report)
    w = max(len(k) for k, _ in rows)
    print(f"hesse analyze: {report['model'].get('name', 'model')}", file=file)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}", file=file)


# -- CLI --------------------------------------------------------------------------------------


def _load_factory(spec: str, what: str) -> Any:
    from ..cli import UsageError

    if ":" not in spec:
        raise UsageError(
            f"--{what} expects MODULE:FACTORY or path/to/file.py:FACTORY, got {spec!r}."
        )
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UsageError(f"--{what}: no file {mod_name!r}.")
            sp = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(mod_name)
    except UsageError:
        raise
    except Exception as e:  # an import error of the user's module
        raise UsageError(f"--{what}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise UsageError(f"--{what}: module {mod_name!r} has no attribute {attr!r}.")
    try:
        return fn() if callable(fn) else fn
    except Exception as e:
        raise UsageError(f"--{what}: {spec} raised {type(e).__name__}: {e}") from e


def _run(args: argparse.Namespace) -> int:
    from ..cli import UsageError

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0.")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:  # fail early, before any computation, if the output folder cannot be written
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".hesse-probe-", dir=out.parent)
        os.rmdir(probe)
        if out.exists() and not out.is_dir():
            raise OSError(f"{out} exists and is not a folder")
    except OSError as e:
        raise UsageError(f"cannot write to --out {args.out!r}: {e}") from e

    meta: dict[str, Any] = {}
    loss_fn = _make_loss(args)  # validate before any training
    if args.model is None:
        if args.data is not None or args.checkpoint is not None:
            raise UsageError("--data/--checkpoint need --model as well.")
        from ..data import default_workload

        with _bar("training the default digits MLP", not args.no_progress, 1) as bar:
            w = default_workload(seed=args.seed, dtype=dtype)
            bar.update(1)
        model, data = w.model, w.train
        meta.update(name=w.name, test_accuracy=w.accuracy("test"))
    else:
        if args.data is None:
            raise UsageError(
                "--model needs --data MODULE:FACTORY (returning (X, y) or a list of batches)."
            )
        model = _load_factory(args.model, "model")
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model {args.model} returned {type(model).__name__}, expected a torch.nn.Module."
            )
        if args.checkpoint is not None:
            try:
                state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")
                model.load_state_dict(
                    state.get("state_dict", state) if isinstance(state, dict) else state
                )
            except Exception as e:
                raise UsageError(
                    f"--checkpoint {args.checkpoint!r}: {type(e).__name__}: {e}"
                ) from e
        model = model.to(dtype)
        data = _load_factory(args.data, "data")
        data = _cast_data(data, dtype)
        meta.update(name=args.model)
    params = [p.strip() for p in args.params.split(",")] if args.params else None
    try:
        report = analyze(
            model,
            loss_fn,
            data,
            curvature=args.curvature,
            params=params,
            top_k=args.top_k,
            num_probes=args.num_probes,
            num_steps=args.num_steps,
            seed=args.seed,
            progress=not args.no_progress,
            meta=meta,
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(str(e).splitlines()[0]) from e
    except RuntimeError as e:  # shape mismatches between model and data surface here
        raise UsageError(f"model and data do not fit together: {str(e).splitlines()[0]}") from e
    print_summary(report)
    if args.no_plots:
        out.mkdir(parents=True, exist_ok=True)
        data_only = {k: v for k, v in report.items() if k != "_results"}
        (out / "report.json").write_text(json.dumps(data_only, indent=2))
        print(f"wrote {out / 'report.json'}")
    else:
        files = write_report(report, out)
        print(f"wrote {len(files)} files to {out}/: " + ", ".join(f.name for f in files))
    return 0


def _make_loss(args: argparse.Namespace) -> Any:
    from ..cli import UsageError

    if ":" in args.loss:
        return _load_factory(args.loss, "loss")
    if args.loss not in _LOSSES:
        raise UsageError(
            f"--loss {args.loss!r}: expected one of {sorted(_LOSSES)} or MODULE:FACTORY."
        )
    return _LOSSES[args.loss](reduction=args.reduction)


def _cast_data(data: Any, dtype: torch.dtype) -> Any:
    def cast(t: Any) -> Any:
        if isinstance(t, Tensor) and t.dtype.is_floating_point:
            return t.to(dtype)
        if isinstance(t, (tuple, list)):
            return type(t)(cast(x) for x in t)
        return t

    if isinstance(data, (tuple, list)):
        return cast(data)
    return data


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="curvature report of a model (default: the embedded digits MLP)",
        description=(
            "Analyse the curvature of a model: top eigenvalues and lambda_min (Lanczos), "
            "spectral density (SLQ), trace, critical-point class, condition number, effective "
            "rank, the learning-rate speed limit 2/lambda_max globally and per layer, and a loss "
            "slice along the top eigenvector. With no arguments it trains the embedded digits MLP "
            "(a few seconds) and analyses it. Writes report.json, report.md and PNG plots to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="callable returning an nn.Module (module path or file.py:name)",
    )
    p.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="callable returning (X, y) or a list/DataLoader of (X, y) batches",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="state_dict to load into --model (torch.load with weights_only=True)",
    )
    p.add_argument(
        "--loss",
        default="ce",
        metavar="{ce,mse,bce} or MODULE:FACTORY",
        help="ce = cross-entropy, mse, bce (with logits), or a callable returning a loss module",
    )
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    p.add_argument(
        "--params",
        metavar="NAMES",
        help="comma-separated parameter names or module prefixes (default: all)",
    )
    p.add_argument("--curvature", choices=sorted(_OPERATORS), default="hessian")
    p.add_argument("--top-k", type=int, default=10, help="number of top eigenvalues")
    p.add_argument("--num-probes", type=int, default=8, help="SLQ probes")
    p.add_argument("--num-steps", type=int, default=64, help="Lanczos steps per SLQ probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--out", default="hesse-report", help="output folder")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0 = torch's default). Products on small models "
        "are latency-bound: a second thread gains little and stalls badly when "
        "another process holds a core",
    )
    p.add_argument("--no-plots", action="store_true", help="write report.json only")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run)
