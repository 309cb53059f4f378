"""Hugging Face models end to end: exact products vs dense float64, and the spectral tools.

For the five tiny configs of ``tests/hf_cases.py`` (GPT-2, Llama, BERT sequence
classification, ViT, ResNet; random init, no downloads, float64) with ``loss_fn=None`` (the
loss each model trains with) on two dict batches of unequal size (LMs padded with -100):

* relative Frobenius error of hesse's dense Hessian, GGN and exact Fisher against
  independent references: the Hessian by double backward of the written-out loss on the
  concatenated data, the GGN as the Hessian of the linearised model's loss, the exact Fisher
  by its definition ``sum_rows sum_c p_c g_c g_c^T / count`` (per-class log-likelihood
  gradients by autograd), the empirical Fisher as ``sum_rows g_y g_y^T / count`` (per token
  for the language models);
* ``top_eigenpairs`` (k=3; max relative error of the 3 eigenvalues vs ``eigvalsh`` of the
  dense reference), ``trace`` (XTrace, 60 products) and ``spectral_density`` (SLQ, 4 probes x
  40 steps; its trace) on the Hessian operator, each estimate with its standard error, next
  to the exact trace.

Llama's errors (~1e-8) come from HF itself: ``LlamaRMSNorm`` computes in float32 even in a
float64 model, so every path (hesse's and the references) carries float32 rounding there.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/hf_models.py [--models gpt2 llama bert vit resnet]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.hf_cases import HF_CASES, Reference  # noqa: E402

import hesse  # noqa: E402
from hesse.objective import math_attention  # noqa: E402


def fishers_by_definition(ref: Reference, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``sum_m sum_c p_mc g_mc g_mc^T / count`` with ``g_mc = grad log p_c(row m)``,
    and empirical ``sum_m g_m y_m g_m y_m^T / count`` (per token), over the valid rows."""
    labels = ref.labels[:, 1:] if causal else ref.labels
    valid = labels.reshape(-1) != -100
    targets = labels.reshape(-1)[valid]

    def logp_rows(theta):
        logits = ref.logits(theta)
        if causal:
            logits = logits[:, :-1]
        return torch.log_softmax(logits.reshape(-1, logits.shape[-1])[valid], dim=-1)

    with math_attention():
        lp = logp_rows(ref.theta0).detach()
        Jl = torch.autograd.functional.jacobian(logp_rows, ref.theta0)  # (M, C, n)
    M = lp.shape[0]
    exact = torch.einsum("mc,mci,mcj->ij", lp.exp(), Jl, Jl) / M
    g = Jl[torch.arange(M), targets]  # (M, n)
    return exact, g.T @ g / M


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(HF_CASES), choices=list(HF_CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The model returns")
    print(
        f"{'model':8s} {'n':>5s} {'err H':>9s} {'err GGN':>9s} {'err F_ex':>9s} {'err F_emp':>9s} "
        f"{'lam_max':>10s} {'err lam3':>9s} {'trace':>10s} {'xtrace':>16s} {'SLQ trace':>16s} "
        f"{'cpu s':>6s}"
    )
    for name in args.models:
        t0 = time.thread_time()
        try:
            model, batches, ref_loss = HF_CASES[name]()
        except ImportError as e:
            print(f"{name:8s} skipped: transformers cannot import it here ({e})")
            continue
        ref = Reference(model, batches, ref_loss)
        n = ref.theta0.numel()
        eye = torch.eye(n, dtype=torch.float64)
        Hd, Gd = ref.hessian_mm(eye), ref.ggn_mm(eye)
        Fd, Ed = fishers_by_definition(ref, causal=name in ("gpt2", "llama"))
        H = hesse.curvature_operator("hessian", model, None, batches)
        G = hesse.curvature_operator("ggn", model, None, batches)
        F = hesse.curvature_operator("fisher_exact", model, None, batches)
        E = hesse.curvature_operator("fisher_empirical", model, None, batches)
        errs = [rel(H.to_dense(), Hd), rel(G.to_dense(), Gd), rel(F.to_dense(), Fd)]
        errs.append(rel(E.to_dense(), Ed))
        gen = torch.Generator().manual_seed(0)
        eig = hesse.top_eigenpairs(H, k=3, tol=1e-8, generator=gen)
        dense_top = torch.linalg.eigvalsh(Hd).flip(0)[:3]
        err_eig = float((eig.eigenvalues - dense_top).abs().max() / dense_top.abs().max())
        tr = hesse.trace(H, num_matvecs=60, generator=torch.Generator().manual_seed(1))
        true_tr = float(torch.trace(Hd))
        dens = hesse.spectral_density(
            H, num_probes=4, num_steps=40, generator=torch.Generator().manual_seed(2)
        )
        assert model.training is False
        print(
            f"{name:8s} {n:5d} {errs[0]:9.1e} {errs[1]:9.1e} {errs[2]:9.1e} {errs[3]:9.1e} "
            f"{float(eig.eigenvalues[0]):10.4f} {err_eig:9.1e} {true_tr:10.4f} "
            f"{float(tr):9.3f}+-{float(tr.stderr):5.3f} "
            f"{float(dens.trace):9.3f}+-{float(dens.trace_stderr):5.3f} "
            f"{time.thread_time() - t0:6.1f}"
        )


if __name__ == "__main__":
    main()
