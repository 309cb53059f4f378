"""The analysis report in words: the printed table, ``report.md`` and its glossary.

Every number comes with one line saying what it means; the glossary gives its formula.
Verdicts are plain sentences. Statements only the Hessian supports (critical-point kind,
negative eigenvalues, the second-order stopping rule) are left out for the GGN and Fisher,
which are positive semi-definite by construction and cannot show negative curvature.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GLOSSARY", "markdown", "rows", "summary", "verdicts"]

# term -> (meaning, formula)
GLOSSARY: dict[str, tuple[str, str]] = {
    "curvature": (
        "the matrix analysed: Hessian, or the GGN/Fisher approximation (PSD)",
        "H = d^2 L / d theta^2;  GGN = J^T H_out J (J: Jacobian of the outputs)",
    ),
    "loss": ("the training objective at these parameters", "L = (1/N) sum_i loss(f(x_i), y_i)"),
    "gradient norm": ("steepness of the loss; near 0 at a critical point", "||g||, g = dL/dtheta"),
    "lambda_max": (
        "largest eigenvalue: curvature along the sharpest direction",
        "max_v v^T H v / v^T v (Lanczos; residual ||H y - theta y||)",
    ),
    "top eigenvalues": ("the k largest eigenvalues", "Lanczos with thick restarts"),
    "lambda_min": (
        "smallest eigenvalue: < 0 means some direction curves downward",
        "min_v v^T H v / v^T v",
    ),
    "trace (XTrace)": (
        "sum of all eigenvalues (total curvature), from random probes",
        "tr(H) = sum_i lambda_i (XTrace, Epperly-Tropp-Webber 2024) +- standard error",
    ),
    "trace (SLQ)": (
        "the same sum from the spectral density (a cross-check)",
        "n * mean_p sum_j w_pj theta_pj",
    ),
    "negative eigenvalues": (
        "share of eigenvalues below zero (beyond the tolerance)",
        "fraction of lambda_i < -eig_tol * max|lambda| (from the spectral density)",
    ),
    "near-null fraction": (
        "share of eigenvalues that are practically zero (flat directions)",
        "fraction of |lambda_i| <= null_tol * lambda_max",
    ),
    "effective rank": (
        "how many directions carry the curvature",
        "exp(entropy of p), p_i = |lambda_i| / sum_j |lambda_j| (Roy & Vetterli 2007)",
    ),
    "condition number": (
        "largest / smallest positive curvature ('> X': only a lower bound)",
        "lambda_max / lambda_+, lambda_+ the smallest eigenvalue above null_tol * lambda_max",
    ),
    "max stable lr": (
        "largest learning rate at which gradient descent does not diverge",
        "eta < 2 / lambda_max (GD scales the error along eigenvector i by 1 - eta lambda_i); "
        "computed with the upper bound Ritz value + residual norm, so never too large",
    ),
    "recommended lr": (
        "a learning rate with a safety margin below that limit",
        "0.5 * max stable lr",
    ),
    "layer": (
        "the same for a step that moves only this layer (sharpest first)",
        "2 / lambda_max(H_ll) of the diagonal block; lambda_max(H) >= max_l lambda_max(H_ll)",
    ),
    "critical point": (
        "kind of point: not_critical, minimum, saddle, maximum, degenerate",
        "not_critical if ||g|| > grad_tol, else the signs of lambda_min, lambda_max beyond "
        "+-eig_tol * max|lambda|",
    ),
    "second-order stop rule": (
        "may training stop? (small gradient AND no negative curvature)",
        "||g|| <= grad_tol and lambda_min >= -eig_tol * max|lambda| (Nocedal-Wright Thm 2.3)",
    ),
    "Taylor check": (
        "how well the quadratic model predicts the loss along the top eigenvector",
        "|dL(a) - (a g^T v + a^2 lambda_max / 2)| / |dL(a)|, dL(a) = L(theta + a v) - L(theta)",
    ),
    "HVPs": (
        "curvature-vector products used (each costs about 2 gradients)",
        "H v without forming H",
    ),
}


def _g(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _cond(sp: dict) -> str:
    c = sp["condition_number_positive"]
    if c is None:
        return "n/a (no positive eigenvalue resolved)"
    return f"> {c:.4g}" if sp.get("condition_number_is_lower_bound") else f"{c:.4g}"


def rows(report: dict) -> list[tuple[str, str, str]]:
    """``(quantity, value, meaning)`` for every number in the report that is present."""
    m = report["model"]
    hessian = m["curvature"] == "hessian"
    out: list[tuple[str, str, str]] = [
        ("parameters", f"{m['num_params']}", "n: the curvature matrix is n x n"),
        ("curvature", m["curvature"], GLOSSARY["curvature"][0]),
        ("loss", _g(report["loss"], 6), GLOSSARY["loss"][0]),
        ("gradient norm", _g(report["gradient_norm"]), GLOSSARY["gradient norm"][0]),
    ]
    c = report.get("critical_point")
    if c is not None:
        out.append(
            (
                "critical point",
                f"{c['kind']} (grad_tol={c['grad_tol']:g}, eig_tol={c['eig_tol']:g})",
                GLOSSARY["critical point"][0],
            )
        )
        out.append(
            (
                "second-order stop rule",
                "met" if c["stopping_rule_converged"] else "not met",
                GLOSSARY["second-order stop rule"][0],
            )
        )
    e = report.get("eigenvalues")
    if e is not None:
        out.append(
            (
                "lambda_max",
                f"{_g(e['top'][0], 6)}  (residual {_g(e['top_residual_norms'][0], 2)}, "
                f"{e['top_hvps']} HVPs for top-{len(e['top'])})",
                GLOSSARY["lambda_max"][0],
            )
        )
        out.append(
            (
                "top eigenvalues",
                ", ".join(_g(v, 4) for v in e["top"]),
                GLOSSARY["top eigenvalues"][0],
            )
        )
        if "lambda_min" in e:
            out.append(
                (
                    "lambda_min",
                    f"{_g(e['lambda_min'], 6)}  (residual {_g(e['lambda_min_residual_norm'], 2)},"
                    f" {e['lambda_min_hvps']} HVPs)",
                    GLOSSARY["lambda_min"][0]
                    if hessian
                    else "smallest eigenvalue (>= 0 for a PSD curvature up to round-off)",
                )
            )
    t = report.get("trace")
    if t is not None:
        out.append(
            (
                "trace (XTrace)",
                f"{_g(t['xtrace'], 6)} +- {_g(t['xtrace_stderr'], 2)}",
                GLOSSARY["trace (XTrace)"][0],
            )
        )
        if "slq" in t:
            out.append(
                (
                    "trace (SLQ)",
                    f"{_g(t['slq'], 6)} +- {_g(t['slq_stderr'], 2)}",
                    GLOSSARY["trace (SLQ)"][0],
                )
            )
    s = report.get("spectrum")
    if s is not None:
        if c is not None and "negative_fraction" in s:
            out.append(
                (
                    "negative eigenvalues",
                    f"{c['negative_fraction']:.2%} (~{c['index_estimate']:.0f} of "
                    f"{m['num_params']})",
                    GLOSSARY["negative eigenvalues"][0],
                )
            )
        out += [
            (
                "near-null fraction",
                f"{s['near_null_fraction']:.2%} +- {_g(s['near_null_fraction_stderr'], 2)} "
                f"(|lambda| <= {s['null_tol']:g} lambda_max)",
                GLOSSARY["near-null fraction"][0],
            ),
            (
                "effective rank",
                f"{_g(s['effective_rank'], 4)} +- {_g(s['effective_rank_stderr'], 2)} "
                f"of {m['num_params']}",
                GLOSSARY["effective rank"][0],
            ),
            ("condition number", _cond(s), GLOSSARY["condition number"][0]),
        ]
    lr = report.get("learning_rate")
    if lr is not None:
        out += [
            (
                "max stable lr",
                f"{_g(lr['max_stable_lr'])}  (2 / lambda_max, with lambda_max <= "
                f"{_g(lr.get('lambda_max_upper'), 6)} certified)",
                GLOSSARY["max stable lr"][0],
            ),
            (
                "recommended lr",
                f"{_g(lr['recommended_lr'])}  (half the limit)",
                GLOSSARY["recommended lr"][0],
            ),
        ]
        for i, (name, L) in enumerate(sorted(lr["per_layer"].items(), key=_sharpest)):
            if i == 10:
                out.append(
                    (f"  ... {len(lr['per_layer']) - 10} more layers", "", "see report.json")
                )
                break
            out.append(
                (
                    f"  layer {name}",
                    f"lambda_max {_g(L['lambda_max'])}, max lr {_g(L['max_stable_lr'])}, "
                    f"trace {_g(L['trace'])} ({L['num_params']} params)",
                    GLOSSARY["layer"][0] if i == 0 else "",
                )
            )
    out.append(
        (
            "total HVPs / time",
            f"{report['hvps_total']} / {report['timings_s'].get('total', 0.0):.1f} s",
            GLOSSARY["HVPs"][0],
        )
    )
    return out


def _sharpest(item: tuple[str, dict]) -> float:
    return -(item[1]["lambda_max"] or 0.0)


def verdicts(report: dict) -> list[str]:
    """Plain-words conclusions."""
    m = report["model"]
    out = []
    if not report.get("complete", True):
        missing = [
            s
            for s in (
                "top_eigenpairs",
                "lambda_min",
                "spectral_density",
                "trace",
                "per_layer",
                "loss_slice",
            )
            if s not in report.get("stages", [])
        ]
        out.append(
            "INCOMPLETE: the run stopped before "
            + ", ".join(missing)
            + "; run the same command again (or add --resume) to continue."
        )
    g, c = report["gradient_norm"], report.get("critical_point")
    tol = c["grad_tol"] if c else report.get("settings", {}).get("grad_tol", 1e-3)
    if g > tol:
        out.append(
            f"The gradient is not yet small (||g|| = {g:.3g} > {tol:g}): this is not a "
            "critical point; keep training."
        )
    else:
        out.append(f"The gradient is small (||g|| = {g:.3g} <= {tol:g}): a critical point.")
    if m["curvature"] != "hessian":
        out.append(
            f"The curvature is the {m['curvature'].upper()}, positive semi-definite by "
            "construction: it cannot show negative curvature, so whether this is a minimum "
            "or a saddle is not reported (use --curvature hessian)."
        )
    elif c is not None and "lambda_min" in report.get("eigenvalues", {}):
        lam_min = report["eigenvalues"]["lambda_min"]
        if lam_min < -c["threshold"]:
            out.append(
                f"Some directions curve downward (lambda_min = {lam_min:.3g}, about "
                f"{c['negative_fraction']:.1%} of the eigenvalues): the loss can still decrease "
                "along them; the point is a saddle or on the side of one, not a minimum."
            )
        else:
            out.append(
                "No direction curves downward beyond the tolerance: locally a minimum or a flat "
                "valley."
            )
        if c["stopping_rule_converged"]:
            out.append("The second-order stopping rule is met: training may stop here.")
        else:
            out.append(f"The second-order stopping rule is not met: {c['stopping_rule_reason']}.")
    lr = report.get("learning_rate")
    if lr is not None and lr["max_stable_lr"] is not None:
        out.append(
            f"Plain gradient descent diverges here for a learning rate above "
            f"{lr['max_stable_lr']:.3g}; {lr['recommended_lr']:.3g} keeps a safety margin "
            "(adaptive optimizers such as Adam have their own limit)."
            + (
                ""
                if m["curvature"] == "hessian"
                else f" Computed from the {m['curvature'].upper()}'s lambda_max, which "
                "approximates"
                " the Hessian's."
            )
        )
    s = report.get("spectrum")
    if s is not None and s["near_null_fraction"] > 0.2:
        out.append(
            f"{s['near_null_fraction']:.0%} of the eigenvalues are nearly zero: many directions "
            "barely change the loss (a flat, over-parameterised valley)."
        )
    sl = report.get("loss_slice")
    if sl is not None and sl["taylor_check"]:
        err = sl["taylor_check"][0]["relative_error"]
        if err is not None:
            good = "trustworthy" if err < 0.1 else "not trustworthy"
            out.append(
                f"For small steps the quadratic model is {good} (relative error {err:.2g} at "
                f"a step of {sl['taylor_check'][0]['step']:.3g} along the top eigenvector)."
            )
    return out


def summary(report: dict) -> str:
    """The table printed by ``hesse analyze``: quantity, value, and what it means."""
    rs = rows(report)
    w = max(len(k) for k, _, _ in rs)
    lines = [f"hesse analyze: {report['model'].get('name', 'model')}"]
    for k, v, meaning in rs:
        lines.append(f"  {k:<{w}}  {v}")
        if meaning:
            lines.append(f"  {'':<{w}}    -> {meaning}")
    lines.append("")
    lines.append("What this means:")
    lines += [f"  * {v}" for v in verdicts(report)]
    return "\n".join(lines)


def markdown(report: dict, *, plots: bool = True) -> str:
    m = report["model"]
    lines = [
        "# hesse analyze report" + ("" if report.get("complete", True) else " (INCOMPLETE)"),
        "",
        f"Model `{m.get('name', 'model')}`, {m['num_params']} parameters, curvature "
        f"`{m['curvature']}`, dtype {m['dtype']}, device {m.get('device', 'cpu')}, seed "
        f"{report['seed']}; hesse {report['hesse_version']}, torch {report['torch_version']}.",
        "",
        "## What this means",
        "",
    ]
    lines += [f"- {v}" for v in verdicts(report)]
    lines += ["", "## Numbers", "", "| quantity | value | meaning |", "|---|---|---|"]
    lines += [f"| {k.strip()} | {v} | {meaning} |" for k, v, meaning in rows(report)]
    sl = report.get("loss_slice")
    if sl is not None:
        lines += [
            "",
            "## Taylor check along the top eigenvector",
            "",
            "Actual loss change vs the quadratic model `a g^T v + a^2 lambda_max / 2`; the "
            "relative error should fall about 100x per 10x shorter step.",
            "",
            "| step | actual change | predicted | rel. error |",
            "|---|---|---|---|",
        ]
        for r in sl["taylor_check"]:
            lines.append(
                f"| {r['step']:.3g} | {r['actual']:.4g} | {r['predicted']:.4g} | "
                f"{_g(r['relative_error'], 2)} |"
            )
    if plots:
        lines += ["", "## Figures", ""]
        for f, what in [
            ("spectral_density.png", "spectral density (linear axes)"),
            ("spectral_density_log.png", "density of log10(eigenvalue), log axes"),
            ("top_eigenvalues.png", "top eigenvalues"),
            ("per_layer.png", "per-layer curvature"),
            ("loss_slice.png", "loss slice"),
        ]:
            if f != "per_layer.png" or (report.get("learning_rate") or {}).get("per_layer"):
                lines.append(f"![{what}]({f})")
    lines += ["", "## Glossary", "", "| term | meaning | formula |", "|---|---|---|"]
    lines += [f"| {k} | {m_} | `{f}` |" for k, (m_, f) in GLOSSARY.items()]
    lines.append("")
    return "\n".join(lines)
