"""Checkpoint files: loaded safely, tied to their operator, checked when the call starts."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from hesse.linalg import spectral_density, top_eigenpairs
from hesse.operators.base import DenseOperator
from tests.test_linalg_eigen import InterruptAt, gapped_spectrum, gen, with_spectrum

EIG = dict(k=2, tol=1e-10, max_basis=10)
SLQ = dict(num_probes=3, num_steps=20, deflate=0)


class _RunsCode:
    """Unpickling this (with a plain ``pickle.load``) creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _A(seed=1):
    return with_spectrum(gapped_spectrum(120, seed), seed)


def _interrupted_eigen(path, A):
    with pytest.raises(KeyboardInterrupt, match="checkpoint="):
        top_eigenpairs(InterruptAt(A, 12), generator=gen(3), checkpoint=path, **EIG)
    assert path.exists()


def test_own_checkpoint_holds_only_tensors_and_plain_values(tmp_path):
    path = tmp_path / "eig.pt"
    A = _A()
    _interrupted_eigen(path, A)
    payload = torch.load(path, weights_only=True)  # would raise on any other object
    assert payload["kind"] == "top_eigenpairs"
    assert payload["config"]["fingerprint"].shape == (120,)
    ref = top_eigenpairs(A, generator=gen(3), **EIG)
    res = top_eigenpairs(A, generator=gen(3), checkpoint=path, **EIG)
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=0, atol=0)
    assert not path.exists()


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    marker = tmp_path / "code_ran"
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "random": torch.randint(0, 256, (4096,), generator=gen(0), dtype=torch.uint8)
        .numpy()
        .tobytes(),
        "crafted_pickle": pickle.dumps({"format": 2, "x": _RunsCode(marker)}),
    }
    out = {}
    for name, blob in files.items():
        p = tmp_path / f"{name}.pt"
        p.write_bytes(blob)
        out[name] = p
    crafted = tmp_path / "crafted_torch.pt"
    torch.save({"format": 2, "kind": "top_eigenpairs", "x": _RunsCode(marker)}, crafted)
    out["crafted_torch"] = crafted
    return out, marker


@pytest.mark.parametrize("algo", ["eigen", "density"])
def test_corrupt_random_and_crafted_files_are_refused_without_running_code(tmp_path, algo):
    good = tmp_path / "good.pt"
    _interrupted_eigen(good, _A())
    files, marker = _bad_files(tmp_path, good)
    for name, path in files.items():
        before = path.read_bytes()
        with pytest.raises(ValueError) as info:
            if algo == "eigen":
                top_eigenpairs(_A(), generator=gen(3), checkpoint=path, **EIG)
            else:
                spectral_density(_A(), generator=gen(3), checkpoint=path, **SLQ)
        msg = str(info.value)
        assert str(path) in msg and "Delete the file" in msg and "another checkpoint=" in msg, name
        assert "weights_only" not in msg  # no advice to load it unsafely
        assert path.read_bytes() == before  # left alone for the user to inspect
    assert not marker.exists()
    # the crafted file does run code when loaded unsafely: the test would notice a regression
    with open(files["crafted_pickle"], "rb") as fh:
        pickle.load(fh)["x"].close()
    assert marker.exists()


def test_checkpoint_of_another_operator_of_the_same_size_is_refused(tmp_path):
    path = tmp_path / "eig.pt"
    _interrupted_eigen(path, _A(1))
    with pytest.raises(ValueError, match="another operator") as info:
        top_eigenpairs(_A(2), generator=gen(3), checkpoint=path, **EIG)
    assert str(path) in str(info.value) and "delete the file" in str(info.value)
    assert path.exists()
    # rounding-level differences (another thread count, device) still resume
    A = _A(1)
    res = top_eigenpairs(A * (1 + 1e-13), generator=gen(3), checkpoint=path, **EIG)
    ref = top_eigenpairs(A, generator=gen(3), **EIG)
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-9, atol=0)


def test_density_checkpoint_of_another_operator_is_refused(tmp_path):
    path = tmp_path / "slq.pt"
    with pytest.raises(KeyboardInterrupt):
        spectral_density(
            InterruptAt(_A(1), 30), generator=gen(3), checkpoint=path, checkpoint_every=6, **SLQ
        )
    assert path.exists()
    with pytest.raises(ValueError, match="another operator"):
        spectral_density(_A(2), generator=gen(3), checkpoint=path, **SLQ)
    with pytest.raises(ValueError, match="was written by 'spectral_density'"):
        top_eigenpairs(_A(1), generator=gen(3), checkpoint=path, **EIG)


@pytest.mark.parametrize("algo", ["eigen", "density"])
def test_bad_paths_fail_before_any_product(tmp_path, algo):
    op = DenseOperator(_A(), symmetric=True)
    bad = {
        "is a folder": tmp_path,
        "does not exist": tmp_path / "missing" / "run.pt",
    }
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        bad["cannot write"] = ro / "run.pt"
    for what, path in bad.items():
        with pytest.raises(ValueError, match=what) as info:
            if algo == "eigen":
                top_eigenpairs(op, generator=gen(3), checkpoint=path, **EIG)
            else:
                spectral_density(op, generator=gen(3), checkpoint=path, **SLQ)
        assert str(path) in str(info.value)
        assert op.num_matvecs == 0
    with pytest.raises(TypeError, match="file path"):
        top_eigenpairs(op, checkpoint=3, **EIG)
