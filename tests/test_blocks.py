"""Per-block spectra and the Jensen-Shannon distance (hesse.analysis.blocks)."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hesse
from hesse.analysis import block_spectra, js_distance
from hesse.data.lm import CausalTransformer, LMConfig, TokenCrossEntropy, lm_corpus, lm_sequences


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_js_distance_closed_forms():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert float(js_distance(p, p)) == 0.0
    assert float(js_distance(p, 10 * p)) == pytest.approx(0.0, abs=1e-7)  # normalised first
    assert float(js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))) == 1.0
    # (1,0) vs (1/2,1/2): JSD = 1 - (3/4) log2(4/3) - ... computed by hand
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    m = torch.tensor([0.75, 0.25])
    jsd = 0.5 * math.log2(1 / 0.75) + 0.5 * (
        0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    )
    assert float(js_distance(a, b)) == pytest.approx(math.sqrt(jsd), rel=1e-12)
    assert m.sum() == 1
    with pytest.raises(ValueError, match="non-negative"):
        js_distance(torch.tensor([1.0, -1.0]), p[:2])
    with pytest.raises(ValueError, match="positive sum"):
        js_distance(torch.zeros(3), p)


@settings(deadline=None, max_examples=40)
@given(st.integers(0, 10_000))
def test_js_distance_is_a_bounded_symmetric_metric(seed):
    g = gen(seed)
    p, q, r = (torch.rand(3, 7, generator=g, dtype=torch.float64) ** 3).unbind(0)
    d_pq, d_qp = js_distance(p, q), js_distance(q, p)
    assert float(d_pq) == pytest.approx(float(d_qp), abs=1e-14)
    assert 0.0 <= float(d_pq) <= 1.0
    # sqrt(JSD) is a metric: triangle inequality
    assert float(js_distance(p, r)) <= float(d_pq + js_distance(q, r)) + 1e-12


def test_dense_blocks_scales_and_shapes():
    lam = torch.linspace(0.0, 1.0, 40, dtype=torch.float64)
    A = torch.block_diag(torch.diag(lam), torch.diag(9.0 * lam), torch.diag(lam.flip(0)))
    blocks = {"a": slice(0, 40), "b": slice(40, 80), "c": torch.arange(80, 120)}
    raw = block_spectra(A, blocks=blocks, generator=gen())
    assert [b.n for b in raw.blocks] == [40, 40, 40]
    for blk, top in zip(raw.blocks, (1.0, 9.0, 1.0)):
        assert blk.lambda_max == pytest.approx(top, rel=1e-2)
        assert abs(blk.trace - 40 * top / 2) <= 4 * blk.trace_stderr + 1e-6
    # a and c have the same spectrum; b is a 9x stretched copy
    assert float(raw.js[0, 2]) < 0.05
    assert float(raw.js[0, 1]) > 0.5
    assert torch.allclose(raw.js, raw.js.T) and bool((raw.js.diagonal() == 0).all())
    dx = float(raw.grid[1] - raw.grid[0])
    torch.testing.assert_close(
        raw.densities.sum(1) * dx, torch.ones(3, dtype=torch.float64), atol=2e-2, rtol=0
    )
    # normalised by the spectral radius, all three have the same shape
    norm = block_spectra(A, blocks=blocks, normalize="radius", generator=gen())
    assert norm.mean_js < 0.05 < raw.mean_js
    assert float(norm.grid.min()) >= -1.1 and float(norm.grid.max()) <= 1.1


def _tiny_lm():
    cfg = LMConfig(d_model=8, n_layers=1, n_heads=2, context=6)
    model = CausalTransformer(cfg, seed=0).double()
    X, y = lm_sequences(lm_corpus("train")[:300], 6)
    return model, (X[:6], y[:6])


def test_lm_blocks_against_dense_eigvalsh(tmp_path):
    model, data = _tiny_lm()
    op = hesse.HessianOperator(model, TokenCrossEntropy(), data)
    blocks = {
        "pos": "pos.weight",
        "v": ["blocks.0.attn.v.weight"],
        "mlp": ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"],  # a grouping of two matrices
    }
    res = block_spectra(op, blocks=blocks, trace_matvecs=40, generator=gen(1))
    assert res.names == ["pos", "v", "mlp"]
    assert res.blocks[2].params == ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight")
    H = hesse.HessianOperator(model, TokenCrossEntropy(), data).to_dense()
    sl = op.param_slices()
    for blk in res.blocks:
        idx = torch.cat([torch.arange(sl[p].start, sl[p].stop) for p in blk.params])
        ev = torch.linalg.eigvalsh(H[idx][:, idx])
        assert blk.n == idx.numel()
        assert blk.lambda_max == pytest.approx(float(ev[-1]), rel=1e-2)
        assert abs(blk.trace - float(ev.sum())) <= 4 * blk.trace_stderr + 1e-6 * abs(
            float(ev.sum())
        )
        assert blk.density.wasserstein_distance(ev) <= 0.05 * float(ev[-1] - ev[0])
    assert res.num_matvecs == sum(b.num_matvecs for b in res.blocks) > 0
    d = json.loads(json.dumps(res.to_dict()))
    assert d["blocks"][1]["name"] == "v" and len(d["js"]) == 3
    assert json.loads(res.save(tmp_path / "b.json").read_text())["densities"]
    res.plot(tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_model_entry_default_blocks_and_errors():
    model, data = _tiny_lm()
    res = block_spectra(model, TokenCrossEntropy(), data, num_steps=8, generator=gen())
    # default: every parameter with ndim >= 2 (embeddings and weight matrices)
    expected = [n for n, p in model.named_parameters() if p.ndim >= 2]
    assert res.names == expected
    assert hesse.block_spectra is block_spectra
    with pytest.raises(ValueError, match="normalize"):
        block_spectra(torch.eye(4), blocks={"a": slice(0, 2)}, normalize="max")
    with pytest.raises(TypeError, match="curvature operator"):
        block_spectra(torch.eye(4))
    with pytest.raises(TypeError, match="index tensor"):
        block_spectra(torch.eye(4), blocks=["tok.weight"])
    with pytest.raises(ValueError, match="at least 2"):
        block_spectra(torch.eye(4), blocks={"a": slice(0, 1)})
    with pytest.raises(ValueError, match="No parameter or module"):
        block_spectra(model, TokenCrossEntropy(), data, blocks=["nope"])
