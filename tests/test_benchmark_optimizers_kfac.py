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
    assert out["seeds"] == 2
    for task in out["tasks"]:
        rows = {r["optimizer"]: r for r in task["rows"]}
        assert set(rows) == set(bench.OPTIMIZERS)
        assert len(task["targets"]) == 2
        # each seed's target is AdamW's own final loss in that seed, reached at the last step
        assert rows["adamw"]["final"] == task["targets"]
        assert rows["adamw"]["steps_to_target"] == [out["steps"]] * 2
        assert rows["adamw"]["ratios"] == [1.0, 1.0] and rows["adamw"]["ratio"] == 1.0
        for r in rows.values():
            assert r["config"]
            assert r["time"] > 0 and all(math.isfinite(f) for f in r["final"])
            for hit, final, hist, target in zip(
                r["steps_to_target"], r["final"], r["history"], task["targets"]
            ):
                steps = [s for s, _ in hist]
                assert steps[0] == 0 and steps == sorted(steps) and steps[-1] <= out["steps"]
                if hit is not None:
                    assert hist[-1] == (hit, final)
                    assert final <= target
            hits = [h for h in r["steps_to_target"] if h is not None]
            assert r["reached"] == len(hits)
            if len(hits) == 2:
                assert r["median_steps"] == sum(hits) / 2


def test_parse_config():
    assert bench.parse_config(["lr=0.1", "kl_clip=None", "grafting=adam"]) == {
        "lr": 0.1,
        "kl_clip": None,
        "grafting": "adam",
    }
