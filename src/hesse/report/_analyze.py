"""The curvature report of a model: :func:`analyze` returns an :class:`AnalysisReport`.

It composes the public pieces and re-implements none: a curvature operator,
:func:`hesse.top_eigenpairs`, :func:`hesse.spectral_density`, :func:`hesse.trace`,
:func:`hesse.classify_critical_point` / :func:`hesse.stopping_rule`,
:func:`hesse.analysis.critical.spectrum_summary`, :func:`hesse.layer_max_stable_lr`,
:func:`hesse.analysis.loss_slice` and :func:`hesse.analysis.critical.taylor_check`.

Long runs lose nothing: with ``checkpoint_dir`` every finished stage is saved there (tensors
and plain types, read back with ``torch.load(weights_only=True)``) and the eigen-solvers
checkpoint inside a stage, so the same call again continues where it stopped, and
:meth:`AnalysisReport.from_checkpoint` builds the report of the finished stages (marked
incomplete) after a Ctrl-C or a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .._checks import check_int, check_positive
from .._serialize import from_jsonable, load_json, register, save_json, to_jsonable
from ..analysis.critical import (
    LRBound,
    classify_critical_point,
    layer_max_stable_lr,
    spectrum_summary,
    stopping_rule,
    taylor_check,
)
from ..analysis.landscape import LossSlice, loss_slice
from ..linalg import spectral_density, top_eigenpairs, trace
from ..operators.factory import CURVATURES, curvature_operator

__all__ = [
    "CURVATURES",
    "SCHEMA_VERSION",
    "STAGES",
    "AnalysisReport",
    "TrackerHistory",
    "analyze",
    "load_report",
]

SCHEMA_VERSION = "hesse.analyze/1"
register(LossSlice)  # saved with the report (hesse._serialize builds registered classes only)
STAGES = ("top_eigenpairs", "lambda_min", "spectral_density", "trace", "per_layer", "loss_slice")
# statements only the Hessian supports (the GGN and Fisher are PSD by construction)
HESSIAN_ONLY = ("critical_point", "negative_fraction", "stopping_rule")


def _f(x: Any) -> float | None:
    """JSON-safe float (NaN/inf become None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _curvature_operator(curvature: str, model: nn.Module, loss_fn: Callable, data: Any, **kw):
    return curvature_operator(curvature, model, loss_fn, data, **kw)


@dataclass
class AnalysisReport:
    """What :func:`analyze` found: JSON-ready numbers plus the result objects.

    Attributes:
        data: the report as plain data (what ``report.json`` holds, see
            ``analyze.schema.json``); sections of stages that did not finish are absent.
        results: the result objects by stage (``EigenResult``, ``SpectralDensity``,
            ``TraceResult``, ``LossSlice``, ...); after :meth:`load` eigenvectors and
            directions are ``None`` (they are not written to JSON).
        complete: every stage finished.
    """

    data: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete", True))

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def to_dict(self) -> dict[str, Any]:
        """The report with its results as JSON-safe data (eigenvectors and slice directions
        left out to keep the file small)."""
        return {**self.data, "results": to_jsonable(_light(self.results))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalysisReport:
        if d.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"Not a hesse analyze report: schema {d.get('schema')!r}, "
                f"expected {SCHEMA_VERSION!r}."
            )
        data = {k: v for k, v in d.items() if k != "results"}
        return cls(data, from_jsonable(d.get("results", {})))

    def save(self, out: str | Path, *, plots: bool = True) -> list[Path]:
        """Write ``report.json``, ``report.md`` and (``plots``) the PNGs into folder ``out``."""
        from ._text import markdown

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "report.json", out / "report.md"]
        files[0].write_text(json.dumps(self.to_dict(), indent=1))
        files[1].write_text(markdown(self.data, plots=plots and bool(self.results)))
        if plots:
            files += self.plot(out)
        return files

    def plot(self, out: str | Path) -> list[Path]:
        """Draw the report's figures into folder ``out`` (from the stored results)."""
        from ..plot.report import plot_report

        return plot_report(self, out)

    @classmethod
    def load(cls, path: str | Path) -> AnalysisReport:
        """Read a ``report.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text()))

    def summary(self) -> str:
        """The printed table: every number with its meaning, then the verdicts."""
        from ._text import summary

        return summary(self.data)

    def to_markdown(self) -> str:
        from ._text import markdown

        return markdown(self.data, plots=bool(self.results))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> AnalysisReport | None:
        """The report of the stages saved in ``checkpoint_dir`` (``None`` if none started)."""
        d = Path(checkpoint_dir)
        meta = _load(d / "meta.json")
        if meta is None:
            return None
        done = {s: r for s in STAGES if (r := _load(d / f"{s}.json")) is not None}
        return _assemble(meta["info"], {s: r["result"] for s, r in done.items()})


def load_report(path: str | Path) -> Any:
    """Read a saved report: analysis (``report.json``), compression (``compress.json``) or a
    sharpness-tracker history (JSON of :meth:`hesse.SharpnessTracker.to_json`).

    Returns an :class:`AnalysisReport`, a :class:`hesse.compress.CompressionReport`, or a
    :class:`TrackerHistory`.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("report.json", "compress.json", "sharpness.json")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds no report.json, compress.json or sharpness.json."
            )
        path = found[0]
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON report: {e}") from e
    schema = d.get("schema") if isinstance(d, dict) else None
    if schema == SCHEMA_VERSION:
        return AnalysisReport.from_dict(d)
    if schema == "hesse.compress/1":
        import dataclasses

        from ..compress import CompressionReport

        names = {f.name for f in dataclasses.fields(CompressionReport)}
        return CompressionReport(**{k: v for k, v in d.items() if k in names})
    if isinstance(d, dict) and "history" in d and "every" in d:
        return TrackerHistory.from_dict(d)
    raise ValueError(
        f"{path} is not a hesse report (schema {schema!r}); expected {SCHEMA_VERSION!r}, "
        "'hesse.compress/1' or a SharpnessTracker JSON."
    )


@dataclass
class TrackerHistory:
    """A saved :class:`hesse.SharpnessTracker` history (what :func:`hesse.plot.plot_sharpness`
    draws): ``history`` is the list of :class:`hesse.analysis.tracker.SharpnessRecord`."""

    history: list[Any]
    every: int
    curvature: str
    tol: float
    per_layer: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrackerHistory:
        import dataclasses

        from ..analysis.tracker import SharpnessRecord

        names = {f.name for f in dataclasses.fields(SharpnessRecord)}
        recs = [SharpnessRecord(**{k: v for k, v in r.items() if k in names}) for r in d["history"]]
        return cls(
            recs,
            d["every"],
            d.get("curvature", "hessian"),
            d.get("tol", 0.0),
            bool(d.get("per_layer", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        hist = [
            {k: _f(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}
            for r in self.history
        ]
        return {
            "every": self.every,
            "curvature": self.curvature,
            "tol": self.tol,
            "per_layer": self.per_layer,
            "history": hist,
        }


# -- checkpointed stages ----------------------------------------------------------------------


def _light(results: dict[str, Any]) -> dict[str, Any]:
    """The results without their (n,)-sized vectors."""
    out = dict(results)
    for k in ("top_eigenpairs", "lambda_min"):
        if out.get(k) is not None:
            out[k] = dataclasses.replace(out[k], eigenvectors=None)
    if out.get("loss_slice") is not None:
        out["loss_slice"] = {
            **out["loss_slice"],
            "slice": dataclasses.replace(out["loss_slice"]["slice"], direction=None),
        }
    return out


def _load(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return load_json(path)
    except ValueError as e:
        raise ValueError(f"{e} Delete {path.parent} to start the analysis over.") from e


def _save(path: Path, obj: Any) -> None:
    save_json(path, obj)


def _fingerprint(op: Any, loss: float, settings: dict) -> str:
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in op.objective.params.values()])
    key = json.dumps(
        {
            "settings": settings,
            "n": op.shape[0],
            "loss": float(loss),
            "params": [float(flat.sum()), float(flat.norm()), float(flat[::7].sum())],
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
    train_mode: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    checkpoint_dir: str | Path | None = None,
) -> AnalysisReport:
    """Analyse the curvature of ``model`` on ``data``.

    Computes, with product counts and error bars: the top-``top_k`` eigenvalues and
    ``lambda_min`` (Lanczos), the spectral density (SLQ with the top pairs deflated), the
    trace (XTrace, and the density's implied trace), the critical-point class and the
    second-order stopping rule (Hessian only: the GGN and Fisher are PSD by construction and
    cannot show negative curvature), condition number, effective rank and near-null fraction,
    the speed limit ``2 / lambda_max`` globally and per layer, and a 1-D loss slice along the
    top eigenvector with a Taylor check of the quadratic model.

    Args:
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher_exact"``, ``"fisher_mc"``,
            ``"fisher_empirical"`` (see :func:`hesse.operators.curvature_operator`).
        checkpoint_dir: folder where each finished stage (and the solver state inside a
            stage) is saved; a later call with the same folder, model and settings continues
            where the earlier one stopped. Left in place; delete it when done.

    Cost: about ``2 * top_k`` to ``5 * top_k`` products for the eigenvalues,
    ``num_probes * num_steps`` for the density, ``trace_matvecs`` for the trace and a
    Lanczos run plus 40 products per layer.
    """
    top_k = check_int(top_k, "top_k")
    num_probes = check_int(num_probes, "num_probes")
    num_steps = check_int(num_steps, "num_steps")
    trace_matvecs = check_int(trace_matvecs, "trace_matvecs")
    check_positive(grad_tol, "grad_tol")
    check_positive(eig_tol, "eig_tol")
    gen = torch.Generator().manual_seed(seed)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    op = _curvature_operator(curvature, model, loss_fn, data, params=params, train_mode=train_mode)
    loss, grad = op.objective.value_and_grad()
    timings["operator"] = time.perf_counter() - t0
    n = op.shape[0]
    k = min(top_k, max(1, n - 1))
    settings = dict(
        curvature=curvature,
        top_k=k,
        num_probes=num_probes,
        num_steps=num_steps,
        trace_matvecs=trace_matvecs,
        per_layer=per_layer,
        grad_tol=grad_tol,
        eig_tol=eig_tol,
        seed=seed,
        train_mode=train_mode,
    )
    info = {
        "num_params": n,
        "curvature": curvature,
        "dtype": str(op.dtype).replace("torch.", ""),
        "device": str(op.device),
        "num_samples": op.objective.N,
        "num_batches": op.objective.num_batches,
        "reduction": op.objective.reduction,
        "train_mode": train_mode,
        "psd": bool(op.psd),
        **(meta or {}),
        "settings": settings,
        "loss": float(loss),
        "gradient_norm": float(torch.linalg.vector_norm(grad)),
    }
    ck = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ck is not None:
        ck.mkdir(parents=True, exist_ok=True)
        key = _fingerprint(op, float(loss), settings)
        old = _load(ck / "meta.json")
        if old is not None and old.get("key") != key:  # another model or other settings
            for f in ck.iterdir():
                f.unlink()
        _save(ck / "meta.json", {"key": key, "info": info})

    results: dict[str, Any] = {}

    def run(name: str, fn: Callable[[str | None], Any]) -> Any:
        """Run stage ``name`` (or load it); the generator state is saved with each result."""
        if ck is not None and (saved := _load(ck / f"{name}.json")) is not None:
            gen.set_state(saved["generator"])
            results[name] = saved["result"]
            timings[name] = 0.0
            return results[name]
        if ck is not None:
            start = _load(ck / f"{name}.start.json")
            if start is not None:  # the stage was interrupted: replay its random start
                gen.set_state(start)
            else:
                _save(ck / f"{name}.start.json", gen.get_state())
        t = time.perf_counter()
        res = fn(None if ck is None else str(ck / f"{name}.solver.pt"))
        timings[name] = time.perf_counter() - t
        results[name] = res
        if ck is not None:
            _save(ck / f"{name}.json", {"generator": gen.get_state(), "result": res})
        return res

    top = run(
        "top_eigenpairs",
        lambda c: top_eigenpairs(
            op, k=k, which="largest", generator=gen, checkpoint=c, progress=progress
        ),
    )
    low = run(
        "lambda_min",
        lambda c: top_eigenpairs(
            op, k=1, which="smallest", generator=gen, checkpoint=c, progress=progress
        ),
    )
    density = run(
        "spectral_density",
        lambda c: spectral_density(
            op,
            num_probes=num_probes,
            num_steps=min(num_steps, n),
            generator=gen,
            deflate=top,
            checkpoint=c,
            progress=progress,
        ),
    )
    run(
        "trace",
        lambda c: trace(op, method="xtrace", num_matvecs=min(trace_matvecs, n), generator=gen),
    )
    if per_layer:
        run("per_layer", lambda c: _per_layer(op, gen))
    run("loss_slice", lambda c: _slice(model, loss_fn, data, top, float(loss), params, train_mode))
    if not op.psd:  # the critical-point kind and the stopping rule need the Hessian
        # cheap: composes the results above, no new eigen-solves
        kw = dict(gradient=grad, grad_tol=grad_tol, eig_tol=eig_tol, extremes=(top, low))
        results["critical"] = classify_critical_point(op, density=density, generator=gen, **kw)
        results["stopping_rule"] = stopping_rule(op, density=density, generator=gen, **kw)
    results["summary"] = spectrum_summary(density, None, null_tol=eig_tol)
    timings["total"] = time.perf_counter() - t_all
    return _assemble(info, results, timings=timings)


def _per_layer(op: Any, gen: torch.Generator) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    bounds = layer_max_stable_lr(op, generator=gen)
    blocks = op.layer_blocks()
    budget = 40 if len(blocks) <= 10 else 20  # many blocks: half the trace products each
    for name, b in bounds.items():
        block = blocks[name]
        nb = block.shape[0]
        t = trace(block, method="xtrace", num_matvecs=min(budget, nb), generator=gen)
        out[name] = {
            "num_params": nb,
            "lambda_max": b.lambda_max,
            "max_stable_lr": _f(b.value),
            "recommended_lr": _f(b.recommended()),
            "trace": float(t.estimate),
            "trace_stderr": _f(t.stderr),
            "hvps": b.eigen.num_matvecs + t.num_matvecs,
        }
    return out


def _slice(model, loss_fn, data, top, loss, params, train_mode) -> dict[str, Any]:
    lam = float(top.eigenvalues[0])
    radius = math.sqrt(2.0 * max(loss, 0.05) / lam) if lam > 0 else 1.0
    direction = top.eigenvectors[:, 0]
    kw = dict(curvature=lam, params=params, train_mode=train_mode)
    sl = loss_slice(model, loss_fn, data, direction, radius=radius, num_points=41, **kw)
    tc = taylor_check(
        model, loss_fn, data, direction, steps=(0.01 * radius, 0.1 * radius, radius), **kw
    )
    return {"slice": sl, "taylor": tc, "radius": radius}


def _assemble(info: dict, results: dict, *, timings: dict | None = None) -> AnalysisReport:
    """The report's plain data from whatever stages are in ``results``."""
    model = {k: v for k, v in info.items() if k not in ("settings", "loss", "gradient_norm")}
    s = info["settings"]
    hessian = not model.get("psd", model["curvature"] != "hessian")
    d: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "hesse_version": __version__,
        "torch_version": torch.__version__,
        "complete": all(st in results for st in STAGES if st != "per_layer" or s["per_layer"]),
        "stages": [st for st in STAGES if st in results],
        "model": model,
        "settings": s,
        "seed": s["seed"],
        "loss": info["loss"],
        "gradient_norm": info["gradient_norm"],
        "hessian_only_omitted": [] if hessian else list(HESSIAN_ONLY),
    }
    top, low = results.get("top_eigenpairs"), results.get("lambda_min")
    if top is not None:
        e = d["eigenvalues"] = {
            "top": [float(v) for v in top.eigenvalues],
            "top_residual_norms": [float(r) for r in top.residual_norms],
            "top_error_bounds": [float(x) for x in top.error_bounds],
            "top_converged": bool(top.converged),
            "top_hvps": top.num_matvecs,
            "tol": top.tol,
        }
        if low is not None:
            e.update(
                lambda_min=float(low.eigenvalues[0]),
                lambda_min_residual_norm=float(low.residual_norms[0]),
                lambda_min_converged=bool(low.converged),
                lambda_min_hvps=low.num_matvecs,
            )
        bound = LRBound.from_eigen(top)  # 2 / (Ritz value + its error bound): conservative
        d["learning_rate"] = {
            "max_stable_lr": _f(bound.value),
            "recommended_lr": _f(bound.recommended()),
            "lambda_max_upper": bound.lambda_max_upper,
            "per_layer": results.get("per_layer", {}),
        }
    cp, rule = results.get("critical"), results.get("stopping_rule")
    if cp is not None and hessian:
        d["critical_point"] = {
            "kind": cp.kind,
            "grad_tol": cp.grad_tol,
            "eig_tol": cp.eig_tol,
            "threshold": cp.threshold,
            "negative_fraction": cp.negative_fraction,
            "negative_fraction_stderr": _f(cp.negative_stderr),
            "index_estimate": cp.index,
            "stopping_rule_converged": bool(rule.converged),
            "stopping_rule_reason": rule.reason,
        }
    tr, dens = results.get("trace"), results.get("spectral_density")
    if tr is not None:
        d["trace"] = {
            "xtrace": float(tr.estimate),
            "xtrace_stderr": _f(tr.stderr),
            "xtrace_hvps": tr.num_matvecs,
        }
    if dens is not None:
        summ = results.get("summary") or spectrum_summary(dens, None, null_tol=s["eig_tol"])
        if tr is not None:
            d["trace"].update(slq=float(dens.trace), slq_stderr=_f(dens.trace_stderr))
        sp = d["spectrum"] = {
            "condition_number_positive": _f(summ.condition_number),
            "condition_number_is_lower_bound": bool(
                getattr(summ, "condition_number_is_lower_bound", False)
            ),
            "effective_rank": summ.effective_rank,
            "effective_rank_stderr": _f(summ.effective_rank_stderr),
            "near_null_fraction": summ.near_null_fraction,
            "near_null_fraction_stderr": _f(summ.near_null_stderr),
            "null_tol": summ.null_tol,
            "density": {
                "num_probes": dens.num_probes,
                "num_steps": dens.num_steps,
                "hvps": dens.num_matvecs,
                "deflated": len(d.get("eigenvalues", {}).get("top", [])),
            },
        }
        if hessian:
            sp.update(
                negative_fraction=summ.negative_fraction,
                negative_fraction_stderr=_f(summ.negative_stderr),
            )
    sl = results.get("loss_slice")
    if sl is not None:
        slc, tc = sl["slice"], sl["taylor"]
        d["loss_slice"] = {
            "radius": float(sl["radius"]),
            "curvature": float(slc.curvature),
            "slope": float(slc.slope),
            "max_quadratic_error": float(slc.max_quadratic_error),
            "taylor_check": [
                {
                    "step": float(tc.steps[i]),
                    "actual": float(tc.actual[i]),
                    "predicted": float(tc.predicted[i]),
                    "relative_error": _f(tc.relative_error[i]),
                }
                for i in range(tc.steps.numel())
            ],
        }
    d["hvps_total"] = sum(
        getattr(results.get(st), "num_matvecs", 0)
        for st in ("top_eigenpairs", "lambda_min", "spectral_density", "trace")
    ) + sum(L["hvps"] for L in results.get("per_layer", {}).values())
    d["timings_s"] = timings or {}
    keep = {k: v for k, v in results.items() if k in STAGES}
    return AnalysisReport(d, keep)
