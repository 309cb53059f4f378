"""Extreme eigenpairs by thick-restart (block) Lanczos with full reorthogonalisation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .._checks import (
    check_choice,
    check_finite,
    check_int,
    check_positive,
    check_vector,
)
from ..operators.base import LinearOperator
from ._results import EigenResult
from .checkpoint import (
    check_path,
    fingerprint,
    interrupted_message,
    load_state,
    remove_state,
    save_state,
)
from .lanczos import as_symmetric_operator, default_generator, orthonormalize, random_block

__all__ = ["Which", "Criterion", "top_eigenpairs"]


class Which(str, Enum):
    """Which end of the spectrum: ``"largest"``, ``"smallest"`` or ``"both_ends"``."""

    LARGEST = "largest"
    SMALLEST = "smallest"
    BOTH_ENDS = "both_ends"


class Criterion(str, Enum):
    """What ``tol`` bounds: the eigenvalue error estimate or the residual norm."""

    EIGENVALUE = "eigenvalue"
    RESIDUAL = "residual"


def _wanted(theta: Tensor, which: str, k: int) -> tuple[list[int], list[int]]:
    """Indices (into ascending ``theta``) of the wanted Ritz values in output order, and of
    the nearest unwanted neighbours (whose residuals the error bounds use)."""
    j = theta.numel()
    if which == "largest":
        want = list(range(j - 1, max(j - 1 - k, -1), -1))
        nb = [j - 1 - k] if j - 1 - k >= 0 else []
    elif which == "smallest":
        want = list(range(min(k, j)))
        nb = [k] if k < j else []
    else:
        top = list(range(j - 1, max(j - 1 - k, -1), -1))
        bot = [i for i in range(min(k, j)) if i not in top]
        want = top + bot
        nb = [i for i in (j - 1 - k, k) if 0 <= i < j and i not in want]
    return want, sorted(set(nb))


def _keep(j: int, which: str, p: int) -> list[int]:
    """Ritz indices (ascending ``theta`` of length ``j``) kept at a thick restart."""
    p = min(p, j)
    if which == "largest":
        return list(range(j - p, j))
    if which == "smallest":
        return list(range(p))
    lo = p // 2
    return sorted(set(range(lo)) | set(range(j - (p - lo), j)))


def _separated(theta: Tensor, res: Tensor, want: list[int], nb: list[int], bound: Tensor) -> bool:
    """Whether the wanted Ritz values are separated from the unconverged rest.

    An eigenvalue still missing from the wanted set (its direction barely present in the
    start vector) shows as an unwanted Ritz value with a large residual moving towards the
    wanted ones. Require, for each inner neighbour ``u`` (largest unwanted for
    ``"largest"``), that its interval ``theta_u +- r_u`` (which holds an eigenvalue) lies
    beyond the interval of the nearest wanted value.
    """
    if not nb:
        return False
    wt = theta[want]
    ok = True
    for u in nb:
        tu, ru = theta[u], res[u]
        above = wt > tu
        if bool(above.any()):  # wanted values above u: the lowest of them
            i = int(torch.where(above, wt, torch.inf).argmin())
            ok &= bool(tu + ru < wt[i] - bound[i])
        below = wt < tu
        if bool(below.any()):
            i = int(torch.where(below, wt, -torch.inf).argmax())
            ok &= bool(tu - ru > wt[i] + bound[i])
    return ok


@dataclass
class _Ritz:
    theta: Tensor
    S: Tensor
    want: list[int]
    r: Tensor
    bound: Tensor
    conv: Tensor
    converged: bool
    Y: Tensor | None
    Rw: Tensor | None
    count: int
    restarts: int


class _ThickRestartLanczos:
    """State and steps of the solver (kept on an object so a run can be checkpointed).

    The basis is stored row-wise (``V[i]`` is a contiguous basis vector), with the products
    ``AV[i] = A V[i]`` and the projection ``H = V A V^T`` (float64). While the basis is a
    Krylov basis (also after thick restarts) the Ritz residuals follow from the Lanczos
    relation ``A V^T = V^T H + R E^T``: ``||r_i|| = ||B s_i[last block]||`` with ``B`` the
    triangular factor of the orthogonalised last product, at no cost in ``n``. The residuals
    of the returned pairs are recomputed explicitly from ``AV`` before stopping.
    """

    def __init__(
        self,
        op: LinearOperator,
        k: int,
        which: str,
        tol: float,
        criterion: str,
        budget: int,
        block_size: int,
        max_basis: int,
        basis_dtype: torch.dtype,
        generator: torch.Generator,
        Q0: Tensor,
        verify: int = 0,
    ):
        self.op, self.k, self.which, self.tol, self.criterion = op, k, which, tol, criterion
        self.budget, self.b, self.m = budget, block_size, max_basis
        self.bdtype, self.g = basis_dtype, generator
        n = op.shape[0]
        self.n = n
        cap = min(n, max_basis + max(block_size + 1, Q0.shape[1]))
        # rows beyond j are scratch, written before they are read
        self.V = torch.empty(cap, n, dtype=basis_dtype, device=op.device)
        self.AV = torch.empty(cap, n, dtype=basis_dtype, device=op.device)
        self.H = torch.zeros(cap, cap, dtype=torch.float64, device=op.device)
        self.j = 0
        self.Q = Q0.to(basis_dtype)  # (n, b) next block
        self.count = 0
        self.restarts = 0
        # a first block of another size (block warm start) breaks the Lanczos relation
        self.krylov = Q0.shape[1] == block_size
        self.eps = torch.finfo(op.dtype).eps
        self.last: _Ritz | None = None
        self.kw = k if which != "both_ends" else 2 * k
        # verification: once the criterion is met, ``verify`` more products, each step a
        # block of the main run's next Krylov vectors and one fresh random direction;
        # ``vleft`` (products left in the round) is None outside a round
        self.verify = verify
        self.vleft: int | None = None
        self.ref: tuple[Tensor, Tensor] | None = None  # wanted values and bounds at its start
        self.from_product = False  # continue from the latest product (not the residuals)

    # -- Rayleigh-Ritz ------------------------------------------------------------------
    def ritz(self, est: Tensor | None = None, eig: tuple[Tensor, Tensor] | None = None) -> _Ritz:
        """Ritz pairs of the current basis (eigenvectors are formed only when asked for).

        Args:
            est: residual norms of all ``j`` Ritz pairs from the Lanczos relation (ordered
                like the ascending Ritz values); ``None`` computes the wanted (and
                neighbouring) ones explicitly from the stored products.
            eig: ``eigh`` of the projected matrix if already computed.
        """
        j = self.j
        theta, S = torch.linalg.eigh(self.H[:j, :j]) if eig is None else eig
        want, nb = _wanted(theta, self.which, self.k)
        nw = len(want)
        Y = Rw = None
        if est is None:
            sel = want + nb
            Ssel = S[:, sel].to(self.bdtype)
            Ysel = Ssel.T @ self.V[:j]
            Rv = Ssel.T @ self.AV[:j] - theta[sel].to(self.bdtype).unsqueeze(1) * Ysel
            res_all = torch.zeros(j, dtype=torch.float64, device=theta.device)
            res_all[sel] = Rv.norm(dim=1).to(torch.float64)
            Y, Rw = Ysel[:nw], Rv[:nw]
        else:
            res_all = est
        # eigenvalue error bound min(r, r^2 / gap), gap to the nearest other Ritz value
        r = res_all[want]
        th = theta[want]
        dist = (th.unsqueeze(1) - theta.unsqueeze(0)).abs()
        dist[torch.arange(nw), torch.tensor(want, dtype=torch.long)] = float("inf")
        gap = dist.min(1).values if j > 1 else torch.full_like(th, float("inf"))
        bound = torch.where(torch.isfinite(gap) & (gap > 0), torch.minimum(r, r * r / gap), r)
        test = r if self.criterion == "residual" else bound
        normest = float(theta.abs().max())
        thresh = torch.clamp(self.tol * th.abs(), min=50 * self.eps * normest)
        conv = test <= thresh
        # a neighbour that is itself converged is a tie at the boundary, not a missing value
        nb_open = [u for u in nb if res_all[u] > self.tol * abs(theta[u]) + 50 * self.eps * normest]
        converged = (
            bool(conv.all())
            and nw == self.kw
            and (
                j >= self.n
                or (bool(nb) and not nb_open)
                or _separated(theta, res_all, want, nb_open, bound)
            )
        )
        return _Ritz(theta, S, want, r, bound, conv, converged, Y, Rw, self.count, self.restarts)

    def result(self, rz: _Ritz | None = None) -> EigenResult | None:
        """The :class:`EigenResult` of a Ritz record (default the latest)."""
        rz = self.last if rz is None else rz
        if rz is None:
            return None
        Y = rz.Y
        if Y is None:
            Y = rz.S[:, rz.want].to(self.bdtype).T @ self.V[: rz.S.shape[0]]
        return EigenResult(
            eigenvalues=rz.theta[rz.want].to(self.op.dtype),
            eigenvectors=Y.T.to(self.op.dtype),
            residual_norms=rz.r.to(self.op.dtype),
            error_bounds=rz.bound.to(self.op.dtype),
            num_matvecs=rz.count,
            converged=rz.converged,
            which=self.which,
            tol=self.tol,
            criterion=self.criterion,
            num_restarts=rz.restarts,
            converged_mask=rz.conv.cpu(),
        )

    # -- one expansion step ---------------------------------------------------------------
    def step(self) -> bool:
        """Multiply the next block, extend the basis, Rayleigh-Ritz. True when finished."""
        Q = self.Q
        bq = Q.shape[1]
        W = self.op.matmat(Q.to(self.op.dtype))
        self.count += bq
        W_b = W.to(self.bdtype)
        j = self.j
        self.V[j : j + bq] = Q.T
        h = (self.V[: j + bq] @ W_b).to(torch.float64)
        if not bool(torch.isfinite(h).all()):  # NaN/inf in W always reach h = V W
            check_finite(W, f"the operator product after {self.count} matvecs", self.result())
        self._dirty = True  # the state is inconsistent until this step has finished
        try:
            return self._extend(Q, W_b, h)
        finally:
            self._dirty = False

    def _extend(self, Q: Tensor, W_b: Tensor, h: Tensor) -> bool:
        bq = Q.shape[1]
        j = self.j
        self.AV[j : j + bq] = W_b.T
        self.H[: j + bq, j : j + bq] = h
        self.H[j : j + bq, : j + bq] = h.T
        blk = self.H[j : j + bq, j : j + bq]
        self.H[j : j + bq, j : j + bq] = 0.5 * (blk + blk.T)
        self.j = j = j + bq
        Vt = self.V[:j].T  # (n, j) view
        room = min(self.b, self.n - j)
        Qn: Tensor | None = None
        if self.krylov:
            # the Lanczos continuation and, from its triangular factor, all Ritz residuals
            R = W_b - Vt @ h.to(self.bdtype)
            Qn, _ = orthonormalize(R[:, :room], Vt, self.g, refs=W_b.norm(dim=0)[:room], passes=1)
            B = (Qn.T @ R).to(torch.float64) if Qn.shape[1] else h.new_zeros(0, bq)
            theta, S = torch.linalg.eigh(self.H[:j, :j])
            est = (B @ S[j - bq :, :]).norm(dim=0)
            rz = self.ritz(est, (theta, S))
            if rz.converged or j >= self.n:
                # confirm with explicit residuals (recomputed from the stored products)
                rz = self.ritz(None, (theta, S))
        else:
            rz = self.ritz(None)
        met = rz.converged
        if self.vleft is not None:
            self.vleft -= bq
            if self._found(rz):
                # the fresh direction changed the wanted set: back to the main phase, which
                # continues from the residuals of the wanted pairs (they hold the next
                # Krylov direction of both start vectors; the fresh vector's own sequence
                # alone stalls)
                self.vleft, self.from_product = None, False
                met = False
            else:
                met = True
        done = j >= self.n
        fresh = False
        if met and not done:
            if self.verify == 0 or (self.vleft is not None and self.vleft <= 0):
                done = True
            elif self.vleft is None:  # the criterion is met: start a verification round
                self.vleft = self.verify
                self.ref = (rz.theta[rz.want].clone(), rz.bound.clone())
                fresh = True
        rz.converged = met and (done or self.verify == 0)
        self.last = rz
        if done:
            return True
        if fresh:
            # the next Krylov block of the main run plus a fresh random direction (one
            # batched product): the first shows an eigenvalue whose component in the start
            # vector was small, the second one that the start vector lacks (a repeat)
            R = W_b - Vt @ h.to(self.bdtype)
            R = torch.cat([R, random_block(self.n, 1, self.bdtype, Vt.device, self.g)], 1)
            refs = torch.cat([W_b.norm(dim=0), R.new_ones(1)])
            Qn, _ = orthonormalize(R, Vt, self.g, refs=refs)
            Qn = Qn[:, : self.n - j]
            self.krylov, self.from_product = False, True
        elif Qn is None and self.from_product:
            R = W_b - Vt @ h.to(self.bdtype)
            Qn, _ = orthonormalize(R, Vt, self.g, refs=W_b.norm(dim=0), passes=1)
            Qn = Qn[:, : self.n - j]
        elif Qn is None:
            # first block of another size (block warm start): continue from the residuals
            # of the wanted Ritz pairs (unconverged first); they span the next directions
            mask = rz.conv.cpu()
            order = [i for i in range(mask.numel()) if not bool(mask[i])] + [
                i for i in range(mask.numel()) if bool(mask[i])
            ]
            R = rz.Rw[order[: self.b]].T
            if R.shape[1] < self.b:
                more = random_block(self.n, self.b - R.shape[1], self.bdtype, R.device, self.g)
                R = torch.cat([R, more], 1)
            Qn, _ = orthonormalize(R[:, :room], Vt, self.g)
        if Qn.shape[1] == 0:  # the whole space is spanned: the Ritz pairs are exact
            rz.converged = met
            return True
        if j + Qn.shape[1] > self.m:
            if rz.Y is None:  # the restart overwrites the basis the record refers to
                rz.Y = rz.S[:, rz.want].to(self.bdtype).T @ self.V[:j]
            self.restart(rz.theta, rz.S)
        self.Q = Qn
        return False

    def _found(self, rz: _Ritz) -> bool:
        """Whether a verification step changed the wanted set: a wanted Ritz value is no
        longer converged, or moved beyond both error bounds from where the round began."""
        if not (bool(rz.conv.all()) and len(rz.want) == self.kw):
            return True
        assert self.ref is not None
        th0, b0 = self.ref
        moved = (rz.theta[rz.want] - th0).abs() > b0 + rz.bound + 10 * self.eps * th0.abs()
        return bool(moved.any())

    def restart(self, theta: Tensor, S: Tensor) -> None:
        """Thick restart: keep the best Ritz vectors; ``H`` becomes diagonal on them."""
        j, b, kw = self.j, self.b, self.kw
        p = kw + max(1, (self.m - kw) // 2)
        p = max(kw, min(p, self.m - b))
        keep = _keep(j, self.which, p)
        Sk = S[:, keep].to(self.bdtype)
        Y = Sk.T @ self.V[:j]
        AY = Sk.T @ self.AV[:j]
        pk = len(keep)
        self.V[:pk] = Y
        self.AV[:pk] = AY
        self.H.zero_()
        self.H[:pk, :pk] = torch.diag(theta[keep])
        self.j = pk
        self.restarts += 1

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        j = self.j
        return {
            "j": j,
            "V": self.V[:j].clone(),
            "AV": self.AV[:j].clone(),
            "H": self.H[:j, :j].clone(),
            "Q": self.Q.clone(),
            "krylov": self.krylov,
            "count": self.count,
            "restarts": self.restarts,
            "rng": self.g.get_state(),
            "vleft": self.vleft,
            "ref": self.ref,
            "from_product": self.from_product,
        }

    def load_state_dict(self, state: dict) -> None:
        j = int(state["j"])
        dev = self.op.device
        self.j = j
        self.V[:j] = state["V"].to(dev)
        self.AV[:j] = state["AV"].to(dev)
        self.H[:j, :j] = state["H"].to(dev)
        self.Q = state["Q"].to(dev)
        self.krylov = bool(state["krylov"])
        self.count = int(state["count"])
        self.restarts = int(state["restarts"])
        self.g.set_state(state["rng"])
        self.vleft = state.get("vleft")
        ref = state.get("ref")
        self.ref = None if ref is None else (ref[0].to(dev), ref[1].to(dev))
        self.from_product = bool(state.get("from_product", False))
        if j > 0:
            self.last = self.ritz()
            self.last.converged &= self.vleft is None or self.verify == 0

    def run(
        self,
        checkpoint: Any = None,
        every: int = 50,
        config: dict | None = None,
        progress: bool = False,
    ) -> EigenResult:
        saved_at = self.count
        self._dirty = False
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.budget,
                initial=self.count,
                desc="top_eigenpairs",
                unit="matvec",
                leave=False,
            )
        try:
            while True:
                if self.count + self.Q.shape[1] > self.budget:
                    break
                before = self.count
                done = self.step()
                if bar is not None and self.last is not None:
                    bar.update(self.count - before)
                    bar.set_postfix(max_error=f"{float(self.last.bound.max()):.2e}", refresh=False)
                if done:
                    break
                if checkpoint is not None and self.count - saved_at >= every:
                    save_state(checkpoint, "top_eigenpairs", config or {}, self.state_dict())
                    saved_at = self.count
        except KeyboardInterrupt:
            if checkpoint is None:
                raise
            if not self._dirty:
                save_state(checkpoint, "top_eigenpairs", config or {}, self.state_dict())
            raise KeyboardInterrupt(
                interrupted_message(checkpoint, "top_eigenpairs", self.count)
            ) from None
        finally:
            if bar is not None:
                bar.close()
        if checkpoint is not None:
            remove_state(checkpoint)
        out = self.result()
        assert out is not None
        return out


def top_eigenpairs(
    A: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-3,
    num_matvecs: int | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
    criterion: str = "eigenvalue",
    block_size: int = 1,
    verify_matvecs: int | None = None,
    max_basis: int | None = None,
    basis_dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    progress: bool = False,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Finds the ``k`` algebraically largest (``which="largest"``), smallest (``"smallest"``)
    or both (``"both_ends"``: ``2k`` pairs) eigenpairs ``A y_i = lambda_i y_i``. Each step
    multiplies a block of ``block_size`` vectors (one batched pass), orthogonalises it twice
    against the whole basis (full reorthogonalisation), and computes the Ritz pairs of
    ``H = V^T A V``; when the basis reaches ``max_basis`` columns it is restarted from the
    best Ritz vectors (thick restart, Wu & Simon 2000), which keeps the memory bounded.

    Stopping is checked after every step (free: the Ritz problem is tiny) on the true
    residuals ``r_i = ||A y_i - theta_i y_i||`` (recomputed from stored products). With
    ``criterion="eigenvalue"`` (default) ``tol`` is the relative *eigenvalue* accuracy, bounded
    by the standard estimate ``|theta_i - lambda_i| <= min(r_i, r_i^2 / gap_i)`` with ``gap_i``
    the distance to the nearest other Ritz value:

    .. math:: \\min\\big(r_i, r_i^2/\\mathrm{gap}_i\\big) \\le \\mathrm{tol}\\,|\\theta_i|.

    With ``criterion="residual"``, ``r_i <= tol * |theta_i|`` (eigenvectors accurate to about
    ``r_i / gap_i``). Both are floored at ``50 * eps * ||A||`` (what the dtype can resolve).
    Convergence also requires the wanted Ritz values to be separated from the unconverged
    rest: the interval ``theta_u +- r_u`` of the nearest unwanted Ritz value (which holds an
    eigenvalue) must not reach the nearest wanted one.

    *Verification.* Residuals certify that each Ritz value is close to *an* eigenvalue, not
    that none is missing: an eigenvector with a small component in the start vector shows
    up late, one it lacks (the second copy of a repeated eigenvalue) never. So once the
    criterion is met, ``verify_matvecs`` more products check it (default 6 for a cold
    start): each step multiplies a block of the run's next Krylov vector and a fresh random
    direction orthogonal to the basis (the operator deflated by everything found). If the
    wanted set changes (a new Ritz value enters it, or one moves beyond its error bound), the
    run continues and verifies again with another fresh direction; the result is
    ``converged`` only after a round that changed nothing. Measured on the digits MLP
    Hessian (100 start seeds): without it ``k=1`` returned ``lambda_2`` as converged for 2
    seeds at the default ``tol`` (5 at ``tol=1e-2``), and ``k=10`` missed an eigenvalue for
    4 seeds at ``tol=1e-2``; with it, none. What remains: a short verification detects a
    missing eigenvalue only when it stands out from the deflated rest (a gap of a few
    percent of the spectral range); inside a tight cluster, or for an exact repeat close to
    its neighbours, a miss is less likely but possible (no method that sees the operator
    only through a few products can exclude one). For repeats use ``block_size`` >= the
    multiplicity. A warm start ``v0`` skips verification by default (trackers rely on one
    or two products per call); pass ``verify_matvecs`` to keep it.

    Cost: about ``13`` matvecs for the top eigenvalue of a network Hessian to ``1e-3``,
    ``35-40`` for the top ten (6 of them verification); memory ``2 * max_basis * n`` (basis
    and its products).

    Args:
        A: symmetric ``LinearOperator`` or dense ``(n, n)`` tensor.
        k: pairs per end (``k < n``; for all of them use ``torch.linalg.eigh``).
        which: ``"largest"``, ``"smallest"`` or ``"both_ends"``.
        tol: relative tolerance (default ``1e-3``), see above.
        num_matvecs: budget of products; default ``max(300, 40 * k)``. Running out is not an
            error: the result has ``converged=False``.
        generator: randomness of the default start vector (``None``: a fresh seed; the
            global RNG is never used).
        v0: warm start ``(n,)`` (Lanczos starts from it: an exact eigenvector converges in one
            product) or ``(n, j)`` (multiplied as one block, then continued from the residuals
            of its Ritz vectors), e.g. the eigenvectors of a previous call.
        criterion: ``"eigenvalue"`` or ``"residual"``.
        block_size: vectors per product (block Lanczos): fewer, larger batched passes.
        verify_matvecs: products of each verification round (see above); default
            ``3 * (block_size + 1)`` for a random start, ``0`` (off) with ``v0``.
        max_basis: basis size before a restart; default ``max(60, 3 * kw + 20)`` with ``kw``
            the number of wanted pairs.
        basis_dtype: storage dtype of the basis (``torch.float32`` halves memory for a
            float64 operator); default the operator's.
        checkpoint: a file path: the Krylov state is saved there every
            ``checkpoint_every`` matvecs and on Ctrl-C, and a later call with the same path
            (same operator and settings) resumes from it; removed when the run finishes.
            The path is checked at the start; the file records a fingerprint of the operator
            (one extra product) and a file of another operator is refused (see
            :mod:`hesse.linalg.checkpoint`).
        checkpoint_every: matvecs between saves (default 50).
        progress: show a progress bar (tqdm) with the largest error estimate.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` ``(k,)`` (``(2k,)`` for ``both_ends``: the
        ``k`` largest descending, then the ``k`` smallest ascending), ``eigenvectors``
        ``(n, k)``, ``residual_norms``, ``error_bounds``, ``num_matvecs``, ``converged``.

    Raises:
        ValueError: non-square or non-symmetric operator, ``k >= n``, ``tol <= 0``, bad
            ``v0``.
        NonFiniteError: a product held NaN/inf; ``.partial`` is the last :class:`EigenResult`.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = top_eigenpairs(A, k=2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        >>> [round(float(x), 6) for x in res.eigenvalues]
        [100.0, 99.0]

    References:
        Lanczos 1950; Wu & Simon, "Thick-restart Lanczos method for large symmetric
        eigenvalue problems", SIAM J. Matrix Anal. Appl., 2000; Parlett, "The Symmetric
        Eigenvalue Problem", 1998 (error bounds).
    """
    op = as_symmetric_operator(A, "top_eigenpairs")
    n = op.shape[0]
    if checkpoint is not None:
        check_path(checkpoint)
    check_int(k, "k", minimum=1)
    which = check_choice(which, "which", [w.value for w in Which])
    criterion = check_choice(criterion, "criterion", [c.value for c in Criterion])
    tol = check_positive(tol, "tol")
    b = check_int(block_size, "block_size", minimum=1)
    kw = 2 * k if which == "both_ends" else k
    if kw >= n:
        raise ValueError(
            f"Invalid k={k}: {kw} wanted eigenpairs must be fewer than n={n}. For all "
            "eigenpairs of a small operator use torch.linalg.eigh(A.to_dense())."
        )
    if max_basis is None:
        m = max(60, 3 * kw + 20, kw + 4 * b)
    else:
        m = check_int(max_basis, "max_basis", minimum=kw + 2 * b)
    m = min(m, n)
    budget = max(300, 40 * kw) if num_matvecs is None else check_int(num_matvecs, "num_matvecs")
    g = default_generator(generator, op.device)
    bdtype = basis_dtype or op.dtype
    if v0 is None:
        Q0 = random_block(n, b, op.dtype, op.device, g)
    else:
        check_vector(v0, n, op.dtype, op.device, "v0")
        Q0 = v0.unsqueeze(1) if v0.ndim == 1 else v0
        if not bool(torch.isfinite(Q0).all()):
            raise ValueError("Invalid v0: it holds NaN/inf.")
        if Q0.shape[1] > m - b:
            raise ValueError(
                f"Invalid v0 with {Q0.shape[1]} columns; at most max_basis - block_size = "
                f"{m - b} fit in the basis."
            )
        if Q0.shape[1] < b:
            Q0 = torch.cat([Q0, random_block(n, b - Q0.shape[1], op.dtype, op.device, g)], 1)
    Q0, _ = orthonormalize(Q0.to(bdtype), None, g)
    if verify_matvecs is None:
        verify = 0 if v0 is not None else 3 * (b + 1)
    else:
        verify = check_int(verify_matvecs, "verify_matvecs", minimum=0)
    solver = _ThickRestartLanczos(op, k, which, tol, criterion, budget, b, m, bdtype, g, Q0, verify)
    config = None
    if checkpoint is not None:
        check_int(checkpoint_every, "checkpoint_every")
        config = {
            "n": n,
            "dtype": str(op.dtype),
            "basis_dtype": str(bdtype),
            "k": k,
            "which": which,
            "tol": tol,
            "criterion": criterion,
            "block_size": b,
            "max_basis": m,
            "verify_matvecs": verify,
            "fingerprint": fingerprint(op),
        }
        state = load_state(checkpoint, "top_eigenpairs", config)
        if state is not None:
            solver.load_state_dict(state)
    return solver.run(checkpoint, checkpoint_every, config, progress)
