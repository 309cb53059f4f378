"""Curvature operators of a model: Hessian, generalised Gauss-Newton, Fisher; blocks.

All are built as ``Op(model, loss_fn, data, *, params=None, ...)``; vectors are ordered like
``model.named_parameters()`` (restricted to ``params``), flattened. The base class owns the
data loop, the exact mean/sum normalisation, graph caching, regularisers and the
``torch.distributed`` reduction; a subclass writes one batch product.

Caching: with ``cache_graph=True`` (default) the autograd graph each product needs is built
once per batch and reused, so every product costs one backward pass through it. The cache is
rebuilt automatically when a parameter is changed in place (an optimizer step). Set
``cache_graph=False`` for data that does not fit in memory twice.

Memory: ``micro_batch_size=m`` splits every batch into chunks of at most ``m`` samples with
exact weights. With ``cache_graph=True`` each chunk keeps its own graph (memory grows with
the data, and each chunk also holds a parameter-sized gradient); with ``cache_graph=False``
only one chunk's graph is alive at a time, so peak memory is bounded by the chunk size at the
price of rebuilding the graph (one forward and one ``create_graph`` backward) every product.
:func:`hesse.estimate` predicts both before a long run. Sums over chunks and ranks use the
objective's ``accumulation_dtype`` (float64 for float32 models).

Transformers: graphs are built with the math backend of ``scaled_dot_product_attention``
(the fused CPU kernels have no double backward), see :func:`hesse.objective.math_attention`.

Data parallelism: see :class:`hesse.Objective`; products are all-reduced over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..func import GradGraph, LossAt, OutputGraph, output_loss
from ..func._ravel import ravel_block, unravel_block
from ..objective import Objective
from .base import LinearOperator

_VECTORS_DIFFER = (
    "The vectors multiplied differ between ranks. Under torch.distributed every rank must run "
    "the same algorithm on the same vectors: pass the same generator seed on every rank "
    "(e.g. generator=torch.Generator().manual_seed(0)), never None."
)

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator", "SubOperator"]


class CurvatureOperator(LinearOperator):
    """Base of the model curvature operators (see the module docstring).

    Args:
        model, loss_fn, data: see :class:`hesse.Objective`.
        params: parameter subset (names, prefixes, modules); default all trainable.
        cache_graph: keep per-batch graphs between products (default ``True``).
        **objective_kwargs: ``batch_adapter``, ``output_adapter``, ``train_mode``,
            ``allow_dropout``, ``weight_decay``, ``regularizer``, ``reduction``,
            ``check_determinism``, ``distributed``, ``process_group``, ``micro_batch_size``,
            ``accumulation_dtype`` (see :class:`hesse.Objective`).
    """

    _psd = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        params: Any = None,
        cache_graph: bool = True,
        **objective_kwargs: Any,
    ):
        self.objective = Objective(model, loss_fn, data, params=params, **objective_kwargs)
        ob = self.objective
        super().__init__((ob.n, ob.n), ob.dtype, ob.device, symmetric=True, psd=self._psd)
        self.cache_graph = cache_graph
        self._cache: list[Any] | None = None
        self._key: tuple | None = None
        self._reg_graph: GradGraph | None = None
        self._reg_key: tuple | None = None

    # -- per-layer structure ------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.objective.names)

    def param_slices(self) -> dict[str, slice]:
        """Index range of each parameter in the flat vector."""
        out, i = {}, 0
        for name, p in self.objective.params.items():
            out[name] = slice(i, i + p.numel())
            i += p.numel()
        return out

    def layer_slices(self) -> dict[str, list[slice]]:
        """Parameter ranges grouped by owning module (``"0.weight"``, ``"0.bias"`` -> ``"0"``)."""
        groups: dict[str, list[slice]] = {}
        for name, sl in self.param_slices().items():
            groups.setdefault(name.rpartition(".")[0] or name, []).append(sl)
        return groups

    def block(
        self, rows: str | Sequence[str], cols: str | Sequence[str] | None = None
    ) -> SubOperator:
        """Block ``H[rows, cols]`` selected by parameter names or module prefixes.

        ``op.block("0")`` is the diagonal block of layer ``0``; ``op.block("0", "2")`` the
        off-diagonal block coupling layers 0 and 2 (shape ``(n_0, n_2)``).
        """
        r = self._indices(rows)
        c = r if cols is None else self._indices(cols)
        return SubOperator(self, r, c)

    def layer_blocks(self) -> dict[str, SubOperator]:
        """The diagonal block of every layer (module), keyed by module name."""
        return {name: self.block([name]) for name in self.layer_slices()}

    def _indices(self, sel: str | Sequence[str]) -> Tensor:
        sel = [sel] if isinstance(sel, str) else list(sel)
        slices = self.param_slices()
        idx = []
        for s in sel:
            hits = [sl for k, sl in slices.items() if k == s or k.startswith(s + ".")]
            if not hits:
                raise ValueError(f"No parameter or module named {s!r} among {list(slices)}.")
            idx.extend(torch.arange(h.start, h.stop) for h in hits)
        return torch.unique(torch.cat(idx)).to(self.device)

    # -- values -------------------------------------------------------------------------
    def gradient(self) -> Tensor:
        """Flat gradient of the objective at the current parameters."""
        return self.objective.value_and_grad()[1]

    def loss(self) -> Tensor:
        return self.objective.loss()

    # -- products -----------------------------------------------------------------------
    def _build(self, X: Any, y: Tensor, w: float) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch_product(self, cache: Any, parts: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _vector_product(self, cache: Any, parts: list[Tensor]) -> list[Tensor]:
        """One vector given as parameter-shaped tensors (no batch dimension)."""
        return [r[0] for r in self._batch_product(cache, [t.unsqueeze(0) for t in parts])]

    def _batch_caches(self, key: tuple | None = None):
        """The per-chunk caches; ``key`` is :meth:`Objective.state_key` (computed if ``None``).

        With ``cache_graph=True`` they are rebuilt whenever ``key`` changed (a parameter's
        values changed by any route).
        """
        ob = self.objective
        if self.cache_graph:
            key = ob.state_key() if key is None else key
            if self._cache is None or key != self._key:
                self._cache = None  # free the old graphs first
                with torch.enable_grad(), ob.curvature_mode():
                    self._cache = [self._build(X, y, w) for X, y, w in ob.batches()]
                self._key = key
            return self._cache
        return self._fresh_caches()

    def _fresh_caches(self):
        ob = self.objective
        for X, y, w in ob.batches():
            with torch.enable_grad(), ob.curvature_mode():
                cache = self._build(X, y, w)
            yield cache
            del cache  # free this chunk's graph before the next one is built

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt by the next product)."""
        self._cache = None
        self._key = None

    def _matmat(self, V: Tensor) -> Tensor:
        ob = self.objective
        k = V.shape[1]
        # Every rank runs this one collective on every product, whatever changed locally
        # (vectors and parameters are compared together), so the ranks never diverge.
        ob.check_same_across_ranks([V], _VECTORS_DIFFER, with_params=True)
        key = ob.state_key() if (self.cache_graph or ob.regularizer is not None) else None
        caches = self._batch_caches(key)
        if isinstance(caches, list) and len(caches) == 1 and not ob.distributed:
            # one chunk: no accumulator (products on cached graphs run no module code, so
            # no mode switching is needed either); a single vector without batch dimensions
            if k == 1:
                v = V.reshape(-1)
                parts = [t.view(s) for t, s in zip(v.split(ob.sizes), ob.shapes)]
                res = self._vector_product(caches[0], parts)
                result = torch.cat([r.reshape(-1) for r in res]).unsqueeze(1)
            else:
                result = ravel_block(self._batch_product(caches[0], unravel_block(V, ob.shapes)), k)
        else:
            parts = unravel_block(V, ob.shapes)
            # (k, n) row-major accumulator; returned transposed as the (n, k) block.
            acc = torch.zeros((k, ob.n), dtype=ob.accumulation_dtype, device=V.device)
            for cache in caches:
                res = self._batch_product(cache, parts)
                i = 0
                for r, m in zip(res, ob.sizes):
                    acc[:, i : i + m].add_(r.reshape(k, m))
                    i += m
                del res, cache  # with cache_graph=False this frees the chunk's graph
            ob.all_reduce(acc)
            result = acc.T if acc.dtype == self.dtype else acc.T.to(self.dtype)
            del acc
        extra = self._regularizer_product(V, key)
        if isinstance(extra, Tensor) or extra != 0.0:
            result = result + extra
        return result

    def _regularizer_product(self, V: Tensor, key: tuple | None = None) -> Tensor | float:
        ob = self.objective
        extra: Tensor | float = 0.0
        if ob.weight_decay:
            extra = ob.weight_decay * V
        if ob.regularizer is not None:
            key = ob.state_key() if key is None else key
            if self._reg_graph is None or key != self._reg_key:
                with torch.enable_grad():
                    self._reg_graph = GradGraph(ob.regularization(), list(ob.params.values()))
                self._reg_key = key
            parts = unravel_block(V, ob.shapes)
            extra = extra + ravel_block(self._reg_graph.hmp(parts), V.shape[1])
        return extra


class HessianOperator(CurvatureOperator):
    """The exact Hessian of the objective, ``H = d^2 L / d theta^2``.

    Products by Pearlmutter's trick. ``mode="rev-rev"`` (default) caches the ``create_graph``
    gradient and costs one backward pass per product (1-2 gradients); ``mode="fwd-rev"``
    uses ``torch.func`` forward-over-reverse with ``vmap`` over columns, caches nothing.

    Cost: one product ~ 1-2 gradient evaluations; memory: the double-backward graph.

    ``"fwd-rev"`` refuses models with ``nn.LayerNorm``: ``torch.func``'s second derivatives
    through it are silently wrong in torch 2.13 (the default ``"rev-rev"`` is exact).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        params: Any = None,
        mode: str = "rev-rev",
        **kwargs: Any,
    ):
        self.mode = check_choice(mode, "mode", ("rev-rev", "fwd-rev"))
        if (
            self.mode == "fwd-rev"
            and isinstance(model, nn.Module)
            and any(isinstance(m, nn.LayerNorm) for m in model.modules())
        ):
            raise NotImplementedError(
                "mode='fwd-rev' cannot be trusted with nn.LayerNorm: torch.func's second "
                "derivatives through layer_norm are wrong in this torch version. Use the "
                "default mode='rev-rev'."
            )
        super().__init__(model, loss_fn, data, params=params, **kwargs)

    def _build(self, X: Any, y: Tensor, w: float) -> Any:
        ob = self.objective
        if self.mode == "fwd-rev":
            return (X, y, w)
        return GradGraph(ob.batch_loss(ob.forward(X), y, w), list(ob.params.values()))

    def _batch_product(self, cache: Any, parts: list[Tensor]) -> list[Tensor]:
        if self.mode == "fwd-rev":
            return self._fwd_rev(*cache, parts)
        return cache.hmp(parts)

    def _vector_product(self, cache: Any, parts: list[Tensor]) -> list[Tensor]:
        if self.mode == "fwd-rev":
            return super()._vector_product(cache, parts)
        return cache.hvp(parts)

    def _fwd_rev(self, X: Any, y: Tensor, w: float, parts: list[Tensor]) -> list[Tensor]:
        ob = self.objective
        model = ob.model
        names = ob.names
        frozen = {k: v.detach() for k, v in model.named_parameters() if k not in ob.params}
        buffers = dict(model.named_buffers())
        args, kwargs = ob.call_args(X)
        with torch.no_grad():
            ob.check_targets(ob.forward(X), y)

        def loss_of(p: tuple[Tensor, ...]) -> Tensor:
            state = {**frozen, **buffers, **dict(zip(names, p))}
            out = ob.adapt_output(torch.func.functional_call(model, state, args, kwargs))
            return ob.batch_loss(out, y, w, check=False)

        primals = tuple(p.detach() for p in ob.params.values())
        grad_fn = torch.func.grad(loss_of)

        def one(*v: Tensor) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, (primals,), (tuple(v),))[1]

        with ob.curvature_mode():
            try:
                return list(torch.func.vmap(one)(*parts))
            except RuntimeError as e:
                raise NotImplementedError(
                    f"mode='fwd-rev' failed inside torch.func ({e}). Some operators lack "
                    "forward-over-reverse support in this torch version; use the default "
                    "mode='rev-rev'."
                ) from e


class _OutputCurvatureOperator(CurvatureOperator):
    """``J^T M J`` with an output-space matrix ``M`` per batch (GGN and Fisher)."""

    _psd = True

    def _build(self, X: Any, y: Tensor, w: float) -> Any:
        ob = self.objective
        outputs = ob.forward(X)
        ob.check_targets(outputs, y)
        return OutputGraph(outputs, list(ob.params.values())), self._output_state(outputs, y, w)

    def _output_state(self, outputs: Tensor, y: Tensor, w: float) -> Any:
        raise NotImplementedError  # pragma: no cover

    def _output_mp(self, state: Any, W: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _batch_product(self, cache: Any, parts: list[Tensor]) -> list[Tensor]:
        graph, state = cache
        return graph.vjp(self._output_mp(state, graph.jmp(parts)))


class GGNOperator(_OutputCurvatureOperator):
    """Generalised Gauss-Newton ``G = J^T H_L J`` (plus the regulariser's Hessian).

    ``H_L`` is the Hessian of the (weighted) loss in the model outputs: in closed form for
    losses known in output space (:class:`hesse.func.OutputLoss`; cross-entropy
    ``diag(p) - p p^T`` per row, never a ``C x C`` matrix or a graph through
    ``log_softmax``), else by autograd, so any scalar loss works; it is PSD when the loss is
    convex in the outputs. Cost: one JVP + one VJP on the cached output graph per product.
    """

    def _output_state(self, outputs: Tensor, y: Tensor, w: float) -> Any:
        ob = self.objective
        if ob.output_loss is not None:
            return ob.output_loss.at(outputs, y), w
        leaf = outputs.detach().requires_grad_(True)
        g = torch.autograd.grad(ob.batch_loss(leaf, y, w), leaf, create_graph=True)[0]
        return leaf, g

    def _output_mp(self, state: Any, W: Tensor) -> Tensor:
        a, b = state
        if isinstance(a, LossAt):
            return a.hessian_mp(W).mul_(b)  # a new tensor: scaled in place
        leaf, g = state
        if not g.requires_grad:  # loss linear in the outputs
            return torch.zeros_like(W)
        return torch.autograd.grad(g, leaf, W, retain_graph=True, is_grads_batched=True)[0]


class FisherOperator(_OutputCurvatureOperator):
    """Fisher information of the likelihood the loss defines, ``J^T E[r r^T] J``.

    .. math:: F = \\sum_b w_b \\sum_{\\text{rows } m \\in b} J_m^\\top\\,
              \\mathbb{E}[r_m r_m^\\top]\\, J_m

    with ``r_m`` the gradient of row ``m``'s loss in the outputs and ``w_b`` the batch weight
    of :class:`hesse.Objective` (``1 / count`` for the mean over the valid targets of the
    whole data set). Rows (:class:`hesse.func.OutputLoss`) are samples for MSE and BCE and
    positions for cross-entropy: per *token* for sequence outputs ``(N, C, d1, ...)`` or
    ``(B, T, V)``; ignored targets contribute nothing.

    Args:
        kind: ``"exact"`` (type-2, closed form ``E_y[r r^T] = H_out``; equals the GGN),
            ``"mc"`` (``num_samples`` targets drawn per row from ``p(y|f)`` with
            ``generator``, fixed for the current parameters), or ``"empirical"``
            (``r`` at the observed targets: the sum over rows of the outer products of the
            per-row (per-token) loss gradients, ``w_b``-weighted).
        num_samples: Monte-Carlo samples per row for ``kind="mc"``.
        generator: randomness for ``kind="mc"``, on the model's device.

    Supports ``nn.MSELoss``, ``nn.CrossEntropyLoss`` and ``nn.BCEWithLogitsLoss`` (and
    ``loss_fn=None`` for Hugging Face models), see :func:`hesse.func.output_loss`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None,
        data: Any,
        *,
        params: Any = None,
        kind: str = "exact",
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        self.kind = check_choice(kind, "kind", ("exact", "mc", "empirical"))
        if loss_fn is not None:
            output_loss(loss_fn)  # raises for a loss without a known likelihood
        self.num_samples = check_int(num_samples, "num_samples")
        self.generator = generator
        super().__init__(model, loss_fn, data, params=params, **kwargs)
        if self.kind == "mc" and not self.cache_graph:
            raise ValueError(
                "FisherOperator(kind='mc') needs cache_graph=True so that its "
                "sampled targets stay fixed between products."
            )
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model on {self.device}; pass "
                f"torch.Generator(device='{self.device}').manual_seed(...)."
            )

    def _output_state(self, outputs: Tensor, y: Tensor, w: float) -> Any:
        at = self.objective.output_loss.at(outputs, y)
        if self.kind == "exact":
            return at, w, None
        if self.kind == "empirical":
            return at, w, at.grad().unsqueeze(0)
        return at, w / self.num_samples, at.sampled_grads(self.num_samples, self.generator)

    def _output_mp(self, state: Any, W: Tensor) -> Tensor:
        at, w, R = state
        if R is None:
            return at.hessian_mp(W).mul_(w)
        return w * at.outer_mp(R, W)


class SubOperator(LinearOperator):
    """Rows ``r`` and columns ``c`` of a parent operator: ``A[r][:, c]`` (lazy)."""

    def __init__(self, parent: LinearOperator, rows: Tensor, cols: Tensor):
        same = rows.shape == cols.shape and bool(torch.equal(rows, cols))
        super().__init__(
            (rows.numel(), cols.numel()),
            parent.dtype,
            parent.device,
            symmetric=parent.symmetric and same,
            psd=parent.psd and same,
        )
        self.parent, self.rows, self.cols = parent, rows, cols

    def _matmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.parent.shape[1], V.shape[1], dtype=V.dtype, device=V.device)
        full[self.cols] = V
        self.parent.num_matvecs += V.shape[1]
        return self.parent._matmat(full)[self.rows]

    def _rmatmat(self, V: Tensor) -> Tensor:
        full = torch.zeros(self.parent.shape[0], V.shape[1], dtype=V.dtype, device=V.device)
        full[self.rows] = V
        self.parent.num_matvecs += V.shape[1]
        return self.parent._rmatmat(full)[self.cols]
