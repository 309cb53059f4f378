"""benchmarks/gpu.py at toy size on the CPU: its pieces run and report sane numbers."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    from transformers import GPT2LMHeadModel  # noqa: F401
except Exception as e:  # e.g. a broken torchvision in the environment  # noqa: BLE001
    pytest.skip(f"transformers' GPT-2 does not import here: {e}", allow_module_level=True)

_spec = importlib.util.spec_from_file_location(
    "bench_gpu", Path(__file__).parents[1] / "benchmarks" / "gpu.py"
)
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def _args(**kw):
    base = dict(device="cpu", shape="toy", batch=2, seq=8, repeats=1, tol=1e-2, probes=1, steps=6)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
)
def test_gpu_benchmark_row_on_cpu(dtype):
    r = gpu.row("ggn", dtype, _args())
    assert r["n"] > 0 and r["product_over_grad"] > 0
    assert len(r["top10"]) == 10 and r["top10_matvecs"] >= 10
    assert r["top10"] == sorted(r["top10"], reverse=True)
    assert r["density_matvecs"] > 0
    assert "| bfloat16 |" in gpu.table([r], "t") or dtype == torch.float32


def test_gpu_benchmark_without_cuda_exits_cleanly(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
