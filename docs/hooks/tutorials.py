"""MkDocs hook: execute the tutorials when the docs build.

Every ``docs/tutorials/*.py`` is a plain Python script in "percent" format::

    # %% [markdown]
    # # Title
    # Some *Markdown* text (each line starts with ``# ``).

    # %%
    print("a code cell")

At build time the hook runs each script top to bottom in a fresh namespace, one CPU thread,
and turns it into the page ``tutorials/<name>.md``: Markdown cells as text, code cells as
highlighted code, each followed by what the cell printed (stdout, stderr, warnings) and the
matplotlib figures it left open or returned as its last expression (saved as PNGs next to
the page, then closed); another final expression is shown as its ``repr``. The script
itself is published as a download. An exception in a tutorial fails the build, with the
traceback. Results are cached per script content, so ``mkdocs serve`` only re-runs a
tutorial that changed.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import logging
import os
import re
import time
import traceback
import warnings
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

log = logging.getLogger("mkdocs.hooks.tutorials")
_CELL = re.compile(r"^# %%(.*)$")
_cache: dict[str, tuple[str, str, dict[str, bytes], float]] = {}
TIMINGS: dict[str, float] = {}


def split_cells(source: str) -> list[tuple[str, str]]:
    """``[(kind, text)]`` with kind ``"markdown"`` or ``"code"``; a leading docstring-free
    preamble before the first marker counts as code."""
    cells: list[tuple[str, list[str]]] = []
    kind, buf = "code", []
    for line in source.splitlines():
        m = _CELL.match(line)
        if m:
            cells.append((kind, buf))
            kind, buf = ("markdown" if "[markdown]" in m.group(1) else "code"), []
            continue
        buf.append(line)
    cells.append((kind, buf))
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            text = "\n".join(re.sub(r"^# ?", "", ln) if ln.startswith("#") else ln for ln in lines)
        else:
            text = "\n".join(lines)
        if text.strip():
            out.append((kind, text.strip("\n")))
    return out


def _fence(text: str, lang: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}\n"


def _exec_cell(text: str, filename: str, ns: dict):
    """Run a code cell; like a notebook, return the value of a final bare expression."""
    tree = ast.parse(text, filename)
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body.pop()
    exec(compile(tree, filename, "exec"), ns)
    if last is None:
        return None
    return eval(compile(ast.Expression(last.value), filename, "eval"), ns)


def run_tutorial(path: Path, stem: str) -> tuple[str, dict[str, bytes], float]:
    """Execute one tutorial; return (markdown, {figure file name: png bytes}, seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    torch.set_num_threads(1)
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    plt.close("all")
    ns: dict = {"__name__": "__main__", "__file__": str(path)}
    md: list[str] = []
    figures: dict[str, bytes] = {}
    t0, w0 = time.process_time(), time.perf_counter()
    try:
        for i, (kind, text) in enumerate(split_cells(path.read_text())):
            if kind == "markdown":
                md.append(text + "\n")
                continue
            md.append(_fence(text, "python"))
            out = io.StringIO()
            try:
                with (
                    contextlib.redirect_stdout(out),
                    contextlib.redirect_stderr(out),
                    warnings.catch_warnings(record=True) as caught,
                ):
                    warnings.simplefilter("default")
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    shown = _exec_cell(text, f"{path.name} (cell {i + 1})", ns)
            except BaseException as err:
                raise PluginError(
                    f"Tutorial {path.name} failed in cell {i + 1}:\n{text}\n\n"
                    f"{out.getvalue()}{traceback.format_exc()}"
                ) from err
            printed = out.getvalue()
            for w in caught:
                printed += f"{w.category.__name__}: {w.message}\n"
            if printed.strip():
                md.append('<div class="tutorial-output" markdown>\n\n' + _fence(printed, "text"))
                md.append("</div>\n")
            figs = [plt.figure(num) for num in plt.get_fignums()]
            items = shown if isinstance(shown, (list, tuple)) else [shown]
            if shown is not None and all(hasattr(x, "savefig") for x in items):
                figs += [f for f in items if f not in figs]
            elif shown is not None:
                md.append(_fence(repr(shown), "text"))
            for fig in figs:
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
                name = f"{stem}_{len(figures) + 1}.png"
                figures[name] = buf.getvalue()
                md.append(f"![Figure {len(figures)} of {stem}]({name})\n")
            plt.close("all")
    finally:
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        plt.close("all")
    seconds, wall = time.process_time() - t0, time.perf_counter() - w0
    md.append(
        f"---\n\n*Executed when these docs were built: {seconds:.1f} s of CPU time "
        f"({wall:.1f} s wall) on one thread. Download the script: [{path.name}]({path.name}).*\n"
    )
    return "\n".join(md), figures, seconds


def on_files(files: Files, config) -> Files:
    docs = Path(config["docs_dir"])
    for path in sorted((docs / "tutorials").glob("*.py")):
        stem = path.stem
        key = hashlib.sha256(path.read_bytes()).hexdigest()
        if stem not in _cache or _cache[stem][0] != key:
            log.info(f"Running tutorial {path.name}")
            md, figures, seconds = run_tutorial(path, stem)
            _cache[stem] = (key, md, figures, seconds)
            log.info(f"Tutorial {path.name}: {seconds:.1f} s CPU")
        _, md, figures, seconds = _cache[stem]
        TIMINGS[stem] = seconds
        files.append(File.generated(config, f"tutorials/{stem}.md", content=md))
        for name, data in figures.items():
            files.append(File.generated(config, f"tutorials/{name}", content=data))
    return files
