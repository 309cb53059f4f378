"""The function whose curvature we take: model + loss + data (+ regulariser).

.. math::
    L(\\theta) = \\frac{1}{c} \\sum_{b} \\ell(f(X_b; \\theta), y_b) \\cdot |b|_\\text{norm}
                 + \\tfrac{1}{2}\\,\\mathrm{wd}\\,\\lVert\\theta\\rVert^2 + R(\\theta)

With ``reduction="mean"`` the value is the mean over all ``N`` samples (exactly what the loss
would give on the concatenated data), not the mean of batch means: batch ``b`` of size ``B_b``
gets weight ``B_b / N``. With ``reduction="sum"`` every batch has weight 1.

Micro-batching: with ``micro_batch_size=m`` every batch is split along its first dimension
into chunks of at most ``m`` samples, each weighted exactly like a batch of its size, so the
value, gradient and every curvature product are unchanged (up to rounding) while only one
chunk's graph needs to be alive at a time (see ``cache_graph`` on the operators).

Data parallelism: under ``torch.distributed`` every rank holds its own shard of the data.
``N`` is the global sample count (shards may have unequal sizes), the per-rank sums of
losses, gradients and curvature products are all-reduced, and the regulariser and weight
decay are added once, after the reduction. Every rank then sees the same function and the
same operator, so algorithms run unchanged and give identical results on all ranks.

Reductions (over chunks, batches and ranks) are accumulated in ``accumulation_dtype``:
float64 by default for lower-precision models whenever more than one term is summed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import NonFiniteError, check_finite, check_int, check_nonnegative, warn_once

__all__ = ["Objective", "resolve_params", "math_attention"]


@contextlib.contextmanager
def math_attention():
    """Select the math backend of ``scaled_dot_product_attention`` for the duration.

    PyTorch's fused CPU attention kernels (flash) have no double backward
    (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented``), so a graph built for curvature products through ``nn.MultiheadAttention``
    or ``nn.TransformerEncoderLayer`` must use the math decomposition, which is twice
    differentiable and gives the same function.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


_BN = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def resolve_params(model: nn.Module, params: Any = None) -> dict[str, Tensor]:
    """Resolve a parameter selection to an ordered ``name -> tensor`` dict.

    ``params`` may be ``None`` (every parameter that requires grad), a sequence of names or
    name prefixes (``"0"`` selects ``"0.weight"`` and ``"0.bias"``), a submodule or a sequence
    of submodules, or a ``name -> tensor`` dict of the model's own parameters.
    Order is always ``model.named_parameters()`` order.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        skipped = [k for k, p in named.items() if not p.requires_grad]
        if skipped:
            warn_once(
                f"Excluding {len(skipped)} parameter(s) with requires_grad=False "
                f"from the curvature: {', '.join(skipped[:5])}"
                + (" ..." if len(skipped) > 5 else "")
            )
    else:
        if isinstance(params, nn.Module):
            params = [params]
        if isinstance(params, dict):
            ids = {id(t) for t in params.values()}
            chosen = {k: p for k, p in named.items() if id(p) in ids}
            if len(chosen) != len(params):
                raise ValueError(
                    "params dict holds tensors that are not parameters of the model; "
                    "pass names (model.named_parameters()) instead."
                )
        elif (
            isinstance(params, Sequence)
            and params
            and all(isinstance(m, nn.Module) for m in params)
        ):
            ids = {id(p) for m in params for p in m.parameters()}
            chosen = {k: p for k, p in named.items() if id(p) in ids}
        elif isinstance(params, Sequence) and all(isinstance(s, str) for s in params):
            chosen = {}
            for s in params:
                hits = [k for k in named if k == s or k.startswith(s + ".")]
                if not hits:
                    raise ValueError(
                        f"No parameter named {s!r}; available: "
                        f"{', '.join(list(named)[:10])}" + (" ..." if len(named) > 10 else "")
                    )
                chosen.update({k: named[k] for k in hits})
            chosen = {k: named[k] for k in named if k in chosen}
        else:
            raise TypeError(
                "params must be None, parameter names, a module, a list of modules "
                f"or a name -> tensor dict; got {type(params).__name__}."
            )
        frozen = [k for k, p in chosen.items() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"Parameters {frozen} do not require grad; call "
                "p.requires_grad_(True) or leave them out of params."
            )
    if not chosen:
        raise ValueError("No parameters selected: the model has none that require grad.")
    dtypes = {p.dtype for p in chosen.values()}
    if len(dtypes) > 1:
        raise TypeError(
            f"Selected parameters have mixed dtypes {dtypes}; convert the model with "
            "model.to(dtype)."
        )
    return chosen


_PARAMS_DIFFER = (
    "The model parameters differ between ranks; data-parallel curvature needs the same "
    "parameters on every rank (broadcast them from rank 0, e.g. by wrapping the model in "
    "DistributedDataParallel, or seed the initialisation identically). If they were changed "
    "after the operator was built (an optimizer step, a p.data write), change them "
    "identically on every rank."
)


def _is_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], Tensor)
        and (isinstance(data[0], (Tensor, tuple, list)))
    )


class Objective:
    """Model, loss and data bound into one function of the selected parameters.

    Args:
        model: a ``torch.nn.Module``.
        loss_fn: a loss with ``reduction`` in ``{"mean", "sum"}`` (e.g.
            ``nn.CrossEntropyLoss()``), or any callable ``(outputs, targets) -> scalar`` with
            ``reduction`` given explicitly.
        data: one ``(X, y)`` batch or a re-iterable of batches (list, ``DataLoader``). ``X``
            may be a tuple of tensors (passed as ``model(*X)``).
        params: parameter selection, see :func:`resolve_params`.
        train_mode: evaluate the model in train mode (default ``False``: eval mode, which
            makes BatchNorm use running statistics and disables Dropout).
        allow_dropout: allow Dropout in train mode (the operator is then random).
        weight_decay: adds ``0.5 * weight_decay * ||theta||^2`` (curvature ``+ weight_decay * I``).
        regularizer: optional ``params_dict -> scalar`` added to the loss.
        reduction: override for loss callables without a ``reduction`` attribute.
        check_determinism: probe the data and model once for randomness.
        distributed: all-reduce over ``torch.distributed`` (default: when it is initialised).
            Each rank passes its own shard of the data; the model (e.g. the ``.module`` of a
            ``DistributedDataParallel`` wrapper, unwrapped automatically) must hold the same
            parameters on every rank (checked once).
        process_group: the ``torch.distributed`` group to reduce over (default: the world).
        micro_batch_size: split every batch into chunks of at most this many samples (exact
            normalisation is kept). Bounds the memory of one forward/backward pass.
        accumulation_dtype: dtype of the sums over chunks, batches and ranks. Default:
            ``torch.float64`` for lower-precision parameters when more than one term is
            summed (several chunks or ranks), else the parameter dtype.

    Raises:
        ValueError: bad reduction, empty data, non-deterministic data or model, parameters
            that differ between ranks, ``micro_batch_size < 1``.
        TypeError: wrong kinds of model, data or parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Any,
        *,
        params: Any = None,
        train_mode: bool = False,
        allow_dropout: bool = False,
        weight_decay: float = 0.0,
        regularizer: Callable[[dict[str, Tensor]], Tensor] | None = None,
        reduction: str | None = None,
        check_determinism: bool = True,
        distributed: bool | None = None,
        process_group: Any = None,
        micro_batch_size: int | None = None,
        accumulation_dtype: torch.dtype | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # double backward must not trigger DDP's gradient hooks
        self.model = model
        self.loss_fn = loss_fn
        red = reduction if reduction is not None else getattr(loss_fn, "reduction", None)
        if red not in ("mean", "sum"):
            raise ValueError(
                f"The loss must reduce to a scalar with reduction 'mean' or 'sum'; got "
                f"reduction={red!r} from {type(loss_fn).__name__}. Use e.g. "
                "nn.CrossEntropyLoss(reduction='mean'), or pass reduction='mean'|'sum' for a "
                "custom loss callable."
            )
        self.reduction = red
        self.params = resolve_params(model, params)
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.n = sum(p.numel() for p in self.params.values())
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.regularizer = regularizer
        self.train_mode = bool(train_mode)
        self.micro_batch_size = (
            None if micro_batch_size is None else check_int(micro_batch_size, "micro_batch_size")
        )
        self._apply_mode_policy(allow_dropout)

        if _is_batch(data):
            self._data: Iterable = [tuple(data)]
        else:
            if isinstance(data, Iterator):
                raise TypeError(
                    "data is a one-shot iterator (e.g. a generator); curvature needs "
                    "to pass over the data many times. Pass a list of batches or a "
                    "DataLoader."
                )
            if not isinstance(data, Iterable):
                raise TypeError(
                    "data must be an (X, y) pair of tensors or an iterable of them "
                    f"(list, DataLoader); got {type(data).__name__}."
                )
            self._data = data
        sizes = [self._batch_size(b) for b in self._data]
        if not sizes:
            raise ValueError("data is empty: expected at least one (X, y) batch.")
        self.num_batches = len(sizes)
        self.batch_sizes = sizes
        self.local_N = sum(sizes)
        if distributed is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError(
                "distributed=True but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group(...) first, or pass distributed=False."
            )
        self.distributed = bool(distributed)
        self.process_group = process_group
        self.world_size = torch.distributed.get_world_size(process_group) if self.distributed else 1
        if accumulation_dtype is None:
            many = len(self.chunk_sizes) > 1 or self.world_size > 1
            low = self.dtype.is_floating_point and torch.finfo(self.dtype).bits < 64
            accumulation_dtype = torch.float64 if (many and low) else self.dtype
        if not (
            isinstance(accumulation_dtype, torch.dtype) and accumulation_dtype.is_floating_point
        ):
            raise TypeError(
                f"Invalid accumulation_dtype={accumulation_dtype!r}; must be a floating "
                "torch.dtype such as torch.float64."
            )
        self.accumulation_dtype = accumulation_dtype
        N = torch.tensor(float(self.local_N), dtype=torch.float64, device=self.device)
        self.all_reduce(N)
        self.N = int(N.item())
        if self.distributed:
            self._check_same_params()
        if check_determinism:
            self._probe_determinism(allow_dropout)

    @property
    def chunk_sizes(self) -> list[int]:
        """Local sizes of the chunks the data loop visits (batches split by micro-batching)."""
        m = self.micro_batch_size
        if m is None:
            return list(self.batch_sizes)
        out = []
        for B in self.batch_sizes:
            out.extend([m] * (B // m) + ([B % m] if B % m else []))
        return out

    def _check_same_params(self) -> None:
        self.check_same_across_ranks([], "", with_params=True)

    def check_same_across_ranks(
        self, tensors: Sequence[Tensor], message: str, *, with_params: bool = False
    ) -> None:
        """Raise ``ValueError(message)`` on every rank if ``tensors`` differ between ranks.

        Compares checksums (sum and norm, relative tolerance ``1e-6``, so that different
        thread counts on the ranks do not matter) with one small ``MAX`` all-reduce; no copy
        of the tensors is made. With ``with_params=True`` the same all-reduce also compares
        the parameters (every rank must call this, whatever changed locally, so that all
        ranks run the same collectives); parameters that differ raise the parameter error
        on every rank. A no-op when not distributed.
        """
        if not self.distributed:
            return
        dist = torch.distributed
        with torch.no_grad():
            parts = [torch.zeros(2, dtype=torch.float64, device=self.device)]
            if tensors:
                parts[0] = torch.stack(
                    [
                        torch.stack([t.sum().double() for t in tensors]).sum(),
                        torch.stack([torch.linalg.vector_norm(t).double() for t in tensors]).sum(),
                    ]
                )
            if with_params:
                ps = list(self.params.values())
                parts.append(torch.stack([p.sum() for p in ps]).double())
                parts.append(torch.stack(torch._foreach_norm(ps)).double())
            local = torch.cat([t.reshape(-1).to(self.device) for t in parts])
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        h = local.numel()
        hi, lo = both[:h], -both[h:]
        bad = (hi - lo).abs() > 1e-6 * torch.maximum(hi.abs(), lo.abs()) + 1e-30
        if with_params and bool(bad[2:].any()):
            raise ValueError(_PARAMS_DIFFER)
        if bool(bad[:2].any()):
            raise ValueError(message)

    # -- policy -------------------------------------------------------------------------
    def _apply_mode_policy(self, allow_dropout: bool) -> None:
        has_bn = any(isinstance(m, _BN) for m in self.model.modules())
        self._has_dropout = any(isinstance(m, _DROPOUT) and m.p > 0 for m in self.model.modules())
        if self.train_mode:
            if self._has_dropout and not allow_dropout:
                raise ValueError(
                    "train_mode=True with Dropout makes every curvature product "
                    "random. Use train_mode=False (eval mode), or pass "
                    "allow_dropout=True if you really want a random operator."
                )
            if has_bn:
                warn_once(
                    "Evaluating BatchNorm in train mode: batch statistics couple the "
                    "samples of a batch, so the curvature depends on the batching"
                    + (" (and on micro_batch_size)." if self.micro_batch_size is not None else ".")
                )
        elif self.model.training and (has_bn or self._has_dropout):
            warn_once(
                "The model is in train mode; hesse evaluates curvature in eval mode "
                "(BatchNorm running statistics, no Dropout). Pass train_mode=True to "
                "change this."
            )

    @contextlib.contextmanager
    def mode(self):
        """Put the model in the policy's mode for the duration, then restore it."""
        was = self.model.training
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            self.model.train(was)

    @contextlib.contextmanager
    def curvature_mode(self):
        """:meth:`mode` plus the twice-differentiable (math) attention backend.

        Used around every graph that second-order products differentiate through.
        """
        with self.mode(), math_attention():
            yield

    def _probe_determinism(self, allow_dropout: bool) -> None:
        if not isinstance(self._data, list):
            a, b = next(iter(self._data)), next(iter(self._data))
            if not (_tree_equal(a[0], b[0]) and torch.equal(a[1], b[1])):
                raise ValueError(
                    "The data iterable yields different batches on each pass (a DataLoader with "
                    "shuffle=True or random augmentation?). Curvature needs the same data every "
                    "pass: use shuffle=False, or materialise a fixed list of batches."
                )
        if self._has_dropout and allow_dropout and self.train_mode:
            return
        X, _ = next(iter(self._data))
        with torch.no_grad(), self.mode():
            o1, o2 = self.forward(X), self.forward(X)
        check_finite(o1, "the model outputs on the first batch")
        if not torch.equal(o1, o2):
            raise ValueError(
                "The model gives different outputs for the same input (a random "
                "layer?). Curvature needs a deterministic function."
            )

    # -- data ---------------------------------------------------------------------------
    @staticmethod
    def _batch_size(batch: Any) -> int:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"Each batch must be an (X, y) pair; got {type(batch).__name__}.")
        y = batch[1]
        if not isinstance(y, Tensor) or y.ndim == 0:
            raise TypeError(
                "Batch targets y must be a tensor with a batch dimension; got "
                f"{type(y).__name__} {getattr(y, 'shape', '')}."
            )
        return int(y.shape[0])

    def batches(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(X, y, weight)`` with the exact normalisation weight of each chunk.

        Batches are split into chunks of at most ``micro_batch_size`` samples if it is set.
        """
        m = self.micro_batch_size
        for X, y in self._data:
            if m is None or y.shape[0] <= m:
                yield X, y, self._weight(y.shape[0])
                continue
            ys = torch.split(y, m)
            if isinstance(X, (tuple, list)):
                Xs = list(zip(*(torch.split(x, m) for x in X)))
            else:
                Xs = torch.split(X, m)
            if len(Xs) != len(ys):
                raise ValueError(
                    "micro_batch_size needs inputs and targets with the same batch (first) "
                    f"dimension; got targets of size {y.shape[0]} and inputs that split into "
                    f"{len(Xs)} chunks instead of {len(ys)}."
                )
            for Xc, yc in zip(Xs, ys):
                yield Xc, yc, self._weight(yc.shape[0])

    def _weight(self, size: int) -> float:
        return size / self.N if self.reduction == "mean" else 1.0

    def forward(self, X: Any) -> Tensor:
        return self.model(*X) if isinstance(X, (tuple, list)) else self.model(X)

    def batch_loss(self, outputs: Tensor, y: Tensor, weight: float) -> Tensor:
        """Weighted loss of one batch; checks it is a finite scalar."""
        loss = self.loss_fn(outputs, y)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError(
                f"The loss must be a scalar; got shape {tuple(getattr(loss, 'shape', ()))}. "
                "Use reduction='mean' or 'sum'."
            )
        check_finite(loss, "the loss")
        return loss * weight

    def regularization(self) -> Tensor | None:
        """The regulariser ``R(theta)`` (without weight decay, which is added exactly)."""
        if self.regularizer is None:
            return None
        r = self.regularizer(dict(self.params))
        if not isinstance(r, Tensor) or r.ndim != 0:
            raise ValueError("regularizer must return a scalar tensor.")
        return r

    # -- values -------------------------------------------------------------------------
    def state_key(self) -> tuple:
        """Changes whenever a parameter's values change, by any route (cache invalidation).

        Storage and autograd version of every parameter (in-place ops, ``p.data = ...``) and
        the 2-norm of each, which also sees writes through ``p.data`` (they bypass the
        version counter). About 10 us for a few tensors; a ``p.data`` write that keeps the
        norm of every parameter exactly (a permutation, a sign flip) is not seen.
        """
        ps = list(self.params.values())
        with torch.no_grad():
            norms = torch.stack(torch._foreach_norm(ps)).tolist()
        return tuple((p.data_ptr(), p._version) for p in ps) + tuple(norms)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` in place over the ranks (a no-op when not distributed)."""
        if self.distributed:
            torch.distributed.all_reduce(t, group=self.process_group)
        return t

    def value_and_grad(self) -> tuple[Tensor, Tensor]:
        """Total loss and its flat gradient w.r.t. the selected parameters (float64 sums)."""
        plist = list(self.params.values())
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad = torch.zeros(self.n, dtype=self.accumulation_dtype, device=self.device)
        with self.mode():
            for X, y, w in self.batches():
                with torch.enable_grad():
                    loss = self.batch_loss(self.forward(X), y, w)
                    gs = torch.autograd.grad(loss, plist, allow_unused=True)
                total += loss.detach().double()
                i = 0
                for g, p in zip(gs, plist):
                    if g is not None:
                        grad[i : i + p.numel()] += g.reshape(-1)
                    i += p.numel()
                del gs, loss
        self.all_reduce(total)
        self.all_reduce(grad)
        grad = grad.to(self.dtype)
        if self.weight_decay:
            total += 0.5 * self.weight_decay * sum(p.detach().double().pow(2).sum() for p in plist)
            grad += self.weight_decay * torch.cat([p.detach().reshape(-1) for p in plist])
        with torch.enable_grad():
            r = self.regularization()
            if r is not None:
                gs = torch.autograd.grad(r, plist, allow_unused=True)
                total += r.detach().double()
                grad += torch.cat(
                    [
                        torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                        if g is None
                        else g.reshape(-1)
                        for g, p in zip(gs, plist)
                    ]
                )
        try:
            check_finite(grad, "the gradient")
        except NonFiniteError as e:
            e.partial = (total, grad)
            raise
        return total.to(self.dtype), grad

    def loss(self) -> Tensor:
        """Total loss (no gradient)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), self.mode():
            for X, y, w in self.batches():
                total += self.batch_loss(self.forward(X), y, w).double()
        self.all_reduce(total)
        with torch.no_grad():
            if self.weight_decay:
                total += (
                    0.5
                    * self.weight_decay
                    * sum(p.double().pow(2).sum() for p in self.params.values())
                )
            r = self.regularization()
            if r is not None:
                total += r.double()
        return total.to(self.dtype)


def _tree_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    return a == b
