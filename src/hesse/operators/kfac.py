"""Kronecker-factored curvature (K-FAC): the factor machinery and :class:`KFACOperator`.

For a layer ``s = W a`` (``Linear``: ``a`` is the input with a 1 appended for the bias;
``Conv2d``: ``a`` is an unfolded input patch, one per output location; ``Embedding``: ``a`` is
the one-hot index), the curvature block of its parameters is approximated by

.. math::
    B \\approx A \\otimes G, \\qquad
    A = \\frac{1}{M} \\sum_{n, t} a_{n,t} a_{n,t}^\\top, \\qquad
    G = \\sum_{n, t} c_n\\, \\mathbb{E}_{r_n}\\big[g_{n,t} g_{n,t}^\\top\\big],
    \\quad g_{n,t} = J_{s_{n,t}}^\\top r_n,

where ``M`` counts all samples and positions ``(n, t)``, ``c_n`` is the weight of sample
``n``'s unreduced loss in the objective (``1/N`` for a mean cross-entropy, ``1/(N d)`` for a
mean MSE over ``d`` outputs, ``1`` for ``reduction="sum"``), and ``r_n`` is a vector with
``E[r r^T] = `` the output Hessian of the loss (``fisher="exact"``: the columns of its
symmetric square root, backpropagated one by one; ``"mc"``: ``d loss / d f`` at targets
sampled from the model's predictive distribution, the *true* Fisher; ``"empirical"``: at the
observed targets). In :mod:`hesse` order (row-major ``weight`` then ``bias``) the
``Linear``/``Conv2d`` block is ``kron(G, A)`` permuted, the ``Embedding`` block ``kron(A, G)``.

Exactness: for one sample and a ``Linear`` layer, ``A \\otimes G`` with ``fisher="exact"``
*equals* the layer's GGN block (the per-sample Jacobian of a linear layer is exactly
Kronecker, ``J = a^T \\otimes J_s``). For a batch, K-FAC replaces the mean of Kronecker
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
    for convolution layers", ICML 2016.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_int, check_nonnegative, warn_once
from ..func import loss_kind, output_grad_unreduced, sample_targets
from .base import LinearOperator
from .curvature import CurvatureOperator

__all__ = [
    "KFACOperator",
    "KFACLayer",
    "find_kfac_layers",
    "loss_hessian_sqrt",
    "FISHER_KINDS",
]

FISHER_KINDS = ("exact", "mc", "empirical")
UNSUPPORTED_POLICIES = ("raise", "skip")


def _unsupported_reason(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups})"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r}"
        return None
    if isinstance(m, nn.Embedding):
        if m.sparse:
            return "sparse=True"
        if m.max_norm is not None:
            return "max_norm (renormalises the weight in place)"
        return None
    return "no Kronecker factorisation known for this layer type"


def conv_patches(
    x: Tensor,
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> Tensor:
    """Input patches of a 2-D convolution as rows ``(B * T, C * kh * kw)``.

    The same rows (and column order ``c, i, j``) as ``F.unfold(...).transpose(1, 2)``, built
    from strided views (``Tensor.unfold``): ``F.unfold`` is multi-threaded and can be
    hundreds of times slower on a loaded machine.
    """
    kh, kw = kernel_size
    dh, dw = dilation
    sh, sw = stride
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    p = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    p = p[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    B, C, Ho, Wo = p.shape[:4]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(B * Ho * Wo, C * kh * kw)


class KFACLayer:
    """One ``Linear``/``Conv2d``/``Embedding`` layer: its factor statistics and reshapes.

    ``matrix`` views gather a layer's parameters into one matrix whose Kronecker-factored
    curvature is ``A (x) G``: ``(out, in [+1])`` for Linear/Conv2d (bias as last column),
    ``(num_embeddings, dim)`` for Embedding.
    """

    def __init__(self, name: str, module: nn.Module, prefix: str = ""):
        self.name = name
        self.module = module
        self.kind = (
            "linear"
            if isinstance(module, nn.Linear)
            else "conv2d"
            if isinstance(module, nn.Conv2d)
            else "embedding"
        )
        full = f"{prefix}{name}." if name else prefix
        self.weight_name = full + "weight"
        self.bias = getattr(module, "bias", None) if self.kind != "embedding" else None
        self.bias_name = full + "bias" if self.bias is not None else None
        w = module.weight
        if self.kind == "embedding":
            self.a_dim, self.g_dim = w.shape[0], w.shape[1]
        else:
            self.g_dim = w.shape[0]
            self.a_dim = w[0].numel() + (1 if self.bias is not None else 0)

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])

    @property
    def params(self) -> list[Tensor]:
        return [self.module.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def diagonal_a(self) -> bool:
        return self.kind == "embedding"

    # -- statistics ---------------------------------------------------------------------
    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``a_{n,t}`` of one layer input: ``(M, a_dim)`` (``(M,)`` indices for Embedding)."""
        x = x.detach()
        if self.kind == "embedding":
            return x.reshape(-1)
        if self.kind == "conv2d":
            m = self.module
            if x.ndim == 3:
                x = x.unsqueeze(0)
            rows = conv_patches(x, m.kernel_size, m.dilation, m.padding, m.stride)
        else:
            rows = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def a_sum(self, x: Tensor) -> tuple[Tensor, int]:
        """``(sum_{n,t} a a^T, M)`` (a count vector for Embedding)."""
        rows = self.input_rows(x)
        if self.kind == "embedding":
            w = self.module.weight
            counts = torch.bincount(rows, minlength=self.a_dim).to(w.dtype)
            return counts, rows.shape[0]
        return rows.T @ rows, rows.shape[0]

    def output_rows(self, g: Tensor) -> Tensor:
        """Output gradients ``g_{n,t}`` as rows ``(M, g_dim)``; ``g`` may carry leading dims."""
        if self.kind == "conv2d":
            # (..., C, H, W) -> (..., H*W, C)
            g = g.flatten(-2).transpose(-1, -2)
        return g.reshape(-1, self.g_dim)

    def g_sum(self, g: Tensor) -> Tensor:
        rows = self.output_rows(g)
        return rows.T @ rows

    # -- parameter <-> matrix -----------------------------------------------------------
    def to_matrix(self, parts: Sequence[Tensor]) -> Tensor:
        """Parameter-shaped tensors ``(k, *shape)`` (weight[, bias]) -> ``(k, rows, cols)``."""
        w = parts[0]
        k = w.shape[0]
        if self.kind == "embedding":
            return w
        mat = w.reshape(k, self.g_dim, -1)
        if self.bias is not None:
            mat = torch.cat([mat, parts[1].reshape(k, self.g_dim, 1)], dim=2)
        return mat

    def from_matrix(self, mat: Tensor) -> list[Tensor]:
        k = mat.shape[0]
        w = self.module.weight
        if self.kind == "embedding":
            return [mat]
        if self.bias is not None:
            return [mat[..., :-1].reshape(k, *w.shape), mat[..., -1].reshape(k, self.g_dim)]
        return [mat.reshape(k, *w.shape)]

    def kron_product(self, A: Tensor, G: Tensor, mat: Tensor) -> Tensor:
        """``(A (x) G)`` applied to a batch of parameter matrices ``(k, rows, cols)``."""
        if self.kind == "embedding":
            return A.unsqueeze(-1) * (mat @ G)
        return G @ mat @ A


def find_kfac_layers(
    model: nn.Module, selected: Sequence[str] | None = None, unsupported: str = "raise"
) -> tuple[list[KFACLayer], list[str]]:
    """The K-FAC layers of ``model`` and the parameter names left to the ``unsupported`` policy.

    Args:
        model: the network.
        selected: parameter names to cover (default: all that require grad).
        unsupported: ``"raise"`` (``NotImplementedError`` naming the layer) or ``"skip"``.

    Returns:
        ``(layers, skipped_param_names)``.
    """
    unsupported = check_choice(unsupported, "unsupported", UNSUPPORTED_POLICIES)
    named = dict(model.named_parameters())
    chosen = {k for k, p in named.items() if p.requires_grad} if selected is None else set(selected)
    layers: list[KFACLayer] = []
    skipped: list[str] = []
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        own = [prefix + n for n, _ in m.named_parameters(recurse=False)]
        sel = [n for n in own if n in chosen]
        if not sel:
            continue
        reason = _unsupported_reason(m)
        if reason is None and not all(n in chosen for n in own):
            reason = "only part of its parameters are trainable/selected"
        if reason is None:
            layers.append(KFACLayer(mname, m))
            continue
        if unsupported == "raise":
            raise NotImplementedError(
                f"K-FAC does not support layer {mname or '<root>'!r} "
                f"({type(m).__name__}: {reason}) with parameters {sel}. Supported: nn.Linear, "
                "nn.Conv2d (groups=1, zero padding), nn.Embedding (dense). Pass "
                "unsupported='skip' to treat its parameters with the plain gradient (identity "
                "curvature), or leave them out of params / freeze them."
            )
        skipped.extend(sel)
    if skipped:
        warn_once(
            f"K-FAC: {len(skipped)} parameter(s) of unsupported layers are skipped "
            f"(plain gradient / identity): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else "")
        )
    return layers, skipped


def loss_hessian_sqrt(kind: str, outputs: Tensor) -> Tensor:
    """Columns ``S`` with ``S S^T = `` the per-sample output Hessian of the unreduced loss.

    Returns ``(C, *outputs.shape)``: column ``c`` for every sample at once. MSE:
    ``sqrt(2) e_c``; BCE: ``sqrt(s(1-s)) e_c``; cross-entropy: ``sqrt(p_c) (e_c - p)``
    (since ``(D - p sqrt(p)^T)(D - sqrt(p) p^T) = diag(p) - p p^T`` with ``D = diag(sqrt p)``).
    """
    f = outputs.detach()
    B = f.shape[0]
    flat = f.reshape(B, -1)
    C = flat.shape[1]
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    if kind == "mse":
        cols = (2.0**0.5) * eye.unsqueeze(1).expand(C, B, C)
    elif kind == "bce":
        s = torch.sigmoid(flat)
        cols = eye.unsqueeze(1) * (s * (1 - s)).sqrt().T.unsqueeze(-1)
    else:
        if f.ndim != 2:
            raise NotImplementedError(
                f"K-FAC with CrossEntropyLoss expects outputs (B, C); got {tuple(f.shape)}."
            )
        p = torch.softmax(flat, dim=1)
        cols = p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
    return cols.reshape(C, *f.shape)


class _Recorder:
    """Forward hooks recording each layer's input statistics and (graph-attached) outputs."""

    def __init__(self, layers: Sequence[KFACLayer]):
        self.layers = list(layers)
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._hook(i)))
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


def output_gradient_factors(
    layers: Sequence[KFACLayer],
    layer_outputs: dict[int, list[Tensor]],
    f: Tensor,
    *,
    fisher: str,
    kind: str,
    targets: Tensor | None,
    num_samples: int,
    generator: torch.Generator | None,
) -> dict[int, Tensor]:
    """``sum_{n,t} E[g g^T]`` per layer (without the loss weights ``c_n``) for one batch.

    Backpropagates vectors ``r`` from the model output ``f`` to every recorded layer output
    (``retain_graph=True``; parameter gradients are not touched).
    """
    idx = [i for i in range(len(layers)) if layer_outputs.get(i)]
    outs = [o for i in idx for o in layer_outputs[i]]
    if fisher == "exact":
        R = loss_hessian_sqrt(kind, f)
        weight = 1.0
    elif fisher == "mc":
        R = _sampled_residuals(kind, f.detach(), num_samples, generator)
        weight = 1.0 / num_samples
    else:
        if targets is None:
            raise ValueError("fisher='empirical' needs the targets.")
        R = output_grad_unreduced(kind, f, targets).unsqueeze(0)
        weight = 1.0
    grads = _batched_grad(f, outs, R)
    result: dict[int, Tensor] = {}
    j = 0
    for i in idx:
        layer = layers[i]
        acc = None
        for _ in layer_outputs[i]:
            g = grads[j]
            j += 1
            if g is None:
                continue
            s = layer.g_sum(g)
            acc = s if acc is None else acc + s
        if acc is not None:
            result[i] = acc * weight
    return result


def _sampled_residuals(
    kind: str, f: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    """``r = d loss_n / d f`` at ``num_samples`` targets drawn from the model, ``(S, *f.shape)``
    (vectorised over the samples: one softmax/sigmoid for all of them)."""
    samples = sample_targets(kind, f, num_samples, generator)
    if kind == "mse":
        return 2.0 * (f.unsqueeze(0) - samples)
    if kind == "bce":
        return torch.sigmoid(f).unsqueeze(0) - samples
    p = torch.softmax(f, dim=1)
    return p.unsqueeze(0) - torch.nn.functional.one_hot(samples.long(), f.shape[1]).to(f.dtype)


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
    definition and normalisation), in ``model.named_parameters()`` order (restricted to
    ``params``), so it compares with :class:`hesse.GGNOperator` entry by entry::

        err = (KFACOperator(model, loss_fn, data).to_dense()
               - GGNOperator(model, loss_fn, data).to_dense())

    Cost: building the factors takes one forward pass and ``C`` (``"exact"``, ``C`` = output
    size per sample), ``num_samples`` (``"mc"``) or one (``"empirical"``) backward passes per
    batch; a product costs two small matrix products per layer and no model evaluation.
    Memory: ``sum_l (a_l^2 + g_l^2)``.

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`; the loss must be
            ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        params: parameter subset (whole layers).
        fisher: ``"exact"`` (default; type-2 Fisher == GGN for these losses), ``"mc"`` (true
            Fisher, ``num_samples`` sampled targets per input) or ``"empirical"``.
        num_samples: targets per input for ``fisher="mc"``.
        generator: randomness for ``fisher="mc"``.
        unsupported: ``"raise"`` (default) or ``"skip"`` (zero block for those parameters,
            with a warning) for layers with parameters that K-FAC cannot factor.
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
        unsupported: str = "raise",
        **objective_kwargs: Any,
    ):
        self.fisher = check_choice(fisher, "fisher", FISHER_KINDS)
        self.loss_kind = loss_kind(loss_fn)
        self.num_samples = check_int(num_samples, "num_samples")
        self.generator = generator
        objective_kwargs.setdefault("check_determinism", False)
        super().__init__(model, loss_fn, data, params=params, **objective_kwargs)
        self.layers, self.skipped = find_kfac_layers(
            model,
            self.objective.names,
            check_choice(unsupported, "unsupported", UNSUPPORTED_POLICIES),
        )
        self._factors: list[tuple[Tensor, Tensor]] | None = None
        self._fkey: tuple | None = None

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``layer name -> (A, G)`` at the current parameters (``A`` is a vector for Embedding)."""
        return {layer.name: ab for layer, ab in zip(self.layers, self._get_factors())}

    def _get_factors(self) -> list[tuple[Tensor, Tensor]]:
        ob = self.objective
        key = ob.state_key()
        if self._factors is None or key != self._fkey:
            self._factors = self._compute_factors()
            self._fkey = key
        return self._factors

    def _compute_factors(self) -> list[tuple[Tensor, Tensor]]:
        ob = self.objective
        L = len(self.layers)
        A_sum: list[Tensor | float] = [0.0] * L
        G_sum: list[Tensor | float] = [0.0] * L
        counts = [0] * L
        for X, y, w in ob.batches():
            with torch.enable_grad(), ob.mode(), _Recorder(self.layers) as rec:
                f = ob.forward(X)
                c = w  # weight of the batch's sum loss (Objective.batches)
                for i, layer in enumerate(self.layers):
                    for x in rec.inputs.get(i, []):
                        s, m = layer.a_sum(x)
                        A_sum[i] = A_sum[i] + s
                        counts[i] += m
                gs = output_gradient_factors(
                    self.layers,
                    rec.outputs,
                    f,
                    fisher=self.fisher,
                    kind=self.loss_kind,
                    targets=y,
                    num_samples=self.num_samples,
                    generator=self.generator,
                )
                for i, g in gs.items():
                    G_sum[i] = G_sum[i] + c * g
        out = []
        for i, layer in enumerate(self.layers):
            w = layer.module.weight
            if counts[i] == 0:
                A = torch.zeros(layer.a_dim, dtype=w.dtype, device=w.device)
                A = A if layer.diagonal_a else torch.diag(A)
                G = torch.zeros(layer.g_dim, layer.g_dim, dtype=w.dtype, device=w.device)
            else:
                cnt = torch.tensor(float(counts[i]), dtype=torch.float64, device=w.device)
                A = ob.all_reduce(torch.as_tensor(A_sum[i]).clone())
                ob.all_reduce(cnt)
                A = A / cnt.to(A.dtype)
                G = G_sum[i]
                G = (
                    torch.zeros(layer.g_dim, layer.g_dim, dtype=w.dtype, device=w.device)
                    if isinstance(G, float)
                    else ob.all_reduce(G.clone())
                )
            out.append((A, G))
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        slices = self.param_slices()
        out = torch.zeros_like(V)
        for layer, (A, G) in zip(self.layers, self._get_factors()):
            parts = [
                V[slices[n]].T.reshape(k, *p.shape) for n, p in zip(layer.param_names, layer.params)
            ]
            res = layer.from_matrix(layer.kron_product(A, G, layer.to_matrix(parts)))
            for n, r in zip(layer.param_names, res):
                out[slices[n]] = r.reshape(k, -1).T
        return out + self._regularizer_product(V)

    def inverse(self, damping: float) -> LinearOperator:
        """``(A (x) G + damping I)^{-1}`` per layer, exactly, by eigendecompositions of the factors.

        Skipped parameters get ``1 / damping``. Requires ``damping > 0`` unless every factor
        is nonsingular.
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
            self._eig = [eigen_factors(A, G) for A, G in op._get_factors()]
        lam = self.damping + op.objective.weight_decay
        k = V.shape[1]
        slices = op.param_slices()
        out = V / lam if lam > 0 else torch.zeros_like(V)
        for layer, eig in zip(op.layers, self._eig):
            parts = [
                V[slices[n]].T.reshape(k, *p.shape) for n, p in zip(layer.param_names, layer.params)
            ]
            mat = layer.to_matrix(parts)
            res = layer.from_matrix(eigen_solve(layer, eig, mat, lam))
            for n, r in zip(layer.param_names, res):
                out[slices[n]] = r.reshape(k, -1).T
        return out


def eigen_factors(A: Tensor, G: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """Eigendecompositions (in float64, cast back) ``(QA, dA, QG, dG)``; ``QA=None`` if ``A``
    is diagonal (a vector)."""
    check_finite(A, "the K-FAC input factor A")
    check_finite(G, "the K-FAC output-gradient factor G")
    dt = G.dtype
    dG, QG = torch.linalg.eigh(0.5 * (G + G.T).double())
    if A.ndim == 1:
        QA, dA = None, A.double()
    else:
        dA, QA = torch.linalg.eigh(0.5 * (A + A.T).double())
        QA = QA.to(dt)
    return QA, dA.clamp_min(0).to(dt), QG.to(dt), dG.clamp_min(0).to(dt)


def eigen_solve(
    layer: KFACLayer, eig: tuple, mat: Tensor, damping: float, *, factored: bool = False
) -> Tensor:
    """``(A (x) G + damping I)^{-1} M`` (exact), or with ``factored=True`` the factored
    Tikhonov damping ``(A + pi sqrt(d) I)^{-1} (x) (G + sqrt(d)/pi I)^{-1}`` of Martens &
    Grosse (2015, sec. 6.3) with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``."""
    QA, dA, QG, dG = eig
    if factored:
        tA = dA.mean().clamp_min(1e-30)
        tG = dG.mean().clamp_min(1e-30)
        pi = (tA / tG).sqrt()
        root = damping**0.5
        dA = dA + pi * root
        dG = dG + root / pi
        lam = 0.0
        denom_fn = lambda a, g: g * a  # noqa: E731
    else:
        lam = damping
        denom_fn = lambda a, g: g * a + lam  # noqa: E731
    if layer.diagonal_a:
        # mat: (k, num, dim); curvature A (x) G with A diagonal
        rot = mat @ QG
        rot = rot / denom_fn(dA.unsqueeze(-1), dG.unsqueeze(0))
        return rot @ QG.T
    rot = QG.T @ mat @ QA
    rot = rot / denom_fn(dA.unsqueeze(0), dG.unsqueeze(-1))
    return QG @ rot @ QA.T
