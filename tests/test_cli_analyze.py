"""``hesse analyze`` end to end: in-process and as a subprocess; bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch

import hesse
from hesse.cli import main

FIX = str(Path(__file__).with_name("cli_fixtures.py"))
SMALL = ["--top-k", "3", "--num-probes", "2", "--num-steps", "16", "--no-progress"]


def _schema():
    return json.loads(resources.files("hesse.report").joinpath("analyze.schema.json").read_text())


@pytest.mark.slow
def test_default_run_in_process_matches_dense_float64(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["analyze", "--out", str(out), "--no-progress"]) == 0
    for name in (
        "report.json",
        "report.md",
        "spectral_density.png",
        "spectral_density_log.png",
        "top_eigenvalues.png",
        "per_layer.png",
        "loss_slice.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, _schema())
    assert "lambda_max" in capsys.readouterr().out

    # the same deterministic default model, analysed densely in float64
    from hesse.data import default_workload

    w = default_workload(seed=0)
    model64 = w.model.double()
    X, y = w.train
    H = hesse.HessianOperator(model64, w.loss_fn, (X.double(), y))
    evals = torch.linalg.eigvalsh(H.to_dense())
    lam_max = float(evals[-1])
    assert report["eigenvalues"]["top"][0] == pytest.approx(lam_max, rel=1e-3)
    top10 = evals.flip(0)[:10]
    assert report["eigenvalues"]["top"] == pytest.approx(top10.tolist(), rel=1e-2)
    assert report["learning_rate"]["max_stable_lr"] == pytest.approx(2 / lam_max, rel=1e-3)
    cp = report["critical_point"]
    gnorm = float(H.gradient().norm())
    thr = cp["eig_tol"] * max(abs(float(evals[0])), lam_max)
    if gnorm > cp["grad_tol"]:
        expected = "not_critical"
    elif evals[0] > thr:
        expected = "minimum"
    else:
        expected = "saddle" if evals[0] < -thr else "degenerate"
    assert cp["kind"] == expected
    assert abs(report["trace"]["xtrace"] - float(evals.sum())) <= max(
        4 * report["trace"]["xtrace_stderr"], 1e-3 * abs(float(evals.sum()))
    )


def test_custom_model_as_subprocess(tmp_path):
    out = tmp_path / "rep"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hesse",
            "analyze",
            "--model",
            f"{FIX}:model",
            "--data",
            f"{FIX}:data",
            "--out",
            str(out),
            "--curvature",
            "ggn",
            *SMALL,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, _schema())
    assert report["model"]["curvature"] == "ggn" and report["model"]["num_samples"] == 30
    assert report["eigenvalues"]["lambda_min"] >= -1e-5  # the GGN is PSD
    assert (out / "loss_slice.png").exists()


def test_help_reads_well():
    proc = subprocess.run(
        [sys.executable, "-m", "hesse", "analyze", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in (
        "--model",
        "--data",
        "--checkpoint",
        "--loss",
        "--params",
        "--curvature",
        "--seed",
        "--dtype",
        "--out",
        "--top-k",
    ):
        assert flag in proc.stdout


def test_checkpoint_and_params_subset(tmp_path):
    sys.path.insert(0, str(Path(FIX).parent))
    import cli_fixtures

    m = cli_fixtures.model()
    with torch.no_grad():
        m[0].weight.mul_(2.0)
    ckpt = tmp_path / "w.pt"
    torch.save(m.state_dict(), ckpt)
    out = tmp_path / "rep"
    assert (
        main(
            [
                "analyze",
                "--model",
                f"{FIX}:model",
                "--data",
                f"{FIX}:data",
                "--checkpoint",
                str(ckpt),
                "--params",
                "2",
                "--dtype",
                "float64",
                "--no-plots",
                "--out",
                str(out),
                *SMALL,
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["num_params"] == 8 * 3 + 3 and report["model"]["dtype"] == "float64"
    m64 = m.double()
    X = torch.cat([b[0] for b in cli_fixtures.data()]).double()
    y = torch.cat([b[1] for b in cli_fixtures.data()])
    H = hesse.HessianOperator(m64, torch.nn.CrossEntropyLoss(), (X, y), params=["2"])
    lam = float(torch.linalg.eigvalsh(H.to_dense())[-1])
    assert report["eigenvalues"]["top"][0] == pytest.approx(lam, rel=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no_such_module_xyz:make", "--data", f"{FIX}:data"], "cannot import"),
        (["--model", f"{FIX}:not_a_model", "--data", f"{FIX}:data"], "expected a torch.nn.Module"),
        (["--model", f"{FIX}:model", "--data", f"{FIX}:wrong_data"], "do not fit"),
        (
            ["--model", f"{FIX}:model", "--data", f"{FIX}:data", "--loss", f"{FIX}:unreduced_loss"],
            "reduction",
        ),
        (["--model", f"{FIX}:model"], "--data"),
        (["--model", "nocolon"], "MODULE:FACTORY"),
        (["--loss", "hinge"], "--loss"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "rep"
    assert main(["analyze", *argv, "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hesse")]


def test_unwritable_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["analyze", "--out", str(blocker / "sub"), *SMALL]) == 2
    assert main(["analyze", "--out", str(blocker), *SMALL]) == 2
    assert "cannot write" in capsys.readouterr().err
