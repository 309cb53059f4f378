"""The shipped workload: digits data and trained weights match what they claim to be."""

from __future__ import annotations

import pytest
import torch

from hesse.data import WORKLOADS, default_workload, load_digits_tensors, workload


def test_shipped_digits_equal_scikit_learn():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    (Xtr, ytr), (Xte, yte) = load_digits_tensors(torch.float64)
    assert len(ytr) + len(yte) == 1797 and Xtr.shape[1] == 64
    X = torch.tensor(d.data, dtype=torch.float64)
    y = torch.tensor(d.target)
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    tr = perm[round(0.2 * 1797) :]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    torch.testing.assert_close(Xtr, ((X - mu) / sd)[tr], rtol=0, atol=0)
    assert torch.equal(ytr, y[tr])


@pytest.mark.slow
def test_shipped_weights_are_the_trained_ones():
    shipped = default_workload()
    trained = default_workload(pretrained=False)
    for (k, a), (_, b) in zip(
        shipped.model.state_dict().items(), trained.model.state_dict().items()
    ):
        # full-batch Adam is deterministic; another CPU may round differently
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)
    assert shipped.accuracy() == pytest.approx(trained.accuracy(), abs=2e-3)
    assert shipped.accuracy() > 0.9


def test_registry_and_bad_names():
    assert "digits" in WORKLOADS
    w = workload("digits")
    assert sum(p.numel() for p in w.model.parameters()) == 2410
    with pytest.raises(ValueError, match="Unknown workload 'nope'"):
        workload("nope")
    with pytest.raises(ValueError, match="No shipped weights"):
        default_workload(steps=5, pretrained=True)
