"""Compression report, its plot and the ``hesse compress`` CLI (tiny settings)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from torch import nn

from hesse.cli import main
from hesse.compress import CompressionReport, compression_report, evaluate, prune

DT = torch.float64


@functools.cache
def _trained():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(90, 5, generator=g, dtype=DT)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.4).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(model(X[:60]), y[:60]).backward()
        opt.step()
    return model, loss_fn, (X[:60], y[:60]), (X[60:], y[60:])


def test_evaluate_matches_direct_computation():
    model, loss_fn, _, (X, y) = _trained()
    ev = evaluate(model, loss_fn, [(X[:10], y[:10]), (X[10:], y[10:])])
    with torch.no_grad():
        out = model(X)
    assert ev["loss"] == pytest.approx(float(loss_fn(out, y)))
    assert ev["accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()))


def test_report_rows_are_reproducible_and_model_untouched(tmp_path):
    model, loss_fn, train, test = _trained()
    before = copy.deepcopy(model.state_dict())
    rep = compression_report(
        model,
        loss_fn,
        train,
        test,
        sparsities=(0.5,),
        bits=(3,),
        average_bits=(3.5,),
        prune_kwargs={"num_steps": 2},
        name="tiny",
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert {(r["method"], r["sparsity"]) for r in rep.pruning} == {
        ("magnitude", 0.5),
        ("obd", 0.5),
        ("obs", 0.5),
    }
    # each row is what the public functions give on a fresh copy
    m = copy.deepcopy(model)
    prune(m, loss_fn, train, 0.5, method="obs", num_steps=2)
    row = next(r for r in rep.pruning if r["method"] == "obs")
    assert row["accuracy"] == pytest.approx(evaluate(m, loss_fn, test)["accuracy"])
    assert row["measured_sparsity"] == pytest.approx(round(0.5 * 128) / 128)
    q = {r["method"]: r for r in rep.quantization}
    assert set(q) == {"rtn", "obs"} and all(r["bits"] == 3 for r in q.values())
    for name in ("0.weight", "2.weight"):
        assert q["obs"]["layer_error"][name] <= q["rtn"]["layer_error"][name] + 1e-12
    assert len(rep.mixed) == 2
    for r in rep.mixed:
        assert r["size_bits"] <= int(3.5 * 128)
    md = rep.to_markdown()
    assert "| 0.50 |" in md and "Mixed precision" in md
    files = rep.save(tmp_path)
    names = {f.name for f in files}
    assert names == {"compress.json", "compress.md", "compress.png"}
    d = json.loads((tmp_path / "compress.json").read_text())
    assert d["schema"] == "hesse.compress/1" and d["dense"] == rep.dense
    assert (tmp_path / "compress.png").stat().st_size > 1000


def test_report_bad_input():
    model, loss_fn, train, test = _trained()
    with pytest.raises(ValueError, match="prune method"):
        compression_report(model, loss_fn, train, prune_methods=("random",))
    with pytest.raises(ValueError, match="sparsity"):
        compression_report(model, loss_fn, train, sparsities=(1.5,))
    with pytest.raises(ValueError, match="quantization method"):
        compression_report(model, loss_fn, train, quant_methods=("kmeans",))


def test_plot_accepts_dict_and_rejects_other_things():
    from hesse.plot import plot_compression

    rep = CompressionReport(
        name="x",
        dense={"loss": 0.1, "accuracy": 0.9},
        pruning=[{"method": "obs", "sparsity": 0.5, "loss": 0.2, "accuracy": 0.85}],
        quantization=[
            {"method": "rtn", "bits": 2, "loss": 0.3, "accuracy": 0.8, "layer_error": {"a": 1.0}}
        ],
    )
    fig = plot_compression(rep.to_dict(), metric="loss")
    assert len(fig.axes) == 2
    with pytest.raises(TypeError, match="CompressionReport"):
        plot_compression({"foo": 1})
    with pytest.raises(ValueError, match="metric"):
        plot_compression(rep, metric="f1")


@pytest.mark.slow
def test_cli_default_workload(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "compress",
            "--out",
            str(out),
            "--widths",
            "64,16,10",
            "--steps",
            "40",
            "--sparsity",
            "0.5",
            "--bits",
            "4",
            "--average-bits",
            "",
            "--prune-methods",
            "magnitude,obs",
            "--no-progress",
            "--no-plots",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "| 0.50 |" in text
    d = json.loads((out / "compress.json").read_text())
    assert d["name"] == "digits-mlp-64-16-10-relu"
    assert {r["method"] for r in d["pruning"]} == {"magnitude", "obs"}


@pytest.mark.slow
def test_cli_lm_workload_reports_perplexity(tmp_path, capsys):
    """``--workload lm``: every Linear layer and the tied embedding, 4 calibration windows,
    test perplexity of the float and compressed models (a few seconds)."""
    import math

    out = tmp_path / "lm"
    argv = ["compress", "--workload", "lm", "--calib", "4", "--test-windows", "64"]
    argv += ["--bits", "4", "--quant-methods", "rtn", "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "| 0.50 |" in text
    d = json.loads((out / "compress.json").read_text())
    assert d["metric"] == "perplexity" and d["name"].startswith("lm-transformer")
    dense = d["dense"]
    assert dense["perplexity"] == pytest.approx(math.exp(dense["loss"]))
    assert 5.0 < dense["perplexity"] < 9.0  # the shipped model: 6.97 on all 640 test windows
    prune_rows = {r["method"]: r for r in d["pruning"]}
    assert set(prune_rows) == {"magnitude", "obs"}
    assert all(r["measured_sparsity"] == pytest.approx(0.5) for r in d["pruning"])
    assert prune_rows["obs"]["perplexity"] < prune_rows["magnitude"]["perplexity"]
    (q,) = d["quantization"]
    assert "tok.weight" in q["layer_error"] and len(q["layer_error"]) == 25
    assert dense["perplexity"] < q["perplexity"] < 1.2 * dense["perplexity"]
    assert d["settings"]["prune_kwargs"]["curvature"] == "'layerwise'"
    # the folder is protected like every command's --out
    (out / "compress.md").write_text("edited")
    assert main([*argv, "--no-plots"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "abc"], "not a list of numbers"),
        (["--bits", "4"], "--average-bits 3 cannot be met"),
        (["--bits", "2.5"], "--bits"),
        (["--widths", "32,10"], "--widths"),
        (["--data", "x:y"], "need --model"),
        (["--steps", "-1"], "--steps"),
        (["--workload", "lm", "--scope", "global"], "needs --scope layer"),
        (["--workload", "lm", "--prune-methods", "obd"], "OBS option"),
        (["--workload", "lm", "--calib", "0"], "--calib"),
        (["--prune-curvature", "layerwise", "--prune-methods", "obs"], "needs --scope layer"),
        (["--workload", "lm", "--test-windows", "0"], "--test-windows"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, argv, message):
    code = main(["compress", "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_bad_method_is_a_usage_error(tmp_path, capsys):
    code = main(
        [
            "compress",
            "--out",
            str(tmp_path / "o"),
            "--widths",
            "64,4,10",
            "--steps",
            "1",
            "--prune-methods",
            "random",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--prune-methods" in capsys.readouterr().err
