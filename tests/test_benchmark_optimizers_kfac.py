"""benchmarks/optimizers_kfac.py in its quick mode: the protocol runs end to end."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_optimizers_kfac", Path(__file__).parents[1] / "benchmarks" / "optimizers_kfac.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


@pytest.fixture
def restore_torch_settings():
    threads = torch.get_num_threads()
    yield
    torch.set_flush_denormal(False)  # main() sets it (hypothesis refuses to run under it)
    torch.set_num_threads(threads)


def test_quick_autoencoder_protocol(restore_torch_settings):
    out = bench.main(["--quick", "--tasks", "autoencoder", "lm"])
    assert [t["task"] for t in out["tasks"]] == ["autoencoder", "lm"]
    for task in out["tasks"]:
        rows = {r["optimizer"]: r for r in task["rows"]}
        assert set(rows) == set(bench.OPTIMIZERS)
        assert task["target"] == min(task["adamw_grid"].values())
        # AdamW's own run defines the target: it reaches it, at the last step at the latest
        assert rows["adamw"]["steps_to_target"] is not None
        assert rows["adamw"]["ratio"] == 1.0
        for r in rows.values():
            assert r["config"]
            assert r["time"] > 0 and math.isfinite(r["final"])
            steps = [s for s, _ in r["history"]]
            assert steps[0] == 0 and steps == sorted(steps) and steps[-1] <= out["steps"]
            if r["steps_to_target"] is not None:
                assert r["history"][-1] == (r["steps_to_target"], r["final"])
                assert r["final"] <= task["target"]


def test_parse_config():
    assert bench.parse_config(["lr=0.1", "kl_clip=None", "grafting=adam"]) == {
        "lr": 0.1,
        "kl_clip": None,
        "grafting": "adam",
    }
