"""Result objects round-trip exactly through plain JSON (no pickle)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import hesse
from hesse._serialize import Serializable, from_jsonable, load_json, save_json, to_jsonable
from hesse.analysis import (
    classify_critical_point,
    layer_max_stable_lr,
    max_stable_lr,
    spectrum_summary,
    stopping_rule,
    taylor_check,
)
from hesse.linalg import Status, lanczos
from tests.cases import CASES
from tests.test_linalg_eigen import gapped_spectrum, gen, with_spectrum

f64 = torch.float64


def assert_same(a, b, where="result"):
    """Exactly equal: same types, dtypes, shapes, bits (NaN where NaN)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
        if a.is_floating_point():  # -0.0 stays -0.0 (NaN payloads are not kept)
            real = ~torch.isnan(a)
            assert torch.equal(torch.signbit(a[real]), torch.signbit(b[real])), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _strict_json(path):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def roundtrip(obj, tmp_path):
    back = type(obj).from_dict(json.loads(json.dumps(obj.to_dict(), allow_nan=False)))
    assert_same(obj, back)
    path = obj.save(tmp_path / f"{type(obj).__name__}.json")
    assert _strict_json(path)["type"] == type(obj).__name__
    loaded = type(obj).load(path)
    assert_same(obj, loaded)
    return loaded


def _spd(n=40, seed=0):
    g = gen(seed)
    M = torch.randn(n, n, generator=g, dtype=f64)
    return M @ M.T / n + torch.eye(n, dtype=f64)


def test_linalg_results_round_trip(tmp_path):
    A = with_spectrum(gapped_spectrum(120, 1), 1)
    results = [
        hesse.top_eigenpairs(A, 3, which="both_ends", generator=gen(0)),
        hesse.power_iteration(A, generator=gen(0)),
        hesse.spectral_density(A, num_probes=3, num_steps=20, generator=gen(0)),
        hesse.spectral_density(A, num_probes=1, num_steps=10, deflate=0, generator=gen(0)),
        hesse.hutchinson_trace(A, 20, generator=gen(0)),
        hesse.xtrace(A, 20, generator=gen(0)),
        hesse.trace(A, num_matvecs=200),  # exact
        hesse.hutchinson_diagonal(A, 10, generator=gen(0)),
        hesse.exact_diagonal(A[:20, :20]),
        lanczos(A, 8, generator=gen(0)),
    ]
    S = _spd()
    B = torch.randn(40, 3, generator=gen(1), dtype=f64)
    results += [
        hesse.cg_solve(S, B, tol=1e-8, return_iterates=True),
        hesse.cg_solve(S, B[:, 0], max_iters=2),  # truncated: a status, not an error
        hesse.cg_solve(S - 3 * torch.eye(40, dtype=f64), B[:, 0], on_negative_curvature="stop"),
        hesse.minres_solve(S, B[:, 0], tol=1e-8),
    ]
    assert any(r.status == "negative_curvature" for r in results[-2:])
    for r in results:
        back = roundtrip(r, tmp_path)
        assert getattr(back, "status", None) == getattr(r, "status", None)
    cg = results[-4]
    assert isinstance(cg.iterates, dict) and all(isinstance(k, int) for k in cg.iterates)


def test_status_is_one_enum_compared_with_strings():
    A = with_spectrum(gapped_spectrum(120, 1), 1)
    ok = hesse.top_eigenpairs(A, 1, generator=gen(0))
    short = hesse.top_eigenpairs(A, 4, tol=1e-12, num_matvecs=6, generator=gen(0))
    assert ok.status is Status.CONVERGED and ok.status == "converged"
    assert short.status is Status.MAX_ITERS and not short.converged
    assert hesse.linalg.CGStatus is Status


def test_analysis_results_round_trip(tmp_path):
    f = lambda w: w[0] ** 3 - 3 * w[0] - w[1] ** 2  # noqa: E731
    x = torch.tensor([1.0, 0.0], dtype=f64)
    cp = classify_critical_point(f, x)
    assert cp.escape_direction is not None
    roundtrip(cp, tmp_path)
    roundtrip(classify_critical_point(lambda w: (w**2).sum(), x), tmp_path)  # None field
    roundtrip(stopping_rule(f, x), tmp_path)
    A = with_spectrum(gapped_spectrum(120, 1), 1)
    dens = hesse.spectral_density(A, num_probes=3, num_steps=20, generator=gen(0))
    roundtrip(spectrum_summary(dens), tmp_path)
    roundtrip(max_stable_lr(A, generator=gen(0)), tmp_path)
    roundtrip(max_stable_lr(-torch.eye(3, dtype=f64), generator=gen(0)), tmp_path)  # inf
    model, loss_fn, data = CASES[0].build()
    H = hesse.HessianOperator(model, loss_fn, data)
    per_layer = layer_max_stable_lr(H, generator=gen(0))
    path = save_json(tmp_path / "layers.json", per_layer)
    assert_same(per_layer, load_json(path))
    d = torch.randn(H.shape[0], dtype=f64, generator=gen(0))
    roundtrip(taylor_check(model, loss_fn, data, d, steps=(1e-2,)), tmp_path)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([1.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-310], dtype=f64),
        torch.tensor([[1 / 3, float("nan")], [2.5, -7.0]], dtype=torch.float32),
        torch.tensor([1 / 3, 65504.0, float("inf")], dtype=torch.float16),
        torch.tensor([1 / 3, 3e38, float("nan")], dtype=torch.bfloat16),
        torch.tensor([1 + 2j, float("nan") + 0j], dtype=torch.complex128),
        torch.tensor(2.0**-1074, dtype=f64),  # 0-d, subnormal
        torch.zeros(0, 3, dtype=f64),
        torch.tensor([True, False]),
        torch.tensor([-(2**63), 2**63 - 1]),
        torch.tensor([0, 255], dtype=torch.uint8),
    ],
)
def test_tensors_round_trip_bit_exactly(t):
    data = json.loads(json.dumps(to_jsonable(t), allow_nan=False))
    assert_same(t, from_jsonable(data))


def test_containers_and_plain_values_round_trip():
    value = {
        "a": (1, 2.5, None, "x", True),
        "b": [float("nan"), float("inf"), -float("-inf")],
        "c": {3: torch.ones(2), (1, 2): "tuple key"},
        "d": torch.float32,
        "e": Status.BOUNDARY,
    }
    back = from_jsonable(json.loads(json.dumps(to_jsonable(value), allow_nan=False)))
    assert_same(value, back)


def test_loading_never_builds_unregistered_objects_and_names_the_file(tmp_path):
    bad = {
        "not_json.json": "\x80\x81 garbage",
        "foreign.json": json.dumps({"hello": 1}),
        "future.json": json.dumps({"format": "hesse", "version": 99, "type": "x", "data": 1}),
        "unknown_type.json": json.dumps(
            {
                "format": "hesse",
                "version": 1,
                "type": "Popen",
                "data": {"__type__": "Popen", "fields": {"args": ["touch", "x"]}},
            }
        ),
        "bad_fields.json": json.dumps(
            {
                "format": "hesse",
                "version": 1,
                "type": "TraceResult",
                "data": {"__type__": "TraceResult", "fields": {"estimate": 1.0, "evil": 2}},
            }
        ),
    }
    for name, text in bad.items():
        p = tmp_path / name
        p.write_text(text, encoding="latin-1")
        with pytest.raises(ValueError) as info:
            load_json(p)
        assert str(p) in str(info.value), name
    with pytest.raises(FileNotFoundError):
        load_json(tmp_path / "missing.json")
    tr = hesse.hutchinson_trace(torch.eye(4, dtype=f64), 4, generator=gen(0))
    path = tr.save(tmp_path / "tr.json")
    with pytest.raises(ValueError, match="holds a TraceResult, not a EigenResult"):
        hesse.EigenResult.load(path)


def test_unregistered_dataclass_is_refused_when_saving():
    @dataclasses.dataclass
    class Mine:
        x: int = 1

    with pytest.raises(TypeError, match="not a registered result class"):
        to_jsonable(Mine())
    with pytest.raises(TypeError, match="Cannot save a value of type object"):
        to_jsonable(object())
    assert issubclass(hesse.EigenResult, Serializable)
