"""Kronecker-factored curvature (K-FAC): the factor machinery and :class:`KFACOperator`.

For a layer ``s = W a`` (``Linear``: ``a`` is the input with a 1 appended for the bias, one
row per leading index, e.g. every sequence position; ``ConvNd``: an unfolded input patch, one
per output location; ``Embedding``: the one-hot index; HF ``Conv1D``: as ``Linear`` with
``W`` stored transposed), the curvature block of its parameters is approximated by

.. math::
    B \\approx A \\otimes G, \\qquad
    A = \\frac{1}{M} \\sum_{n, t} a_{n,t} a_{n,t}^\\top, \\qquad
    G = \\sum_{n, t} c_n\\, \\mathbb{E}_{r_n}\\big[g_{n,t} g_{n,t}^\\top\\big],
    \\quad g_{n,t} = J_{s_{n,t}}^\\top r_n,

where ``M`` counts all samples and positions ``(n, t)`` (the *expand* convention of
Eschenhagen et al. 2023 for layers applied over a sequence/spatial dimension, with the
normalisation of curvlinops' ``KFACLinearOperator(kfac_approx="expand")``), ``c_n`` is the
weight of sample ``n``'s unreduced loss in the objective (``1/N`` for a mean cross-entropy,
``1/(N d)`` for a mean MSE over ``d`` outputs, ``1`` for ``reduction="sum"``), and ``r_n``
is a vector with ``E[r r^T] = `` the output Hessian of the loss (``fisher="exact"``: the
columns of its symmetric square root, backpropagated one by one; ``"mc"``: ``d loss / d f``
at targets sampled from the model's predictive distribution, the *true* Fisher;
``"empirical"``: at the observed targets). In :mod:`hesse` order (row-major ``weight`` then
``bias``) the ``Linear``/``Conv2d`` block is ``kron(G, A)`` permuted, the ``Embedding``
block ``kron(A, G)``.

Losses come from :class:`hesse.func.OutputLoss` (sequence cross-entropy over ``(B, T, V)``,
``ignore_index``, causal shift): ``c_n`` is the objective's weight of the sum loss, so a mean
is over the valid targets of the whole data set however it is batched. Ignored targets add
nothing to ``G``; ``A`` averages over every position a layer processes, ignored ones
included (through attention they still shape the valid outputs). A layer output shared by
the samples of a batch (a position embedding broadcast over it) gets its exact/empirical
columns backpropagated one sample at a time, so the factors do not depend on the batching.

The layer registry (:func:`find_kfac_layers`) finds weights by identity: a tensor used by
several modules (tied input/output embeddings) is one :class:`KFACLayer` whose block is the
sum of the terms of all its uses (see there). Parameters K-FAC cannot factor (normalisation
layers, ...) are trained first-order by default, with one warning naming them.

Exactness: K-FAC is exact for one sample and one position per layer (the per-sample
Jacobian of a linear layer is exactly Kronecker, ``J = a^T \\otimes J_s``), and for deep
linear networks with MSE (then ``g g^T`` does not depend on the sample or position), for any
number of samples and positions.

For a batch, K-FAC replaces the mean of Kronecker
products ``(1/N) \\sum_n (a_n a_n^T) \\otimes (g_n g_n^T)`` by the Kronecker product of means;
the error is ``Cov_n(a a^T, g g^T)``-sized (zero when inputs and output gradients are
uncorrelated across samples). Measured on the digits MLP 64-32-10 (tanh, cross-entropy,
float64; ``python benchmarks/optimizers_kfac.py --factor-error``), relative Frobenius error
of each layer's block against ``GGNOperator(...).block(layer)``: one sample ``~1e-14``; all
1438 training samples at initialisation 0.32 (layer 0) and 0.13 (layer 2); after 300 Adam
steps (confident predictions, so ``g`` and ``a`` correlate) 0.87 and 0.75. Convolutions also
assume spatially uncorrelated derivatives (Grosse & Martens 2016, "KFC"); blocks between
layers are zero.

References:
    Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
    curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
    for convolution layers", ICML 2016. Eschenhagen et al., "Kronecker-factored approximate
    curvature for modern neural network architectures", NeurIPS 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int, check_nonnegative, warn_once
from ..func import LossAt
from .base import LinearOperator
from .curvature import CurvatureOperator

__all__ = [
    "KFACOperator",
    "KFACLayer",
    "KFACUse",
    "conv_patches",
    "find_kfac_layers",
    "kfac_layers",
    "weight_gradient_factors",
    "FISHER_KINDS",
]

FISHER_KINDS = ("exact", "mc", "empirical")
UNSUPPORTED_POLICIES = ("first_order", "raise", "skip")
SUPPORTED_LAYERS = (
    "nn.Linear (inputs with any leading dims), nn.Conv1d/2d/3d (groups=1, zero padding), "
    "nn.Embedding (dense), Hugging Face transformers Conv1D"
)


def _is_hf_conv1d(m: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape
    ``(in, out)``; recognised without importing ``transformers``."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
        m, nn.modules.conv._ConvTransposeNd
    ):
        return "conv"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if _is_hf_conv1d(m):
        return "conv1d_hf"
    return None


def _unsupported_reason(m: nn.Module) -> str | None:
    kind = _kind(m)
    if kind == "conv":
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r}"
    if kind == "embedding":
        if m.sparse:
            return "sparse=True"
        if m.max_norm is not None:
            return "max_norm (renormalises the weight in place)"
    if kind is None:
        return "no Kronecker factorisation known for this layer type"
    return None


def _weight_of(m: nn.Module) -> Tensor:
    """The trainable weight (``weight_orig`` on a layer pruned by ``torch.nn.utils.prune``)."""
    return m.weight_orig if hasattr(m, "weight_orig") else m.weight


def conv_patches(
    x: Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> Tensor:
    """Input patches of an N-d convolution as rows ``(B * T, C * prod(kernel_size))``.

    For 2-d the same rows (and column order ``c, i, j``) as ``F.unfold(...).transpose(1, 2)``,
    built from strided views (``Tensor.unfold``): ``F.unfold`` is multi-threaded and can be
    hundreds of times slower on a loaded machine. ``x`` is ``(B, C, *spatial)``.
    """
    nd = len(kernel_size)
    if any(padding):
        pads: list[int] = []
        for p in reversed(padding):
            pads += [p, p]
        x = F.pad(x, pads)
    p = x
    for i in range(nd):
        p = p.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i])
    p = p[(..., *[slice(None, None, d) for d in dilation])]  # (B, C, *out, *kernel)
    B, C = p.shape[:2]
    perm = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return p.permute(perm).reshape(-1, C * math.prod(kernel_size))


class KFACUse:
    """One module applying a K-FAC weight: its input/output statistics and their orientation.

    Every weight is seen as the matrix ``W.reshape(W.shape[0], -1)`` (``rows x cols``; for a
    single-use layer the bias is appended as a last column, or as a last row for HF
    ``Conv1D``), whose curvature term from this use is ``L (x) R`` (``M -> L M R``):

    ==============  ================================  ==============
    use             ``L`` (rows)                      ``R`` (cols)
    ==============  ================================  ==============
    Linear, ConvNd  ``G`` (output gradients)          ``A`` (inputs)
    Embedding       ``diag(A)`` (index counts)        ``G``
    HF ``Conv1D``   ``A``                             ``G``
    ==============  ================================  ==============
    """

    def __init__(self, name: str, module: nn.Module, with_bias: bool):
        self.name = name
        self.module = module
        self.kind = _kind(module)
        self.with_bias = with_bias
        w = _weight_of(module)
        if self.kind == "embedding":
            self.a_dim, self.g_dim = w.shape[0], w.shape[1]
        elif self.kind == "conv1d_hf":
            self.a_dim, self.g_dim = w.shape[0] + with_bias, w.shape[1]
        else:
            self.g_dim = w.shape[0]
            self.a_dim = w[0].numel() + with_bias

    @property
    def diagonal_a(self) -> bool:
        return self.kind == "embedding"

    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a_{n,t}`` of one input: ``(M, a_dim)`` (``(M,)`` indices for Embedding).

        Every leading dimension (batch, sequence, ...) and every output location of a
        convolution is one row (the K-FAC *expand* convention).
        """
        x = x.detach()
        if self.kind == "embedding":
            return x.reshape(-1)
        if self.kind == "conv":
            m = self.module
            nd = len(m.kernel_size)
            if x.ndim == nd + 1:  # unbatched input
                x = x.unsqueeze(0)
            rows = conv_patches(x, m.kernel_size, m.dilation, m.padding, m.stride)
        else:
            rows = x.reshape(-1, x.shape[-1])
        if self.with_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def a_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """``(sum_{n,t} a a^T, M)`` (a count vector for Embedding)."""
        rows = self.input_rows(x)
        if self.kind == "embedding":
            w = _weight_of(self.module)
            counts = torch.bincount(rows, minlength=self.a_dim).to(w.dtype)
            return counts, rows.shape[0]
        return rows.T @ rows, rows.shape[0]

    def output_rows(self, g: Tensor) -> Tensor:
        """Output gradients ``g_{n,t}`` as rows ``(M, g_dim)``; ``g`` may carry leading dims."""
        if self.kind == "conv":
            nd = len(self.module.kernel_size)
            g = g.flatten(-nd).transpose(-1, -2)  # (..., C, *out) -> (..., T, C)
        return g.reshape(-1, self.g_dim)

    def g_sum(self, g: Tensor) -> Tensor:
        rows = self.output_rows(g)
        return rows.T @ rows

    def sample_grads(self, x: Tensor, g: Tensor, B: int) -> Tensor:
        """Per-sample weight gradients ``(k, B, *weight.shape)`` from one input ``x`` (``B``
        samples) and ``k`` output gradients ``g (k, *output.shape)``: ``sum_t g_t a_t^T``
        (``a_t g_t^T`` for HF ``Conv1D``; rows of the one-hot index for Embedding). Needs a
        use built with ``with_bias=False``."""
        k = g.shape[0]
        gr = self.output_rows(g).reshape(k, B, -1, self.g_dim)
        w = _weight_of(self.module)
        if self.kind == "embedding":
            idx = x.reshape(B, -1)
            out = gr.new_zeros(k, B, self.a_dim, self.g_dim)
            index = idx[None, :, :, None].expand(k, B, idx.shape[1], self.g_dim)
            return out.scatter_add_(2, index, gr)
        a = self.input_rows(x).reshape(B, -1, self.a_dim)
        if self.kind == "conv1d_hf":
            return torch.einsum("kbto,bti->kbio", gr, a)
        return torch.einsum("kbto,bti->kboi", gr, a).reshape(k, B, *w.shape)

    def term(self, A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
        """``(L, R)`` of this use in the weight's matrix view (see the class docstring)."""
        if self.kind in ("linear", "conv"):
            return G, A
        return A, G


class KFACLayer:
    """One weight tensor (with the bias of a single-use layer) and every module that uses it.

    A weight used by several modules (tied input/output embeddings, a layer applied twice
    through two modules) is one layer with several :class:`KFACUse`; its K-FAC block is the
    sum ``sum_u L_u (x) R_u`` of the terms of all uses (the exact per-use blocks where K-FAC
    is exact; only the cross terms between uses are dropped).

    Attributes:
        name: module name of the first use.
        uses: the modules using the weight.
        weight_name, bias_name: parameter names (as in ``model.named_parameters()``).
        rows, cols: shape of the matrix view (bias included).
    """

    def __init__(self, weight_name: str, uses: Sequence[KFACUse], bias_name: str | None):
        self.uses = list(uses)
        first = self.uses[0]
        self.name = first.name
        self.module = first.module
        self.kind = first.kind
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.weight = _weight_of(first.module)
        self.bias = first.module.bias if bias_name is not None else None
        w = self.weight
        self.rows, self.cols = w.shape[0], w[0].numel()
        if self.bias is not None:
            if first.kind == "conv1d_hf":
                self.rows += 1
            else:
                self.cols += 1

    @property
    def tied(self) -> bool:
        return len(self.uses) > 1

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # -- parameter <-> matrix -----------------------------------------------------------
    def to_matrix(self, parts: Sequence[Tensor]) -> Tensor:
        """Parameter-shaped tensors ``(k, *shape)`` (weight[, bias]) -> ``(k, rows, cols)``."""
        w = parts[0]
        k = w.shape[0]
        mat = w.reshape(k, self.weight.shape[0], -1)
        if self.bias is not None:
            b = (
                parts[1].reshape(k, 1, -1)
                if self.kind == "conv1d_hf"
                else parts[1].reshape(k, -1, 1)
            )
            mat = torch.cat([mat, b], dim=1 if self.kind == "conv1d_hf" else 2)
        return mat

    def from_matrix(self, mat: Tensor) -> list[Tensor]:
        k = mat.shape[0]
        shape = self.weight.shape
        if self.bias is None:
            return [mat.reshape(k, *shape)]
        if self.kind == "conv1d_hf":
            return [mat[:, :-1].reshape(k, *shape), mat[:, -1].reshape(k, -1)]
        return [mat[..., :-1].reshape(k, *shape), mat[..., -1].reshape(k, -1)]


def kron_apply(L: Tensor, R: Tensor, mat: Tensor) -> Tensor:
    """``L M R`` for a batch ``M (k, rows, cols)``; a 1-d factor is a diagonal."""
    out = L.unsqueeze(-1) * mat if L.ndim == 1 else L @ mat
    return out * R if R.ndim == 1 else out @ R


def nearest_kronecker(terms: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(L, R)`` minimising ``||sum_u L_u (x) R_u - L (x) R||_F`` (Van Loan & Pitsianis 1993).

    The minimiser is ``L = sum_u alpha_u L_u``, ``R = sum_u beta_u R_u`` with the leading
    singular pair of the rearranged ``sum_u vec(L_u) vec(R_u)^T``, found from the small Gram
    matrices of the terms; PSD terms give PSD factors (nonnegative ``alpha``, ``beta``). One
    term is returned as it is.
    """
    if len(terms) == 1:
        return terms[0]

    def full(t: Tensor) -> Tensor:
        return torch.diag(t) if t.ndim == 1 else t

    Ls = [full(t[0]).double() for t in terms]
    Rs = [full(t[1]).double() for t in terms]
    Gl = torch.stack([torch.stack([(a * b).sum() for b in Ls]) for a in Ls])
    Gr = torch.stack([torch.stack([(a * b).sum() for b in Rs]) for a in Rs])
    alpha = torch.ones(len(terms), dtype=torch.float64, device=Gl.device)
    for _ in range(100):  # power iteration on the nonnegative U x U matrix Gr Gl
        nxt = Gr @ (Gl @ alpha)
        nxt = nxt / nxt.norm().clamp_min(1e-300)
        if torch.allclose(nxt, alpha, rtol=1e-14, atol=0):
            break
        alpha = nxt
    dt = terms[0][0].dtype
    scale = (alpha @ Gl @ alpha).clamp_min(1e-300)
    L = sum(a * m for a, m in zip(alpha / scale, Ls))
    R = sum(b * m for b, m in zip(Gl @ alpha, Rs))
    return L.to(dt), R.to(dt)


def kfac_layers(
    model: nn.Module, selected: Sequence[str] | None = None
) -> tuple[list[KFACLayer], list[str], dict[str, str]]:
    """:func:`find_kfac_layers` without a policy or warning: ``(layers, unfactored, reasons)``
    (``reasons``: parameter name -> why it is not factored)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = list(names.values())
    if selected is None:
        chosen = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        chosen = set(selected)
    uses: dict[int, list[tuple[str, nn.Module]]] = {}
    why: dict[str, str] = {}  # unfactored parameter -> reason
    for mname, m in model.named_modules():
        own = [p for _, p in m.named_parameters(recurse=False)]
        if not own:
            continue
        reason = _unsupported_reason(m)
        label = f"{mname or '<root>'!r} ({type(m).__name__}"
        if reason is not None:
            for p in own:
                why.setdefault(names[id(p)], f"{label}: {reason})")
            continue
        uses.setdefault(id(_weight_of(m)), []).append((mname, m))
    layers: list[KFACLayer] = []
    covered: set[str] = set()
    for wid, us in uses.items():
        wname = names[wid]
        biases = [names[id(m.bias)] for _, m in us if getattr(m, "bias", None) is not None]
        if wname in why:  # also used by a module K-FAC cannot factor
            for b in biases:
                why.setdefault(b, why[wname])
            continue
        if wname not in chosen:
            for b in biases:
                why.setdefault(b, f"{us[0][0]!r}: bias of a weight that is not selected")
            continue
        bias_name = None
        if len(us) == 1 and biases and biases[0] in chosen:
            bias_name = biases[0]
        elif len(us) > 1:
            for b in biases:
                why.setdefault(b, f"{us[0][0]!r}: bias of a tied weight")
        ku = [KFACUse(n, m, with_bias=bias_name is not None) for n, m in us]
        layers.append(KFACLayer(wname, ku, bias_name))
        covered.update(layers[-1].param_names)
    rank = {n: i for i, n in enumerate(order)}
    layers.sort(key=lambda layer: rank[layer.weight_name])
    unfactored = [n for n in order if n in chosen and n not in covered]
    return layers, unfactored, why


def find_kfac_layers(
    model: nn.Module, selected: Sequence[str] | None = None, unsupported: str = "first_order"
) -> tuple[list[KFACLayer], list[str]]:
    """The K-FAC layers of ``model`` and the parameters K-FAC does not factor.

    Weights are found by identity, so a tensor used by several modules (tied embeddings)
    is one layer with all its uses. Supported: see ``SUPPORTED_LAYERS``. Everything
    else with parameters (BatchNorm, LayerNorm, RMSNorm, biases of tied weights, bare
    parameters, ...) is *unfactored* and follows ``unsupported``:

    * ``"first_order"`` (default; ``"skip"`` is the same): one warning names them; the
      K-FAC preconditioner/optimizer trains them with their plain gradient, and
      :class:`KFACOperator` gives them a zero block (its ``inverse`` then ``1 / damping``);
    * ``"raise"``: ``NotImplementedError`` naming the first such layer.

    Args:
        model: the network.
        selected: parameter names to cover (default: all that require grad).
        unsupported: the policy above.

    Returns:
        ``(layers, unfactored_param_names)``, both in ``model.named_parameters()`` order.
    """
    policy = check_choice(unsupported, "unsupported", UNSUPPORTED_POLICIES)
    layers, unfactored, why = kfac_layers(model, selected)
    if unfactored and policy == "raise":
        n = unfactored[0]
        raise NotImplementedError(
            f"K-FAC cannot factor parameter {n!r} of layer {why.get(n, 'unknown')}. Supported: "
            f"{SUPPORTED_LAYERS}. Pass unsupported='first_order' (the default) to train such "
            "parameters with their plain gradient, or leave them out of params / freeze them."
        )
    if unfactored:
        shown = ", ".join(unfactored[:8]) + (
            f" (+{len(unfactored) - 8} more)" if len(unfactored) > 8 else ""
        )
        warn_once(
            f"K-FAC factors {len(layers)} layer(s); {len(unfactored)} parameter(s) it cannot "
            f"factor are trained first-order (plain gradient; zero block in KFACOperator): "
            f"{shown}. Pass unsupported='raise' to make this an error."
        )
    return layers, unfactored


class _Recorder:
    """Forward hooks recording each use's inputs and (graph-attached) outputs."""

    def __init__(self, uses: Sequence[KFACUse]):
        self.uses = list(uses)
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for i, use in enumerate(self.uses):
            self._handles.append(use.module.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.inputs.setdefault(i, []).append(args[0].detach())
            self.outputs.setdefault(i, []).append(output)

        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def all_uses(layers: Sequence[KFACLayer]) -> list[KFACUse]:
    """The uses of all layers, flat, in layer order."""
    return [u for layer in layers for u in layer.uses]


def output_residuals(
    at: LossAt, fisher: str, num_samples: int, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """Vectors ``R (k, *outputs.shape)`` and a weight with ``weight * sum_k r r^T`` the
    output-space curvature of the sum loss: ``"exact"`` the loss-Hessian square-root columns,
    ``"mc"`` gradients at sampled targets (``weight = 1 / num_samples``), ``"empirical"`` the
    gradient at the observed targets. Ignored targets give zero rows.

    For outputs with a sequence/position dimension the exact columns are backpropagated for
    all positions at once (as curvlinops does): exact when positions do not mix (the
    *expand* setting); through attention, cross-position terms of ``g g^T`` remain. The
    Monte-Carlo estimate has independent samples per position and stays unbiased.
    """
    if fisher == "exact":
        return at.hessian_sqrt(), 1.0
    if fisher == "mc":
        return at.sampled_grads(num_samples, generator), 1.0 / num_samples
    return at.grad().unsqueeze(0), 1.0


def output_gradient_factors(
    uses: Sequence[KFACUse],
    use_outputs: dict[int, list[Tensor]],
    f: Tensor,
    R: Tensor,
    weight: float = 1.0,
    deterministic: bool = True,
) -> dict[int, Tensor]:
    """``weight * sum_{n,t} sum_k g g^T`` per use, ``g = J_s^T r_k`` for the rows ``r_k`` of
    ``R`` (from :func:`output_residuals`), for one batch (without the batch weight).

    Backpropagates from the model output ``f`` to every recorded use output
    (``retain_graph=True``; parameter gradients are not touched). With ``deterministic``
    (exact and empirical columns) a use output without the batch dimension is handled
    per sample (``B`` times the columns); Monte-Carlo columns are independent across samples,
    so their cross terms vanish in expectation and pass ``deterministic=False``.
    """
    idx = [i for i in range(len(uses)) if use_outputs.get(i)]
    outs = [o for i in idx for o in use_outputs[i]]
    B = f.shape[0]
    if deterministic and B > 1 and any(o.ndim == 0 or o.shape[0] != B for o in outs):
        # an output shared by the samples (e.g. GPT-2's position embedding, broadcast over
        # the batch): backpropagate every column for one sample at a time, or g g^T would
        # hold cross-sample terms that depend on the batching
        eye = torch.eye(B, dtype=R.dtype, device=R.device).reshape(1, B, B, *[1] * (R.ndim - 2))
        R = (R.unsqueeze(1) * eye).flatten(0, 1)
    grads = _batched_grad(f, outs, R)
    result: dict[int, Tensor] = {}
    j = 0
    for i in idx:
        acc = None
        for _ in use_outputs[i]:
            g = grads[j]
            j += 1
            if g is None:
                continue
            s = uses[i].g_sum(g)
            acc = s if acc is None else acc + s
        if acc is not None:
            result[i] = acc * weight
    return result


def weight_gradient_factors(
    objective: Any, layers: Sequence[KFACLayer], curvature: str = "ggn"
) -> Iterator[dict[str, Tensor]]:
    """Square-root factors of the exact curvature block of each layer's *weight*, per batch.

    Yields ``{weight name: U (r, n)}`` (one dict per batch of ``objective.batches()``; use
    its ``micro_batch_size`` to bound memory) such that ``sum over batches of U^T U`` is

    * ``curvature="ggn"``: the exact GGN block (== exact Fisher for these losses),
      ``sum_rows w J^T S S^T J`` with ``S`` the loss-Hessian square-root columns of each
      loss row (:meth:`hesse.func.LossAt.hessian_sqrt`);
    * ``"fisher"``: the empirical Fisher, per loss row (per token for sequence
      cross-entropy), ``sum_rows w J^T r r^T J`` with ``r`` the gradient of that row's loss,

    ``w`` the objective's weight of the batch's sum loss. A tied weight gets the sum of the
    per-sample gradients of all its uses (exact, cross terms included). The rows are
    per-sample gradients built from the recorded layer inputs (strided patches for
    convolutions) and backpropagated output columns, one column per (row position, square
    root column): ``r = B * positions * C`` rows per batch.
    """
    loss = objective.output_loss
    if loss is None:
        raise NotImplementedError(
            "Per-sample curvature factors need a likelihood loss (nn.MSELoss, "
            "nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)."
        )
    uses = [KFACUse(u.name, u.module, with_bias=False) for layer in layers for u in layer.uses]
    owner = [layer.weight_name for layer in layers for _ in layer.uses]
    for X, y, w in objective.batches():
        with torch.enable_grad(), objective.mode(), _Recorder(uses) as rec:
            f = objective.forward(X)
            at = loss.at(f, y)
            R = at.hessian_sqrt() if curvature == "ggn" else at.grad().unsqueeze(0)
            B = f.shape[0]
            rows = loss.rows(R, lead=1)  # (k, M, C), sample-major
            per = rows.shape[1] // B
            if per > 1:  # one column per position: rows of different positions never mix
                eye = torch.eye(per, dtype=R.dtype, device=R.device).repeat(1, B)  # (per, M)
                rows = (rows.unsqueeze(1) * eye[None, :, :, None]).flatten(0, 1)
                R = loss.unrows(rows, f.shape, lead=1)
            idx = [i for i in range(len(uses)) if rec.outputs.get(i)]
            grads = _batched_grad(f, [o for i in idx for o in rec.outputs[i]], R)
        U: dict[str, Tensor] = {}
        j = 0
        for i in idx:
            for x in rec.inputs[i]:
                g = grads[j]
                j += 1
                if g is None:
                    continue
                sg = uses[i].sample_grads(x, g, B)
                U[owner[i]] = U[owner[i]] + sg if owner[i] in U else sg
        scale = torch.as_tensor(w, dtype=f.dtype, device=f.device).sqrt()
        yield {n: (u * scale).reshape(-1, u[0, 0].numel()) for n, u in U.items()}


def _batched_grad(f: Tensor, outs: list[Tensor], R: Tensor) -> list[Tensor | None]:
    """``J_s^T r`` for every row of ``R`` ``(k, *f.shape)``; results ``(k, *s.shape)``."""
    if R.shape[0] == 1:
        res = torch.autograd.grad(f, outs, R[0], retain_graph=True, allow_unused=True)
        return [None if r is None else r.unsqueeze(0) for r in res]
    try:
        return list(
            torch.autograd.grad(
                f, outs, R, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    except RuntimeError:  # an op without a batching rule: loop over the columns
        cols = [torch.autograd.grad(f, outs, r, retain_graph=True, allow_unused=True) for r in R]
        return [
            None if cols[0][i] is None else torch.stack([c[i] for c in cols])
            for i in range(len(outs))
        ]


class KFACOperator(CurvatureOperator):
    """The K-FAC approximation of the GGN/Fisher as a :class:`hesse.LinearOperator`.

    Block diagonal over layers, each block ``A (x) G`` (see the module docstring for the exact
    definition and normalisation; a tied weight's block is the sum of the terms of its uses),
    in ``model.named_parameters()`` order (restricted to
    ``params``), so it compares with :class:`hesse.GGNOperator` entry by entry::

        err = (KFACOperator(model, loss_fn, data).to_dense()
               - GGNOperator(model, loss_fn, data).to_dense())

    Cost: building the factors takes one forward pass and ``C`` (``"exact"``, ``C`` = output
    size per sample), ``num_samples`` (``"mc"``) or one (``"empirical"``) backward passes per
    batch; a product costs two small matrix products per layer and no model evaluation.
    Memory: ``sum_l (a_l^2 + g_l^2)``.

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`; the loss must be
            ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``. Layers:
            ``nn.Linear`` (any leading dims), ``nn.Conv1d/2d/3d``, ``nn.Embedding``, HF
            ``Conv1D``, tied weights (see :func:`find_kfac_layers`).
        params: parameter subset (whole layers).
        fisher: ``"exact"`` (default; type-2 Fisher == GGN for these losses), ``"mc"`` (true
            Fisher, ``num_samples`` sampled targets per input) or ``"empirical"``.
        num_samples: targets per input for ``fisher="mc"``.
        generator: randomness for ``fisher="mc"``.
        unsupported: parameters K-FAC cannot factor (normalisation layers, ...):
            ``"first_order"`` (default, alias ``"skip"``: a zero block, one warning naming
            them) or ``"raise"``.
        **objective_kwargs: ``weight_decay`` (added as ``+ weight_decay * I``), ``train_mode``,
            ``reduction``, ... as in :class:`hesse.Objective`.

    Example:
        >>> import hesse
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
        >>> K = KFACOperator(model, nn.MSELoss(), (X, y)).block("0").to_dense()
        >>> G = hesse.GGNOperator(model, nn.MSELoss(), (X, y)).block("0").to_dense()
        >>> torch.allclose(K, G)  # one sample: each layer's block is exact
        True
    """

    _psd = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        params: Any = None,
        fisher: str = "exact",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        unsupported: str = "first_order",
        **objective_kwargs: Any,
    ):
        self.fisher = check_choice(fisher, "fisher", FISHER_KINDS)
        self.num_samples = check_int(num_samples, "num_samples")
        self.generator = generator
        objective_kwargs.setdefault("check_determinism", False)
        super().__init__(model, loss_fn, data, params=params, **objective_kwargs)
        if self.objective.output_loss is None:
            raise NotImplementedError(
                f"K-FAC needs a likelihood loss; no likelihood known for "
                f"{type(loss_fn).__name__}. Use nn.MSELoss, nn.CrossEntropyLoss, "
                "nn.BCEWithLogitsLoss or a hesse.func.OutputLoss."
            )
        self.layers, self.skipped = find_kfac_layers(
            model,
            self.objective.names,
            check_choice(unsupported, "unsupported", UNSUPPORTED_POLICIES),
        )
        self.uses = all_uses(self.layers)
        self._factors: list[tuple[Tensor, Tensor]] | None = None
        self._fkey: tuple | None = None

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``module name -> (A, G)`` of every use at the current parameters (``A`` is a vector
        for Embedding)."""
        return {use.name: ab for use, ab in zip(self.uses, self._get_factors())}

    def terms(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Per layer, the ``(L, R)`` terms of its uses in the weight's matrix view."""
        fs = iter(self._get_factors())
        return [[use.term(*next(fs)) for use in layer.uses] for layer in self.layers]

    def _get_factors(self) -> list[tuple[Tensor, Tensor]]:
        ob = self.objective
        key = ob.state_key()
        if self._factors is None or key != self._fkey:
            self._factors = self._compute_factors()
            self._fkey = key
        return self._factors

    def _compute_factors(self) -> list[tuple[Tensor, Tensor]]:
        ob = self.objective
        uses = self.uses
        U = len(uses)
        A_sum: list[Tensor | float] = [0.0] * U
        G_sum: list[Tensor | float] = [0.0] * U
        counts = [0] * U
        for X, y, w in ob.batches():
            with torch.enable_grad(), ob.mode(), _Recorder(uses) as rec:
                f = ob.forward(X)
                c = w  # weight of the batch's sum loss (Objective.batches)
                for i, use in enumerate(uses):
                    for x in rec.inputs.get(i, []):
                        s, m = use.a_sum(x)
                        A_sum[i] = A_sum[i] + s
                        counts[i] += m
                at = ob.output_loss.at(f, y)
                R, rw = output_residuals(at, self.fisher, self.num_samples, self.generator)
                gs = output_gradient_factors(
                    uses, rec.outputs, f, R, rw, deterministic=self.fisher != "mc"
                )
                for i, g in gs.items():
                    G_sum[i] = G_sum[i] + c * g
        out = []
        dt, dev = ob.dtype, ob.device
        for i, use in enumerate(uses):
            if counts[i] == 0:
                A = torch.zeros(use.a_dim, dtype=dt, device=dev)
                A = A if use.diagonal_a else torch.diag(A)
                G = torch.zeros(use.g_dim, use.g_dim, dtype=dt, device=dev)
            else:
                cnt = torch.tensor(float(counts[i]), dtype=torch.float64, device=dev)
                A = ob.all_reduce(torch.as_tensor(A_sum[i]).clone())
                ob.all_reduce(cnt)
                A = A / cnt.to(A.dtype)
                G = G_sum[i]
                G = (
                    torch.zeros(use.g_dim, use.g_dim, dtype=dt, device=dev)
                    if isinstance(G, float)
                    else ob.all_reduce(G.clone())
                )
            out.append((A, G))
        return out

    def _layer_matrix(self, layer: KFACLayer, V: Tensor, slices: dict) -> Tensor:
        k = V.shape[1]
        parts = [
            V[slices[n]].T.reshape(k, *p.shape) for n, p in zip(layer.param_names, layer.params)
        ]
        return layer.to_matrix(parts)

    def _write_layer(self, layer: KFACLayer, out: Tensor, mat: Tensor, slices: dict) -> None:
        k = mat.shape[0]
        for n, r in zip(layer.param_names, layer.from_matrix(mat)):
            out[slices[n]] = r.reshape(k, -1).T

    def _matmat(self, V: Tensor) -> Tensor:
        slices = self.param_slices()
        out = torch.zeros_like(V)
        for layer, terms in zip(self.layers, self.terms()):
            mat = self._layer_matrix(layer, V, slices)
            res = sum(kron_apply(L, R, mat) for L, R in terms)
            self._write_layer(layer, out, res, slices)
        return out + self._regularizer_product(V)

    def inverse(self, damping: float) -> LinearOperator:
        """``(A (x) G + damping I)^{-1}`` per layer, exactly, by eigendecompositions of the factors.

        Unfactored parameters get ``1 / damping``. A tied weight's block (a sum of Kronecker
        terms) is replaced by its nearest Kronecker product (:func:`nearest_kronecker`)
        before inverting. Requires ``damping > 0`` unless every factor is nonsingular.
        """
        return _KFACInverse(self, check_nonnegative(damping, "damping"))


class _KFACInverse(LinearOperator):
    def __init__(self, op: KFACOperator, damping: float):
        super().__init__(op.shape, op.dtype, op.device, symmetric=True, psd=True)
        self.op, self.damping = op, damping
        self._eig = None

    def _matmat(self, V: Tensor) -> Tensor:
        op = self.op
        if self._eig is None:
            self._eig = [eigen_factors(*nearest_kronecker(t)) for t in op.terms()]
        lam = self.damping + op.objective.weight_decay
        slices = op.param_slices()
        out = V / lam if lam > 0 else torch.zeros_like(V)
        for layer, eig in zip(op.layers, self._eig):
            mat = op._layer_matrix(layer, V, slices)
            op._write_layer(layer, out, eigen_solve(eig, mat, lam), slices)
        return out


def _eig(M: Tensor, working: torch.dtype | None) -> tuple[Tensor | None, Tensor]:
    if M.ndim == 1:
        return None, M.double()
    S = 0.5 * (M + M.T)
    if working is not None and S.dtype == working:
        try:
            d, Q = torch.linalg.eigh(S)
            if bool(torch.isfinite(d).all()):
                return Q, d
        except torch.linalg.LinAlgError:
            pass  # ill-conditioned in this precision: redo it in float64
    d, Q = torch.linalg.eigh(S.double())
    return Q, d


def eigen_factors(
    L: Tensor, R: Tensor, *, working_dtype: torch.dtype | None = None
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor]:
    """Eigendecompositions ``(QL, dL, QR, dR)`` of a Kronecker term ``L (x) R``, cast back to
    the factors' dtype; ``Q = None`` for a diagonal (1-d) factor. They are computed in float64,
    or in the factors' own dtype when it is ``working_dtype`` (about twice as fast in float32;
    float64 again if that fails to converge)."""
    check_finite(L, "a K-FAC factor")
    check_finite(R, "a K-FAC factor")
    dt = R.dtype
    QL, dL = _eig(L, working_dtype)
    QR, dR = _eig(R, working_dtype)
    cast = lambda Q: None if Q is None else Q.to(dt)  # noqa: E731
    return cast(QL), dL.clamp_min(0).to(dt), cast(QR), dR.clamp_min(0).to(dt)


def eigen_refresh(eig: tuple, L: Tensor, R: Tensor) -> tuple:
    """``eig`` with its eigenbases kept and its eigenvalues replaced by those of the new
    factors in them: ``d = diag(Q^T F Q)`` (clamped at 0), the closest (Frobenius) matrix to
    ``F`` diagonal in the basis ``Q``; a diagonal (1-d) factor is taken as it is."""
    check_finite(L, "a K-FAC factor")
    check_finite(R, "a K-FAC factor")
    QL, _, QR, _ = eig

    def values(Q: Tensor | None, F: Tensor) -> Tensor:
        if Q is None:
            return F.clamp_min(0)
        return ((F.to(Q.dtype) @ Q) * Q).sum(0).clamp_min(0)

    return QL, values(QL, L), QR, values(QR, R)


def eigen_quadratic(eig: tuple, mat: Tensor) -> Tensor:
    """``<M, L M R>``, the quadratic form of the undamped Kronecker term ``L (x) R`` (from
    its eigendecomposition ``eig``) at a batch ``M (k, rows, cols)``, summed over ``k``."""
    QL, dL, QR, dR = eig
    rot = mat if QL is None else QL.T @ mat
    rot = rot if QR is None else rot @ QR
    return (rot.square() * (dL.unsqueeze(-1) * dR.unsqueeze(0))).sum()


def eigen_solve(eig: tuple, mat: Tensor, damping: float, *, factored: bool = False) -> Tensor:
    """``(L (x) R + damping I)^{-1} M`` (exact; ``M -> L M R``), or with ``factored=True``
    the factored Tikhonov damping ``(L + sqrt(d)/pi I)^{-1} (x) (R + pi sqrt(d) I)^{-1}`` of
    Martens & Grosse (2015, sec. 6.3) with ``pi = sqrt((tr R / dim R) / (tr L / dim L))``."""
    QL, dL, QR, dR = eig
    if factored:
        pi = (dR.mean().clamp_min(1e-30) / dL.mean().clamp_min(1e-30)).sqrt()
        root = damping**0.5
        dL = dL + root / pi
        dR = dR + pi * root
        denom = dL.unsqueeze(-1) * dR.unsqueeze(0)
    else:
        denom = dL.unsqueeze(-1) * dR.unsqueeze(0) + damping
    rot = mat if QL is None else QL.T @ mat
    rot = rot if QR is None else rot @ QR
    rot = rot / denom
    rot = rot if QL is None else QL @ rot
    return rot if QR is None else rot @ QR.T
