"""The CLI never loses work, explains itself, and round-trips its reports (tiny budgets)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import hesse
from hesse.cli import build_parser, main
from hesse.report import AnalysisReport, compare_reports

FIX = str(Path(__file__).with_name("cli_fixtures.py"))
TINY = [
    "--model", f"{FIX}:model", "--data", f"{FIX}:data",
    "--top-k", "2", "--num-probes", "2", "--num-steps", "8", "--trace-matvecs", "10",
    "--no-progress",
]  # fmt: skip


def _analyze(out: Path, *extra: str) -> int:
    return main(["analyze", "--out", str(out), *TINY, *extra])


def test_out_refuses_files_hesse_did_not_write(tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.json").write_text("my own notes")
    (out / "keep.txt").write_text("untouched")
    assert _analyze(out, "--no-plots") == 2
    err = capsys.readouterr().err
    assert "report.json" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "report.json").read_text() == "my own notes"
    assert _analyze(out, "--no-plots", "--overwrite") == 0
    assert json.loads((out / "report.json").read_text())["complete"] is True
    # files hesse wrote itself are replaced on the next run ...
    assert _analyze(out, "--no-plots") == 0
    # ... unless the user edited them since
    (out / "report.md").write_text("edited by hand")
    assert _analyze(out, "--no-plots") == 2
    assert "report.md" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "edited by hand"
    assert (out / "keep.txt").read_text() == "untouched"
    assert not [p for p in out.iterdir() if p.name.startswith(".hesse-staging")]


def test_staging_happens_inside_the_target_folder(tmp_path, monkeypatch):
    """Every rename stays inside --out, so it cannot cross a file-system boundary."""
    import hesse.cli._common as common

    real = os.replace
    moves = []
    out = tmp_path / "rep"  # as if mounted from another file system

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        if (out in src.parents) != (out in dst.parents):
            raise OSError(18, "Invalid cross-device link")
        if dst.parent == out:
            moves.append(dst.name)
        real(src, dst)

    monkeypatch.setattr(common.os, "replace", replace)
    assert _analyze(out) == 0
    assert {"report.json", "report.md", "spectral_density.png", "per_layer.png"} <= set(moves)


def test_bad_options_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import hesse.report._analyze as ra

    def boom(*a, **k):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(ra, "top_eigenpairs", boom)
    for argv, msg in [
        (["--top-k", "0"], "--top-k"),
        (["--eig-tol", "-1"], "--eig-tol"),
        (["--threads", "-2"], "--threads"),
        (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], "--device"),
        (["--workload", "digits"], "exclude each other"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "no such file"),
        (["--resume"], "no interrupted run"),
    ]:
        assert _analyze(tmp_path / "o", *argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_interrupt_keeps_finished_stages_and_the_same_command_continues(
    tmp_path, monkeypatch, capsys
):
    import hesse.report._analyze as ra

    ref_out = tmp_path / "ref"
    assert _analyze(ref_out, "--no-plots") == 0
    ref = json.loads((ref_out / "report.json").read_text())

    real_trace = ra.trace

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "rep"
    monkeypatch.setattr(ra, "trace", ctrl_c)
    assert _analyze(out) == 130
    captured = capsys.readouterr()
    part = json.loads((out / "report.json").read_text())
    assert part["complete"] is False
    assert part["stages"] == ["top_eigenpairs", "lambda_min", "spectral_density"]
    assert "INCOMPLETE" in (out / "report.md").read_text()
    assert (out / "spectral_density.png").exists() and not (out / "loss_slice.png").exists()
    assert "run the same command again" in captured.err
    assert part["eigenvalues"]["top"] == pytest.approx(ref["eigenvalues"]["top"], rel=1e-5)

    # the same command again: the finished stages are loaded, not recomputed
    calls = []

    def counting_trace(*a, **k):
        calls.append(1)
        return real_trace(*a, **k)

    monkeypatch.setattr(ra, "trace", counting_trace)
    monkeypatch.setattr(ra, "top_eigenpairs", ctrl_c)  # must not run again
    monkeypatch.setattr(ra, "spectral_density", ctrl_c)
    assert _analyze(out, "--resume") == 0
    done = json.loads((out / "report.json").read_text())
    assert done["complete"] is True and calls
    assert not (out / ".hesse-work").exists()
    assert done["eigenvalues"] == part["eigenvalues"]  # loaded, not recomputed
    for key in ("trace", "spectrum"):  # the same numbers up to float32 rounding
        for k, v in ref[key].items():
            assert done[key][k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v)


def test_ctrl_c_inside_a_solver_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    import hesse.report._analyze as ra

    real = ra.spectral_density
    seen = {}

    class Interrupting(hesse.LinearOperator):
        def __init__(self, op):
            super().__init__(op.shape, op.dtype, op.device, symmetric=True)
            self.op, self.calls = op, 0

        def _matmat(self, V):
            self.calls += 1
            if self.calls > 4:
                raise KeyboardInterrupt
            return self.op.matmat(V)

    def interrupted(op, **kw):
        seen["checkpoint"] = Path(kw["checkpoint"])
        return real(Interrupting(op), **{**kw, "checkpoint_every": 1})

    out = tmp_path / "rep"
    monkeypatch.setattr(ra, "spectral_density", interrupted)
    assert _analyze(out, "--no-plots") == 130
    assert "run the same command again" in capsys.readouterr().err
    assert seen["checkpoint"].is_file()  # the solver's own state, mid-run
    monkeypatch.setattr(ra, "spectral_density", real)
    assert _analyze(out, "--no-plots") == 0
    done = json.loads((out / "report.json").read_text())
    ref_out = tmp_path / "ref"
    assert _analyze(ref_out, "--no-plots") == 0
    ref = json.loads((ref_out / "report.json").read_text())
    assert done["complete"] and done["spectrum"]["density"] == ref["spectrum"]["density"]
    assert done["trace"]["slq"] == pytest.approx(ref["trace"]["slq"], rel=1e-4)


def test_a_crash_in_a_later_stage_keeps_the_earlier_ones(tmp_path, monkeypatch):
    import hesse.report._analyze as ra

    def crash(*a, **k):
        raise MemoryError("out of memory in the loss slice")

    monkeypatch.setattr(ra, "_slice", crash)
    out = tmp_path / "rep"
    with pytest.raises(MemoryError):
        _analyze(out, "--no-plots")
    part = json.loads((out / "report.json").read_text())
    assert part["complete"] is False and "loss_slice" not in part["stages"]
    assert "per_layer" in part["stages"]


def test_report_round_trips_and_replots(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _analyze(out, "--curvature", "ggn") == 0
    text = capsys.readouterr().out
    # a GGN report never states what only the Hessian can tell
    labels = [line.split("  ")[1] for line in text.splitlines() if line.startswith("  ") and
              len(line.split("  ")) > 1]  # fmt: skip
    assert "critical point" not in labels and "negative eigenvalues" not in labels
    assert "stop rule" not in text and "saddle or" not in text
    assert "positive semi-definite" in text
    rep = hesse.load_report(out)
    assert isinstance(rep, AnalysisReport) and "critical_point" not in rep.data
    saved = json.loads((out / "report.json").read_text())
    assert rep.to_dict() == saved
    top = rep.results["top_eigenpairs"]
    assert top.eigenvalues.tolist() == pytest.approx(saved["eigenvalues"]["top"], rel=1e-6)
    assert rep.results["spectral_density"].nodes.shape[0] == 2
    for f in out.glob("*.png"):
        f.unlink()
    assert main(["plot", str(out / "report.json")]) == 0
    assert {p.name for p in out.glob("*.png")} == {
        "spectral_density.png", "spectral_density_log.png", "top_eigenvalues.png",
        "per_layer.png", "loss_slice.png",
    }  # fmt: skip


def test_compare_two_reports(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _analyze(a) == 0
    assert _analyze(b, "--dtype", "float64") == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--labels", "f32,f64", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| quantity | f32 | f64 |" in table and "lambda_max" in table
    assert (out / "compare.png").stat().st_size > 0
    rows = {r["quantity"]: r for r in compare_reports(hesse.load_report(a), hesse.load_report(b))}
    ra, rb = (
        json.loads((a / "report.json").read_text()),
        json.loads((b / "report.json").read_text()),
    )
    assert rows["lambda_max"]["a"] == ra["eigenvalues"]["top"][0]
    assert rows["lambda_max"]["change"] == pytest.approx(
        rb["eigenvalues"]["top"][0] - ra["eigenvalues"]["top"][0]
    )
    assert any(k.startswith("layer ") for k in rows)
    assert main(["compare", str(a), str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_track_writes_history_and_plot(tmp_path, capsys):
    out = tmp_path / "trk"
    argv = ["track", "--model", f"{FIX}:model", "--data", f"{FIX}:data", "--optimizer", "SGD",
            "--lr", "0.1", "--optimizer-args", "momentum=0.5", "--steps", "6", "--every", "3",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "lambda_max" in capsys.readouterr().out
    rows = (out / "sharpness.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + one row per check
    hist = hesse.load_report(out / "sharpness.json")
    assert len(hist.history) == 2 and hist.history[0].lambda_max > 0
    assert (out / "sharpness.png").stat().st_size > 0
    (out / "sharpness.png").unlink()
    assert main(["plot", str(out / "sharpness.json")]) == 0
    assert (out / "sharpness.png").stat().st_size > 0
    bad = ["track", "--model", f"{FIX}:model", "--data", f"{FIX}:data", "--out", str(out)]
    assert main([*bad, "--optimizer", "Nope"]) == 2
    assert main([*bad, "--optimizer-args", "momentum"]) == 2
    assert "K=V" in capsys.readouterr().err


def test_help_shows_every_default_once_and_every_option_explained():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "analyze" in a.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "(default: None)" not in text, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
        if name in ("analyze", "compress", "track"):
            for flag in ("--device", "--train-mode", "--threads", "--workload", "--overwrite"):
                assert flag in text, (name, flag)
    analyze_help = sub.choices["analyze"].format_help()
    assert analyze_help.count("(default: all)") == 1
    for c in ("hessian", "ggn", "fisher_exact", "fisher_mc", "fisher_empirical"):
        assert c in analyze_help


def test_markdown_explains_every_number(tmp_path):
    out = tmp_path / "rep"
    assert _analyze(out, "--no-plots") == 0
    md = (out / "report.md").read_text()
    assert "## What this means" in md and "## Glossary" in md
    table = md.split("## Numbers")[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert rows and all(len(r.strip("|").split(" | ")) == 3 for r in rows)
    assert "recommended lr" in md and "keep training" in md or "gradient is small" in md


def test_per_layer_plot_stays_readable_with_many_blocks():
    from hesse.plot import plot_layer_curvature

    lam = {f"block.{i}.weight": float(i % 37) + 0.5 for i in range(500)}
    fig = plot_layer_curvature(lam, {k: 1.0 for k in lam})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(labels) == 20
    assert labels[-1] in {k for k, v in lam.items() if v == max(lam.values())}
    assert "top 20 of 500" in fig._suptitle.get_text()
    one = plot_layer_curvature({"w": 1.0})
    assert [t.get_text() for t in one.axes[0].get_yticklabels()] == ["w"]


def test_compression_report_round_trips(tmp_path):
    from hesse.compress import CompressionReport

    rep = CompressionReport(
        name="x",
        dense={"loss": 0.1, "accuracy": 0.9},
        pruning=[{"method": "obs", "sparsity": 0.5, "loss": 0.2, "accuracy": 0.85}],
        quantization=[
            {"method": "rtn", "bits": 2, "loss": 0.3, "accuracy": 0.8, "layer_error": {"a": 1.0}}
        ],
    )
    rep.save(tmp_path, plot=False)
    back = hesse.load_report(tmp_path / "compress.json")
    assert isinstance(back, CompressionReport) and back.to_dict() == rep.to_dict()
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "compress.png").stat().st_size > 0
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a hesse report"):
        hesse.load_report(tmp_path / "x.json")
