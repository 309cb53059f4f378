"""Pre-flight: predict the peak memory and time of curvature products before a long run.

:func:`estimate` runs the operator's own graph building and product on two small slices of
the largest chunk of data (``b1 < b2`` samples), measures what they allocate and how long they
take, and extrapolates linearly in the number of samples to the configuration of the operator
(all chunks, ``cache_graph``, ``micro_batch_size``, ``k`` columns per product):

.. math::
    M(b) = M_0 + m_1 b, \\qquad T(b) = T_0 + t_1 b,

fitted separately for the memory a chunk's graph keeps (``R``), the transient peak while it is
built (``P_build``) and the transient peak of one product through it (``P_prod``). With cached
graphs the peak of the first product is

.. math::
    \\max_j \\Big(\\textstyle\\sum_{i<j} R(c_i) + P_\\text{build}(c_j)\\Big),\\;
    \\textstyle\\sum_i R(c_i) + \\max_j P_\\text{prod}(c_j)

(plus the product's input, accumulator and output vectors); without caching it is
``max_j (R(c_j) + P_prod(c_j))``. Allocations are counted exactly (every tensor storage
created by an aten op, freed when its last reference dies), so the prediction is independent
of allocator caching; the predicted process peak adds the resident set size at the time of
the estimate.
"""

from __future__ import annotations

import math
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .._checks import check_int, check_nonnegative
from ..func._ravel import unravel_block
from ..operators.curvature import CurvatureOperator, HessianOperator

__all__ = ["PreflightEstimate", "estimate", "AllocationTracker", "process_memory"]


class AllocationTracker(TorchDispatchMode):
    """Count the bytes of tensor storages allocated by aten ops while active.

    ``live`` is the number of bytes allocated inside the context that are still referenced,
    ``peak`` its maximum (reset with :meth:`reset_peak`). Views and in-place results that
    alias an input are not new allocations. Works on CPU and GPU alike (it never asks the
    allocator, so cached-but-free blocks are not counted).

    Example:
        >>> with AllocationTracker() as tr:
        ...     a = torch.ones(1000, dtype=torch.float64)
        ...     del a
        >>> tr.peak, tr.live
        (8000, 0)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._refs:
                continue
            if inputs is None:
                inputs = {
                    a.untyped_storage()._cdata
                    for a in tree_flatten((args, kwargs))[0]
                    if isinstance(a, Tensor) and a.device.type != "meta"
                }
            if key in inputs:
                continue
            nb = st.nbytes()
            self.live += nb
            self.peak = max(self.peak, self.live)
            self._refs[key] = weakref.ref(st, lambda _r, k=key, n=nb: self._free(k, n))
        return out


def process_memory() -> dict[str, int | None]:
    """Resident set size, its high-water mark and available system memory, in bytes.

    Read from ``/proc`` on Linux; ``None`` where unavailable.
    """
    out: dict[str, int | None] = {"rss": None, "peak_rss": None, "available": None}
    try:
        with open("/proc/self/status") as f:
            s = f.read()
        for key, name in (("rss", "VmRSS"), ("peak_rss", "VmHWM")):
            m = re.search(rf"{name}:\s+(\d+)\s+kB", s)
            out[key] = int(m.group(1)) * 1024 if m else None
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+)\s+kB", f.read())
        out["available"] = int(m.group(1)) * 1024 if m else None
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


@dataclass(frozen=True)
class PreflightEstimate:
    """Predicted cost of curvature products with one operator (see :func:`estimate`).

    Attributes:
        n: number of parameters.
        num_vectors: columns per product (``k``) the figures refer to.
        chunk_sizes: local sizes of the chunks one product visits.
        cache_graph: whether graphs are kept between products.
        param_bytes: memory of the selected parameters (already resident).
        graph_bytes: memory the cached graphs keep between products (0 if not cached).
        extra_peak_bytes: predicted peak allocation above the current state during the first
            product (graphs, temporaries, input/accumulator/output vectors and
            ``extra_vectors``).
        baseline_bytes: resident set size of the process before the probes (``None`` off
            Linux).
        peak_bytes: predicted peak resident set size, ``baseline_bytes + extra_peak_bytes``.
            The allocations are predicted to about 1% (measured on GPT models of 10M-294M
            parameters); the resident set also holds allocator fragmentation and memory
            outside tensors, so the measured peak RSS was 15-25% above this figure
            (``benchmarks/README.md``): keep that margin when sizing a machine.
        available_bytes: memory available on the machine when estimated.
        seconds_per_product: predicted time of one product of ``k`` columns, graphs cached.
        seconds_first_product: the first product, which builds the graphs.
        seconds_per_matvec: ``seconds_per_product / k``.
        probe_sizes: the two sample counts measured.
        converged: ``True`` when the linear fits are well determined (two distinct probe
            sizes); ``False`` if only one size could be measured (a chunk of one sample).
    """

    n: int
    num_vectors: int
    chunk_sizes: tuple[int, ...]
    cache_graph: bool
    param_bytes: int
    graph_bytes: int
    extra_peak_bytes: int
    baseline_bytes: int | None
    peak_bytes: int | None
    available_bytes: int | None
    seconds_per_product: float
    seconds_first_product: float
    seconds_per_matvec: float
    probe_sizes: tuple[int, int]
    converged: bool

    @property
    def fits(self) -> bool | None:
        """Whether the predicted extra memory fits in the memory available now."""
        if self.available_bytes is None:
            return None
        return self.extra_peak_bytes <= self.available_bytes

    def seconds_for(self, num_products: int) -> float:
        """Predicted time of ``num_products`` products (the first builds the graphs)."""
        if num_products <= 0:
            return 0.0
        return self.seconds_first_product + (num_products - 1) * self.seconds_per_product

    def __str__(self) -> str:
        gb = 1024**3

        def g(x: int | None) -> str:
            return "n/a" if x is None else f"{x / gb:.2f} GiB"

        return (
            f"pre-flight: n={self.n:,} parameters ({g(self.param_bytes)}), "
            f"{len(self.chunk_sizes)} chunk(s) of <= {max(self.chunk_sizes)} samples, "
            f"k={self.num_vectors}, cache_graph={self.cache_graph}\n"
            f"  peak memory ~ {g(self.peak_bytes)} "
            f"(+{g(self.extra_peak_bytes)} over now; graphs {g(self.graph_bytes)}; "
            f"available {g(self.available_bytes)})\n"
            f"  time per product ~ {self.seconds_per_product:.3g} s "
            f"(first, building graphs: {self.seconds_first_product:.3g} s)"
        )


def _fit(b: tuple[int, int], v: tuple[float, float]) -> tuple[float, float]:
    """Line through two points, slope and intercept clamped to be non-negative."""
    if b[0] == b[1]:
        return max(v[0], v[1]), 0.0
    slope = max(0.0, (v[1] - v[0]) / (b[1] - b[0]))
    return max(0.0, v[1] - slope * b[1]), slope


def _slice(X: Any, b: int) -> Any:
    if isinstance(X, (tuple, list)):
        return type(X)(x[:b] for x in X)
    return X[:b]


def estimate(
    op_or_model: CurvatureOperator | nn.Module,
    loss_fn: Any = None,
    data: Any = None,
    *,
    num_vectors: int = 1,
    extra_vectors: float = 0,
    probe_size: int | None = None,
    generator: torch.Generator | None = None,
    **operator_kwargs: Any,
) -> PreflightEstimate:
    """Predict peak memory and time per product of a curvature operator before using it.

    Runs the operator's graph building and one product on two slices (``b1 = b2 // 2`` and
    ``b2`` samples, default ``b2 = ceil(B / 2)`` for the largest chunk of ``B`` samples) of
    its data, counting allocated bytes exactly and timing them, and extrapolates linearly in
    the number of samples to every chunk the operator visits (see the module docstring).

    Cost: four graph builds and four products on ``b1`` and ``b2`` samples (with the
    defaults about 1.5 first products of a single-chunk operator): one pass counts memory
    (and warms up), a second, untracked pass is timed (process CPU time, scaled to wall
    time by the pass's overall wall/CPU ratio, which is robust on a busy machine). The
    operator's cached graphs (if any) are dropped first so that the estimate starts from
    the state of a fresh run.

    Args:
        op_or_model: a curvature operator (``HessianOperator``, ``GGNOperator``,
            ``FisherOperator``), or a model, in which case ``loss_fn``, ``data`` and
            ``operator_kwargs`` build a ``HessianOperator``.
        loss_fn, data: see :class:`hesse.Objective` (only with a model).
        num_vectors: columns ``k`` per product (a block Lanczos or a batched trace probe).
        extra_vectors: parameter-sized vectors the algorithm keeps besides the product's own
            input and output (e.g. 2 for a three-term Lanczos recurrence, the basis size for
            full reorthogonalisation); added to the memory.
        probe_size: ``b2``; default half the largest chunk.
        generator: for the random probe vectors.
        **operator_kwargs: passed to ``HessianOperator`` with a model (``params``,
            ``micro_batch_size``, ``cache_graph``, ...).

    Returns:
        A :class:`PreflightEstimate`; ``print(est)`` gives a summary.

    Raises:
        TypeError: if ``op_or_model`` is neither a curvature operator nor a module.
        ValueError: bad ``num_vectors``, ``extra_vectors`` or ``probe_size``.

    Example:
        >>> model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
        >>> X, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        >>> est = estimate(model, nn.CrossEntropyLoss(), (X, y))
        >>> est.n, est.probe_sizes
        (451, (16, 32))
    """
    if isinstance(op_or_model, CurvatureOperator):
        if loss_fn is not None or data is not None or operator_kwargs:
            raise TypeError(
                "estimate(op) takes no loss_fn, data or operator arguments; they belong to "
                "the operator. Pass a model to build a HessianOperator instead."
            )
        op = op_or_model
    elif isinstance(op_or_model, nn.Module):
        if loss_fn is None or data is None:
            raise TypeError("estimate(model, loss_fn, data, ...) needs loss_fn and data.")
        op = HessianOperator(op_or_model, loss_fn, data, **operator_kwargs)
    else:
        raise TypeError(
            "estimate expects a hesse curvature operator (HessianOperator, GGNOperator, "
            f"FisherOperator) or a torch.nn.Module; got {type(op_or_model).__name__}."
        )
    k = check_int(num_vectors, "num_vectors")
    extra_vectors = check_nonnegative(extra_vectors, "extra_vectors")
    ob = op.objective
    chunks = ob.chunk_sizes
    B = max(chunks)
    if probe_size is None:
        b2 = max(1, math.ceil(B / 2))
    else:
        b2 = check_int(probe_size, "probe_size", maximum=B)
    b1 = max(1, b2 // 2)
    op.clear_cache()
    # the resident set before the probes: their freed memory is reused by the real run
    mem = process_memory()

    X = y = None
    for Xc, yc, _ in ob.batches():
        if yc.shape[0] == B:
            X, y = Xc, yc
            break
    item = torch.empty((), dtype=op.dtype).element_size()
    acc_item = torch.empty((), dtype=ob.accumulation_dtype).element_size()
    V = torch.randn(op.shape[1], k, dtype=op.dtype, device=op.device, generator=generator)
    meas: dict[str, list[float]] = {"R": [], "PB": [], "PP": [], "TB": [], "TP": []}
    probes = [(_slice(X, b), y[:b], ob._weight(b)) for b in (b1, b2)]
    # 1. memory, counted exactly (this pass also warms up kernels and allocator)
    for Xb, yb, w in probes:
        with AllocationTracker() as tr:
            with torch.enable_grad(), ob.curvature_mode():
                cache = op._build(Xb, yb, w)
            retained = tr.live
            meas["R"].append(float(retained))
            meas["PB"].append(float(tr.peak))
            tr.reset_peak()
            with ob.curvature_mode():
                parts = unravel_block(V, ob.shapes)
                res = op._batch_product(cache, parts)
            meas["PP"].append(float(tr.peak - retained))
            del res, parts, cache
    # 2. time, untracked and warm. The fits use process CPU time, which other processes on
    # a busy machine barely disturb; it is converted to wall time with the ratio of the
    # whole timed pass (wall / CPU), so parallel speed-up and contention are kept.
    wall = cpu = 0.0
    for Xb, yb, w in probes:
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.enable_grad(), ob.curvature_mode():
            cache = op._build(Xb, yb, w)
        c1 = time.process_time()
        with ob.curvature_mode():
            res = op._batch_product(cache, unravel_block(V, ob.shapes))
        t2, c2 = time.perf_counter(), time.process_time()
        meas["TB"].append(c1 - c0)
        meas["TP"].append(c2 - c1)
        wall += t2 - t0
        cpu += c2 - c0
        del res, cache
    speed = wall / cpu if cpu > 0 else 1.0
    fits = {key: _fit((b1, b2), tuple(v)) for key, v in meas.items()}

    def at(key: str, c: int) -> float:
        a, s = fits[key]
        return a + s * c

    n = op.shape[1]
    single = len(chunks) == 1 and not ob.distributed
    vec = k * n * item  # the input V
    vec += k * n * (item if single else acc_item)  # the accumulator
    if not single and ob.accumulation_dtype != op.dtype:
        vec += k * n * item  # cast of the reduced result
    if ob.weight_decay or ob.regularizer is not None:
        vec += 2 * k * n * item  # the regulariser product and the sum
    vec += extra_vectors * n * item

    if op.cache_graph:
        graphs = sum(at("R", c) for c in chunks)
        build_peak, kept = 0.0, 0.0
        for c in chunks:
            build_peak = max(build_peak, kept + at("PB", c))
            kept += at("R", c)
        prod_peak = graphs + max(at("PP", c) for c in chunks)
        extra = vec + max(build_peak, prod_peak)
        t_steady = speed * sum(at("TP", c) for c in chunks)
        t_first = t_steady + speed * sum(at("TB", c) for c in chunks)
    else:
        graphs = 0.0
        extra = vec + max(max(at("PB", c), at("R", c) + at("PP", c)) for c in chunks)
        t_steady = speed * sum(at("TP", c) + at("TB", c) for c in chunks)
        t_first = t_steady
    base = mem["rss"]
    return PreflightEstimate(
        n=n,
        num_vectors=k,
        chunk_sizes=tuple(chunks),
        cache_graph=op.cache_graph,
        param_bytes=int(sum(p.numel() * p.element_size() for p in ob.params.values())),
        graph_bytes=int(graphs),
        extra_peak_bytes=int(extra),
        baseline_bytes=base,
        peak_bytes=None if base is None else int(base + extra),
        available_bytes=mem["available"],
        seconds_per_product=float(t_steady),
        seconds_first_product=float(t_first),
        seconds_per_matvec=float(t_steady) / k,
        probe_sizes=(b1, b2),
        converged=b1 != b2,
    )
