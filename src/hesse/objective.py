"""The function whose curvature we take: model + loss + data (+ regulariser).

.. math::
    L(\\theta) = \\sum_{b} w_b\\, \\ell_b(f(X_b; \\theta), y_b)
                 + \\tfrac{1}{2}\\,\\mathrm{wd}\\,\\lVert\\theta\\rVert^2 + R(\\theta)

Losses known in output space (:class:`hesse.func.OutputLoss`: ``MSELoss``,
``CrossEntropyLoss`` incl. ``ignore_index`` and sequence outputs, ``BCEWithLogitsLoss``, and
the loss a Hugging Face model trains with when ``loss_fn=None``): ``\\ell_b`` is the *sum*
of the valid terms of batch ``b`` and, with ``reduction="mean"``, ``w_b = 1 / count`` with
``count`` the number of valid terms of the *whole data set* (valid targets for
cross-entropy, elements for MSE/BCE), so the value is exactly the mean over the
concatenated data however it is batched (padding included). Any other loss callable:
``\\ell_b`` is its value on the batch and ``w_b = B_b / N`` (``N`` samples). With
``reduction="sum"`` every ``w_b = 1``.

Batches and outputs: each batch goes through ``batch_adapter(batch) -> (inputs, targets)``
(default: ``(X, y)`` pairs; mappings such as Hugging Face batches give
``inputs = batch minus "labels"``, called as ``model(**inputs)``, and
``targets = batch["labels"]``), is moved to the model's device, and the model output goes
through ``output_adapter(output) -> Tensor`` (default: a tensor as is, else its ``logits``).

Micro-batching: with ``micro_batch_size=m`` every batch is split along its first dimension
into chunks of at most ``m`` samples, each weighted exactly like its share of the data, so the
value, gradient and every curvature product are unchanged (up to rounding) while only one
chunk's graph needs to be alive at a time (see ``cache_graph`` on the operators).

Data parallelism: under ``torch.distributed`` every rank holds its own shard of the data.
``N`` and ``count`` are global (shards may have unequal sizes), the per-rank sums of
losses, gradients and curvature products are all-reduced, and the regulariser and weight
decay are added once, after the reduction. Every rank then sees the same function and the
same operator, so algorithms run unchanged and give identical results on all ranks.

Models are left as they were: each module's ``training`` flag is restored individually,
and BatchNorm running statistics (``num_batches_tracked`` included) are untouched by
train-mode evaluations.

Reductions (over chunks, batches and ranks) are accumulated in ``accumulation_dtype``:
float64 by default for lower-precision models whenever more than one term is summed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import NonFiniteError, check_finite, check_int, check_nonnegative, warn_once
from .func import OutputLoss, output_loss

__all__ = [
    "Objective",
    "default_batch_adapter",
    "default_loss",
    "default_output_adapter",
    "math_attention",
    "resolve_params",
]


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


# -- batches and outputs as users have them ---------------------------------------------------


def default_batch_adapter(batch: Any) -> tuple[Any, Tensor]:
    """``(X, y)`` pairs as they are; mappings as Hugging Face batches.

    A mapping gives ``inputs = {k: v for k != "labels"}`` (the model is called as
    ``model(**inputs)``) and ``targets = batch["labels"]``. Batches of another form,
    e.g. ``(X1, X2, y)``, need an explicit ``batch_adapter`` such as
    ``lambda b: ((b[0], b[1]), b[2])``.
    """
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                f"A dict batch needs a 'labels' key (the targets, as in Hugging Face); got keys "
                f"{sorted(map(str, batch))}. Add the labels, or pass "
                "batch_adapter=lambda b: (inputs, targets)."
            )
        return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise TypeError(
        f"Each batch must be an (X, y) pair or a mapping with 'labels'; got {what}. For "
        "other layouts pass batch_adapter=lambda b: (inputs, targets), e.g. "
        "lambda b: ((b[0], b[1]), b[2]) for (X1, X2, y)."
    )


def default_output_adapter(output: Any) -> Tensor:
    """A tensor as it is; an object or mapping with ``logits`` (a Hugging Face
    ``ModelOutput``) gives its logits (said once); anything else is refused."""
    if isinstance(output, Tensor):
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    if isinstance(logits, Tensor):
        warn_once(
            f"The model returns a {type(output).__name__}; hesse takes its .logits as the "
            "outputs (pass output_adapter=... to choose otherwise)."
        )
        return logits
    raise TypeError(
        f"The model returned a {type(output).__name__}, not a tensor, and it has no "
        "'logits'. Pass output_adapter=lambda out: <the output tensor>, e.g. "
        "lambda out: out[0]."
    )


_CAUSAL = ("ForCausalLM", "LMHeadModel")
_TOKENS = ("ForMaskedLM", "ForTokenClassification")
_CLASSIFY = ("ForSequenceClassification", "ForImageClassification")


def default_loss(model: nn.Module) -> OutputLoss:
    """The loss a Hugging Face model trains with, in output space (``loss_fn=None``).

    * causal LM (``...ForCausalLM``, ``...LMHeadModel``): cross-entropy of
      ``logits[:, :-1]`` against ``labels[:, 1:]``, ``-100`` ignored;
    * masked LM and token classification: cross-entropy of ``logits (B, T, V)`` against
      ``labels (B, T)``, ``-100`` ignored;
    * sequence and image classification: cross-entropy on ``labels`` (``problem_type=
      "multi_label_classification"``: ``BCEWithLogitsLoss``).

    All with ``reduction="mean"`` over the valid targets of the whole data set.

    Raises:
        ValueError: another kind of model; pass ``loss_fn``.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    if name.endswith(_CAUSAL):
        return OutputLoss("ce", class_dim=-1, shift=True)
    if name.endswith(_TOKENS):
        return OutputLoss("ce", class_dim=-1)
    if name.endswith(_CLASSIFY):
        if problem == "multi_label_classification":
            return OutputLoss("bce")
        if problem == "regression" or getattr(config, "num_labels", 2) == 1:
            raise ValueError(
                f"{name} with one label is a regression head (HF squeezes its outputs "
                "before MSE); pass loss_fn=nn.MSELoss() and targets of the logits' shape."
            )
        return OutputLoss("ce")
    raise ValueError(
        f"loss_fn=None means the loss the model trains with, known for Hugging Face causal "
        f"LM, masked LM, token, sequence and image classification heads; got {name}. Pass "
        "loss_fn=..., e.g. nn.CrossEntropyLoss()."
    )


def _is_batch(data: Any) -> bool:
    """Whether ``data`` is one batch rather than an iterable of batches."""
    if isinstance(data, Mapping):
        return True
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        return False
    if all(isinstance(t, Tensor) for t in data):
        return True
    return (
        len(data) == 2
        and isinstance(data[1], Tensor)
        and isinstance(data[0], (Tensor, tuple, list, Mapping))
    )


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x if x.device == device else x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return (
            type(x)(_to_device(v, device) for v in x)
            if isinstance(x, tuple)
            else [_to_device(v, device) for v in x]
        )
    return x


def _split(x: Any, m: int, B: int) -> list[Any]:
    """Split the batch dimension (size ``B``) of every tensor in ``x`` into chunks of ``m``."""
    n = -(-B // m)
    if isinstance(x, Tensor):
        if x.ndim == 0 or x.shape[0] != B:
            raise ValueError(
                "micro_batch_size needs inputs and targets with the same batch (first) "
                f"dimension; got targets of size {B} and an input of shape {tuple(x.shape)}."
            )
        return list(torch.split(x, m))
    if isinstance(x, Mapping):
        parts = {k: _split(v, m, B) for k, v in x.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    if isinstance(x, (tuple, list)):
        parts = [_split(v, m, B) for v in x]
        return [tuple(p[i] for p in parts) for i in range(n)]
    return [x] * n


class Objective:
    """Model, loss and data bound into one function of the selected parameters.

    Args:
        model: a ``torch.nn.Module`` (not a ``torch.compile`` wrapper: pass
            ``model._orig_mod``).
        loss_fn: a loss with ``reduction`` in ``{"mean", "sum"}`` (e.g.
            ``nn.CrossEntropyLoss()``), a :class:`hesse.func.OutputLoss` (e.g.
            ``hesse.func.output_loss(nn.CrossEntropyLoss(), class_dim=-1)`` for logits
            ``(B, T, V)``), any callable ``(outputs, targets) -> scalar`` with ``reduction``
            given explicitly, or ``None`` for the loss a Hugging Face model trains with
            (:func:`default_loss`).
        data: one batch or a re-iterable of batches (list, ``DataLoader``), each read by
            ``batch_adapter``. ``X`` may be a tuple of tensors (``model(*X)``) or a mapping
            (``model(**X)``).
        params: parameter selection, see :func:`resolve_params`.
        batch_adapter: ``batch -> (inputs, targets)``; default
            :func:`default_batch_adapter`.
        output_adapter: ``model output -> Tensor``; default
            :func:`default_output_adapter`.
        train_mode: evaluate the model in train mode (default ``False``: eval mode, which
            makes BatchNorm use running statistics and disables Dropout). Running statistics
            are left untouched either way.
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

    Attributes:
        output_loss: the :class:`hesse.func.OutputLoss` when the loss is known in output
            space, else ``None`` (Hessian and GGN then go through autograd).
        N: number of samples (global); ``count``: number of terms the mean divides by.

    Raises:
        ValueError: bad reduction, empty data or batch, targets that do not fit the outputs
            or the loss, non-deterministic data or model, parameters that differ between
            ranks, ``micro_batch_size < 1``.
        TypeError: wrong kinds of model, data, batches, outputs or parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        data: Any,
        *,
        params: Any = None,
        batch_adapter: Callable[[Any], tuple[Any, Tensor]] | None = None,
        output_adapter: Callable[[Any], Tensor] | None = None,
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
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            raise TypeError(
                "model is a torch.compile'd module; compiled graphs do not support the double "
                "backward curvature needs. Pass the original module, model._orig_mod."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # double backward must not trigger DDP's gradient hooks
        self.model = model
        self.loss_fn = default_loss(model) if loss_fn is None else loss_fn
        red = getattr(self.loss_fn, "reduction", None)
        if reduction is not None:
            if red is not None and reduction != red:
                raise ValueError(
                    f"reduction={reduction!r} conflicts with the loss's own reduction={red!r}; "
                    "set it on the loss instead."
                )
            red = reduction
        if red not in ("mean", "sum"):
            raise ValueError(
                f"The loss must reduce to a scalar with reduction 'mean' or 'sum'; got "
                f"reduction={red!r} from {type(self.loss_fn).__name__}. Use e.g. "
                "nn.CrossEntropyLoss(reduction='mean'), or pass reduction='mean'|'sum' for a "
                "custom loss callable."
            )
        try:
            self.output_loss: OutputLoss | None = output_loss(self.loss_fn)
        except NotImplementedError:
            self.output_loss = None
        self.reduction = red
        self.batch_adapter = batch_adapter or default_batch_adapter
        self.output_adapter = output_adapter or default_output_adapter
        self.params = resolve_params(model, params)
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        self.sizes = [s.numel() for s in self.shapes]
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
            self._data: Iterable = [data]
        else:
            if isinstance(data, Iterator):
                raise TypeError(
                    "data is a one-shot iterator (e.g. a generator); curvature needs "
                    "to pass over the data many times. Pass a list of batches or a "
                    "DataLoader."
                )
            if not isinstance(data, Iterable) or isinstance(data, (str, Tensor)):
                raise TypeError(
                    "data must be one batch ((X, y) pair or mapping) or an iterable of them "
                    f"(list, DataLoader); got {type(data).__name__}."
                )
            self._data = data
        self._scan()
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
        totals = torch.tensor(
            [float(self.local_N), float(self.local_count)], dtype=torch.float64, device=self.device
        )
        self.all_reduce(totals)
        N, count = totals.tolist()
        self.N, self.count = int(N), int(count)
        if self.reduction == "mean" and self.count == 0:
            raise ValueError(
                "Every target of the data is ignored (ignore_index): the mean loss is 0/0. "
                "Check the labels (padding should be -100 only where there is no token)."
            )
        if self.distributed:
            self._check_same_params()
        if check_determinism:
            self._probe_determinism(allow_dropout)

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
        self._bn = [m for m in self.model.modules() if isinstance(m, _BN)]
        has_bn = bool(self._bn)
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
        """Put the model in the policy's mode for the duration, then restore it.

        Every module's own ``training`` flag is restored (an eval-mode submodule inside a
        train-mode wrapper stays in eval mode), and in train mode BatchNorm updates fresh
        copies of its running statistics, so the model's own buffers
        (``running_mean``, ``running_var``, ``num_batches_tracked``) never change.
        """
        flags = [(m, m.training) for m in self.model.modules()]
        swapped = []
        if self.train_mode:
            for m in self._bn:
                for k in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = m._buffers.get(k)
                    if buf is not None:
                        swapped.append((m, k, buf))
                        m._buffers[k] = buf.clone()
        self.model.train(self.train_mode)
        try:
            yield
        finally:
            for m, was in flags:
                m.training = was
            for m, k, buf in swapped:
                m._buffers[k] = buf

    @contextlib.contextmanager
    def curvature_mode(self):
        """:meth:`mode` plus the twice-differentiable (math) attention backend.

        Used around every graph that second-order products differentiate through.
        """
        with self.mode(), math_attention():
            yield

    def _first_batch(self) -> Any:
        for batch in self._data:
            return batch
        raise ValueError(
            "The data yielded no batches on its second pass: it must be re-iterable (an "
            "iterable that exhausts, like a generator inside a class?). Pass a list of "
            "batches or a DataLoader."
        )

    def _probe_determinism(self, allow_dropout: bool) -> None:
        if not isinstance(self._data, list):
            (Xa, ya), (Xb, yb) = (
                self.adapt(self._first_batch(), 0),
                self.adapt(self._first_batch(), 0),
            )
            if not (_tree_equal(Xa, Xb) and torch.equal(ya, yb)):
                raise ValueError(
                    "The data iterable yields different batches on each pass (a DataLoader with "
                    "shuffle=True or random augmentation?). Curvature needs the same data every "
                    "pass: use shuffle=False, or materialise a fixed list of batches."
                )
        X, y = self.adapt(self._first_batch(), 0)
        X, y = _to_device(X, self.device), _to_device(y, self.device)
        self._where = "batch 0"
        with torch.no_grad(), self.mode():
            o1 = self.forward(X)
            check_finite(o1, "the model outputs on the first batch")
            self.check_targets(o1, y)
            if self._has_dropout and allow_dropout and self.train_mode:
                return
            o2 = self.forward(X)
        self._where = ""
        if not torch.equal(o1, o2):
            raise ValueError(
                "The model gives different outputs for the same input (a random "
                "layer?). Curvature needs a deterministic function."
            )

    # -- data ---------------------------------------------------------------------------
    def adapt(self, batch: Any, index: int | None = None) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of one raw batch through ``batch_adapter`` (checked)."""
        out = self.batch_adapter(batch)
        at = "" if index is None else f" of batch {index}"
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                f"batch_adapter must return an (inputs, targets) pair; got "
                f"{type(out).__name__}{at}."
            )
        X, y = out
        if not isinstance(y, Tensor) or y.ndim == 0:
            raise TypeError(
                f"Batch targets must be a tensor with a batch dimension; got "
                f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}{at}."
            )
        if y.shape[0] == 0:
            raise ValueError(f"Batch {index} is empty (0 targets); drop empty batches.")
        return X, y

    def _scan(self) -> None:
        """One pass over the data: sizes, valid-target counts, label ranges (one sync)."""
        sizes, counts, ranges = [], [], []
        ol = self.output_loss
        for i, batch in enumerate(self._data):
            _, y = self.adapt(batch, i)
            sizes.append(int(y.shape[0]))
            if ol is not None:
                ol.check_dtype(y, f"batch {i}")
                counts.append(ol.count(y).to(self.device, torch.float64))
                r = ol.label_range(y)
                if r is not None:
                    ranges.append(r.to(self.device))
        if not sizes:
            raise ValueError("data is empty: expected at least one batch.")
        self.num_batches = len(sizes)
        self.batch_sizes = sizes
        self.local_N = sum(sizes)
        self.local_count = int(torch.stack(counts).sum().item()) if counts else self.local_N
        self._label_ranges = torch.stack(ranges).tolist() if ranges else None
        self._labels_checked = False

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

    def batches(self) -> Iterator[tuple[Any, Tensor, float]]:
        """Yield ``(inputs, targets, weight)`` per chunk, on the model's device.

        ``weight`` multiplies the chunk's loss as :meth:`batch_loss` computes it: the *sum*
        over its valid terms for a loss known in output space (``1 / count`` for the mean,
        ``1`` for the sum), else ``loss_fn``'s value (``B / N`` for the mean). Batches are
        split into chunks of at most ``micro_batch_size`` samples if it is set.
        """
        m = self.micro_batch_size
        seen = 0
        for i, batch in enumerate(self._data):
            X, y = self.adapt(batch, i)
            X, y = _to_device(X, self.device), _to_device(y, self.device)
            seen += 1
            self._where = f"batch {i}"
            B = y.shape[0]
            if m is None or B <= m:
                yield X, y, self._weight(B)
                continue
            for Xc, yc in zip(_split(X, m, B), torch.split(y, m)):
                yield Xc, yc, self._weight(yc.shape[0])
        self._where = ""
        if seen != self.num_batches:
            raise ValueError(
                f"The data yielded {seen} batches on this pass but {self.num_batches} on the "
                "first: it must be re-iterable with the same batches every pass (an iterable "
                "that exhausts, like a generator inside a class?). Pass a list of batches or a "
                "DataLoader."
            )

    def _weight(self, size: int) -> float:
        if self.reduction == "sum":
            return 1.0
        if self.output_loss is not None:
            return 1.0 / self.count
        return size / self.N

    def call_args(self, X: Any) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model is called with for inputs ``X``."""
        if isinstance(X, Mapping):
            return (), dict(X)
        if isinstance(X, (tuple, list)):
            return tuple(X), {}
        return (X,), {}

    def forward(self, X: Any) -> Tensor:
        """Model outputs for inputs ``X``, through ``output_adapter``."""
        args, kwargs = self.call_args(X)
        return self.adapt_output(self.model(*args, **kwargs))

    def adapt_output(self, output: Any) -> Tensor:
        out = self.output_adapter(output)
        if not isinstance(out, Tensor):
            raise TypeError(f"output_adapter must return a tensor; got {type(out).__name__}.")
        return out

    def check_targets(self, outputs: Tensor, y: Tensor) -> None:
        """Raise a clear error if the targets do not fit the outputs and the loss."""
        ol = self.output_loss
        if ol is None:
            return
        where = getattr(self, "_where", "")
        ol.check(outputs, y, where)
        if self._labels_checked or self._label_ranges is None:
            return
        if not self._soft_targets(outputs, y):
            C = outputs.shape[ol._cdim(outputs)]
            for i, (lo, hi) in enumerate(self._label_ranges):
                if lo <= hi and (lo < 0 or hi >= C):
                    bad = lo if lo < 0 else hi
                    raise ValueError(
                        f"CrossEntropyLoss target {bad} in batch {i} is out of range for "
                        f"{C} classes: targets must lie in [0, {C - 1}] or equal "
                        f"ignore_index={ol.ignore_index}."
                    )
        self._labels_checked = True

    def _soft_targets(self, outputs: Tensor, y: Tensor) -> bool:
        return self.output_loss is not None and self.output_loss._soft(outputs, y)

    def batch_loss(self, outputs: Tensor, y: Tensor, weight: float, check: bool = True) -> Tensor:
        """Weighted loss of one chunk (see :meth:`batches`); checks it is a finite scalar.

        ``check=False`` skips the checks (inside ``torch.func`` transforms).
        """
        if self.output_loss is not None:
            if check:
                self.check_targets(outputs, y)
            loss = self.output_loss.sum_loss(outputs, y) * weight
            if check:
                check_finite(loss, "the loss")
            return loss
        loss = self.loss_fn(outputs, y)
        if check:
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(
                    f"The loss must be a scalar; got shape "
                    f"{tuple(getattr(loss, 'shape', ()))}. Use reduction='mean' or 'sum'."
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
        ps = self.params.values()
        where = tuple((p.data_ptr(), p._version) for p in ps)
        if where != getattr(self, "_alias_key", None):
            # detached aliases share storage and version: their norms need no autograd
            self._aliases = [p.detach() for p in ps]
            self._alias_key = where
        return where + tuple(torch.stack(torch._foreach_norm(self._aliases)).tolist())

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
    if isinstance(a, Mapping):
        return (
            isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(_tree_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    return a == b
