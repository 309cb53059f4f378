"""``hesse plot REPORT`` redraws a saved report's figures; ``hesse compare A B`` puts two
analysis reports side by side (:func:`hesse.load_report`, :func:`hesse.report.compare_reports`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import OutputDir, UsageError, new_parser

__all__ = ["add_parser"]


def add_parser(subparsers: Any, name: str) -> None:
    if name == "plot":
        p = new_parser(
            subparsers,
            "plot",
            help="redraw the figures of a saved report (analyze, compress or track)",
            description=(
                "Read a report.json / compress.json / sharpness.json (or the folder holding "
                "one) and draw its figures again, without recomputing anything."
            ),
        )
        p.add_argument("report", metavar="REPORT", help="a saved report file or folder")
        p.add_argument("--out", help="folder for the figures (default: the report's folder)")
        p.set_defaults(func=_plot)
    else:
        p = new_parser(
            subparsers,
            "compare",
            help="two analysis reports side by side (spectra, per-layer, differences)",
            description=(
                "Compare two `hesse analyze` reports (e.g. before and after training, or two "
                "checkpoints): a table of differences (compare.md, printed) and compare.png "
                "with both spectra overlaid and the per-layer sharpness of each."
            ),
        )
        p.add_argument("a", metavar="A", help="first report (file or folder)")
        p.add_argument("b", metavar="B", help="second report (file or folder)")
        p.add_argument("--labels", default="A,B", help="names of the two runs, comma-separated")
        p.add_argument("--out", default="hesse-compare", help="output folder")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace files in --out that hesse did not write",
        )
        p.add_argument("--no-plots", action="store_true", help="write compare.md only")
        p.set_defaults(func=_compare)


def _load(path: str) -> Any:
    from ..report import load_report

    try:
        return load_report(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read report {path!r}: {e}") from e


def _plot(args: argparse.Namespace) -> int:
    from ..report import AnalysisReport, TrackerHistory

    rep = _load(args.report)
    src = Path(args.report)
    folder = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    if isinstance(rep, AnalysisReport):
        names = [
            "spectral_density.png",
            "spectral_density_log.png",
            "top_eigenvalues.png",
            "per_layer.png",
            "loss_slice.png",
        ]
        draw = rep.plot
    elif isinstance(rep, TrackerHistory):
        from ..plot import plot_sharpness

        names = ["sharpness.png"]

        def draw(d: Path) -> list[Path]:
            plot_sharpness(rep.history, d / names[0])
            return [d / names[0]]
    else:
        names = ["compress.png"]

        def draw(d: Path) -> list[Path]:
            from ..plot.compress import plot_compression

            plot_compression(rep, d / names[0])
            return [d / names[0]]

    out = OutputDir(folder, names, overwrite=True)  # redrawing hesse's own figures
    files = out.write(draw)
    print(f"wrote {len(files)} files to {folder}/: " + ", ".join(f.name for f in files))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..report import AnalysisReport, comparison_markdown

    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        raise UsageError(f"--labels {args.labels!r}: expected two names, e.g. 'before,after'.")
    out = OutputDir(args.out, ["compare.md", "compare.png"], overwrite=args.overwrite)
    a, b = _load(args.a), _load(args.b)
    for r, p in ((a, args.a), (b, args.b)):
        if not isinstance(r, AnalysisReport):
            raise UsageError(f"{p!r} is not a `hesse analyze` report.")
    table = comparison_markdown(a, b, labels)
    print(table)

    def write(d: Path) -> list[Path]:
        (d / "compare.md").write_text(f"# {labels[0]} vs {labels[1]}\n\n{table}")
        files = [d / "compare.md"]
        if not args.no_plots:
            from ..plot import plot_comparison

            plot_comparison(a, b, d / "compare.png", labels=labels)
            files.append(d / "compare.png")
        return files

    files = out.write(write)
    print(f"wrote {len(files)} files to {args.out}/: " + ", ".join(f.name for f in files))
    return 0
