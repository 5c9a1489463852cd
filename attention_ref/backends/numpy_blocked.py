"""The NumPy backend's blocked algorithm (SPEC.md rule 19): the online-softmax forward and the
FlashAttention-2 backward, tile by tile, in memory independent of L and S per head.

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. Arrays use the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``.
A *tile* is one kv head's G query heads (their ``block_q`` query rows stacked, so that one matmul per
kv head serves them, as ``plan.stacked_shape``) against one key block: ``(G * block_q, block_k)``
logits. mask, bias and dropout mask are read per tile from their own shape (a dim of size 1 stays
size 1; the tile broadcasts), never broadcast to the logits' shape.

Work items and threads. The forward's work item is one query block of one kv head (its G query
heads); the backward's is a *group* of kv heads (those that share one slice of bias, or one kv head
without a bias) times a *chunk* of key blocks, which owns dk and dv of those keys, its own partial dq
(summed over the chunks in chunk order at the end) and its slice of dbias. The chunks are fixed by the
plan (at least ``MIN_BACKWARD_ITEMS`` work items where the key blocks allow, one chunk when the bias
has a single key column), never by the thread count, and each work item runs the same operations in
the same order on whichever thread: the results do not depend on the thread count. Work items run
on a ``ThreadPoolExecutor`` (BLAS calls and ufuncs release the GIL) with BLAS limited to one thread
through ``threadpoolctl`` (the ``fast`` extra); without threadpoolctl, the calling thread runs
them all and BLAS threads its own matmuls. Calls smaller than ``POOL_WORK`` logit elements run on the
calling thread (BLAS still limited to one thread: OpenBLAS threads small matmuls on a busy machine
at a cost of milliseconds each).

Each thread keeps its own tile buffers (a small constant number of ``G * block_q x block_k`` arrays)
and every step writes into them in place (``out=``). Excluded keys are set to -inf by
``fmin(x, +-inf)`` (an attended key's logit kept, an excluded key's -inf, NaN included), only on
tiles with a mask and on tiles that causal or the window cut (``plan.key_range``); a tile wholly
inside the window needs none, and a cut tile's bound comes from a small per-thread cache (the same
block pair in every kv head, and every diagonal tile when block_q is a multiple of block_k, share
one). A power-of-two scale is applied to q once, where that is exact (the usual ``1 / sqrt(E)``
for E = 64), instead of to every tile.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from ..frameworks import numpy_dtype
from ..plan import AttentionPlan

try:  # the ``fast`` extra: BLAS limited to one thread inside the pool's threads
    import threadpoolctl
except ImportError:  # pragma: no cover - exercised where threadpoolctl is absent
    threadpoolctl = None

#: The backward's least number of work items (key chunks times kv-head groups) where the key
#: blocks allow: a fixed constant, so that the chunks, and so the results, never depend on threads.
MIN_BACKWARD_ITEMS = 8
#: The window bounds (``+-inf`` tiles of the keys causal and window leave) each thread keeps.
WINDOW_BOUNDS_KEPT = 4
#: Calls with fewer logit elements (tiles visited times their size) than this run on the calling
#: thread, without a pool (whose start costs about 0.3 ms).
POOL_WORK = 1 << 20

_controller: Any = None
_controller_lock = threading.Lock()


def default_threads() -> int:
    """The threads a blocked call uses when none are named: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def has_threadpoolctl() -> bool:
    """Whether threadpoolctl (the ``fast`` extra) is importable: without it, blocked calls run one thread."""
    return threadpoolctl is not None


def _one_blas_thread() -> AbstractContextManager[Any]:
    """A context in which BLAS runs one thread (threadpoolctl), or a no-op without threadpoolctl."""
    global _controller
    if threadpoolctl is None:
        return nullcontext()
    with _controller_lock:
        if _controller is None:
            _controller = threadpoolctl.ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


class _Operand:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)``, viewed (never copied) in the
    grouped layout ``(*B', Hkv', G', L', S')`` of its own shape: each dim its own size, 1 where it
    broadcasts (``Hkv' = G' = 1`` for a single head column)."""

    def __init__(self, plan: AttentionPlan, x: np.ndarray):
        rank = len(plan.logits_shape)
        x = x.reshape((1,) * (rank - x.ndim) + x.shape)
        if not plan.has_head_axis:
            grouped = (1, 1, *x.shape)
        else:
            *batch, heads, rows, cols = x.shape
            split = (1, 1) if heads == 1 else (plan.num_kv_heads, plan.group_size)
            grouped = (*batch, *split, rows, cols)
        self.x = x.reshape(grouped)  # splitting one axis and adding unit axes: always a view
        self.dtype = x.dtype
        self.one_row = self.x.shape[-2] == 1
        self.one_column = self.x.shape[-1] == 1

    def index(self, idx: tuple[int, ...]) -> tuple[int, ...]:
        """The operand's own index of the kv head ``idx`` (over ``(*B, Hkv)``): 0 on broadcast dims."""
        return tuple(0 if size == 1 else i for i, size in zip(idx, self.x.shape[:-3], strict=True))

    def tile(self, idx: tuple[int, ...], qs: int, qe: int, ks: int, ke: int) -> np.ndarray:
        """The view ``(G', qe - qs or 1, ke - ks or 1)`` of queries ``qs:qe`` and keys ``ks:ke`` of the
        G query heads of kv head ``idx`` (rule 19: sliced, never broadcast to the logits' shape)."""
        rows = slice(None) if self.one_row else slice(qs, qe)
        cols = slice(None) if self.one_column else slice(ks, ke)
        return self.x[self.index(idx)][:, rows, cols]


class _Workspace:
    """One thread's buffers, reused from tile to tile (grown when a tile needs more)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, str], np.ndarray] = {}
        self._window_bounds: dict[tuple[Any, ...], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised contiguous array of ``shape`` and ``dtype``, the buffer ``name`` of this thread."""
        size = math.prod(shape)
        key = (name, np.dtype(dtype).str)
        flat = self._flat.get(key)
        if flat is None or flat.size < size:
            flat = self._flat[key] = np.empty(size, dtype)
        return flat[:size].reshape(shape)

    def window_bound(self, low: int | None, high: int | None, offset: int, rows: int, cols: int,
                     dtype: Any) -> np.ndarray:
        """``(rows, cols)``: +inf where causal and window (rule 7) let query ``r`` attend key ``c`` of a
        tile whose first key minus its first query is ``offset`` (``low <= offset + c - r <= high``),
        -inf elsewhere. The few most recent are kept: the tiles of one query block and key block in
        every kv head, and the diagonal tiles of every query block when block_q is a multiple of
        block_k, share one."""
        key = (low, high, offset, rows, cols, np.dtype(dtype).str)
        bound = self._window_bounds.pop(key, None)
        if bound is None:
            key_minus_query = np.subtract.outer(-np.arange(rows), -np.arange(cols) - offset)  # offset + c - r
            allowed = np.ones((rows, cols), bool)
            if low is not None:
                allowed &= key_minus_query >= low
            if high is not None:
                allowed &= key_minus_query <= high
            bound = _as_bound(allowed, np.empty((rows, cols), dtype))
            if len(self._window_bounds) >= WINDOW_BOUNDS_KEPT:
                self._window_bounds.pop(next(iter(self._window_bounds)))
        self._window_bounds[key] = bound
        return bound


def _as_bound(allowed: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (a float array of allowed's shape): +inf where ``allowed``, -inf elsewhere, so that
    ``fmin(x, out)`` keeps an attended key's logit (NaN included) and gives -inf on an excluded key
    (rules 6-8), without a boolean-indexed pass."""
    np.copyto(out, allowed)  # 1 attended, 0 excluded
    np.subtract(out, 0.5, out=out)
    return np.multiply(out, np.inf, out=out)


class _Call:
    """One blocked call's operands in the grouped layout and the compute dtype, and its tile steps."""

    def __init__(self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any):
        self.plan = plan
        compute = self.compute = np.dtype(plan.compute_dtype)
        # rule 10: q, k, v converted exactly to the compute dtype (no copy when they are in it already)
        q = np.asarray(q).astype(compute, copy=False).reshape(plan.grouped_shape(plan.head_dim))
        self.k = np.asarray(k).astype(compute, copy=False).reshape(plan.kv_shape(plan.head_dim))  # rule 1
        self.v = np.asarray(v).astype(compute, copy=False).reshape(plan.kv_shape(plan.value_dim))
        self.scale = compute.type(plan.scale)  # rule 10: scalars in the compute dtype
        self.softcap = None if plan.softcap is None else compute.type(plan.softcap)
        self.dropout_scale = compute.type(plan.dropout_scale)
        self.q, self.prescaled = self._prescaled(q)
        self.mask = None if mask is None else _Operand(plan, np.asarray(mask))
        self.bias = None if bias is None else _Operand(plan, np.asarray(bias))
        self.keep = None if dropout_mask is None else _Operand(plan, np.asarray(dropout_mask))
        self.heads = list(np.ndindex(*plan.batch_shape, plan.num_kv_heads))

    def _prescaled(self, q: np.ndarray) -> tuple[np.ndarray, bool]:
        """``(scale * q, True)`` when that product is exact for every element (a power-of-two scale,
        no overflow, no subnormal): then ``(scale q) k`` are the logits ``scale (q k)`` of rule 3,
        bit for bit, without a pass over each tile. Otherwise ``(q, False)``."""
        mantissa, _ = math.frexp(abs(self.plan.scale))
        if mantissa != 0.5 or q.size == 0:
            return q, False
        with np.errstate(all="ignore"):
            scaled = q * self.scale
            exact = bool(np.array_equal(scaled * self.compute.type(1 / self.plan.scale), q))
        return (scaled, True) if exact else (q, False)

    def query_block(self, qb: int) -> tuple[int, int]:
        """Queries ``qs:qe`` of query block ``qb``."""
        block_q = self.plan.block_q
        assert block_q is not None
        return qb * block_q, min(self.plan.q_len, (qb + 1) * block_q)

    def key_block(self, kb: int) -> tuple[int, int]:
        """Keys ``ks:ke`` of key block ``kb`` (rule 19: the last one may be short)."""
        block_k = self.plan.block_k
        assert block_k is not None
        return kb * block_k, min(self.plan.kv_len, (kb + 1) * block_k)

    def gather(self, ws: _Workspace, name: str, x: np.ndarray, idx: tuple[int, ...], qs: int, qe: int) -> np.ndarray:
        """Rows ``qs:qe`` of the G query heads of kv head ``idx`` of x ``(*B, Hkv, G, L, C)``, stacked
        head by head into a ``(G * (qe - qs), C)`` buffer of this thread."""
        rows = x[idx][:, qs:qe]
        buffer = ws.get(name, (rows.shape[0] * rows.shape[1], *rows.shape[2:]), x.dtype)
        np.copyto(buffer.reshape(rows.shape), rows)
        return buffer

    def logits(self, ws: _Workspace, idx: tuple[int, ...], q_tile: np.ndarray, qs: int, qe: int, ks: int, ke: int,
               tanh: np.ndarray | None = None, k_head: np.ndarray | None = None) -> np.ndarray:
        """The tile's logits ``(G * (qe - qs), ke - ks)`` in a buffer of this thread: scaled, capped and
        biased (rules 3-5), -inf on every excluded key (rules 6-8). ``tanh`` (a buffer of the tile's
        shape, with a softcap) receives ``tanh(raw / softcap)``, which the backward pass needs;
        ``k_head`` is ``k[idx]`` when the caller has it."""
        plan, rows, width = self.plan, q_tile.shape[0], ke - ks
        x = ws.get("x", (rows, width), self.compute)
        k_head = self.k[idx] if k_head is None else k_head
        np.matmul(q_tile, k_head[ks:ke].T, out=x)  # rule 3 (and rule 2: one matmul per kv head)
        if not self.prescaled:
            np.multiply(x, self.scale, out=x)  # rule 3: x = scale * (q k)
        if self.softcap is not None:
            capped = ws.get("capped", (rows, width), self.compute) if tanh is None else tanh
            np.divide(x, self.softcap, out=capped)  # rule 4: x = c tanh(x / c), before the bias
            np.tanh(capped, out=capped)
            np.multiply(capped, self.softcap, out=x)
        tile = x.reshape(plan.group_size, qe - qs, width)
        if self.bias is not None:
            bias = self.bias.tile(idx, qs, qe, ks, ke)
            if bias.dtype != self.compute:  # rule 5: converted exactly, one tile at a time
                converted = ws.get("bias", bias.shape, self.compute)
                np.copyto(converted, bias, casting="unsafe")
                bias = converted
            np.add(tile, bias, out=tile)  # rule 5: after the softcap
        low, high = plan.key_range
        # rule 7: key j minus query i spans [ks - (qe - 1), (ke - 1) - qs] on this tile; only a tile
        # that the window cuts needs its bound (a tile wholly inside needs none)
        if (low is not None and ks - (qe - 1) < low) or (high is not None and (ke - 1) - qs > high):
            np.fmin(tile, ws.window_bound(low, high, ks - qs, qe - qs, width, self.compute), out=tile)
        if self.mask is not None:  # rule 6
            mask = self.mask.tile(idx, qs, qe, ks, ke)
            bound = ws.get("bound", mask.shape, self.compute)
            _as_bound(mask, bound)
            np.fmin(tile, bound, out=tile)
        return x

    def dropout(self, idx: tuple[int, ...], qs: int, qe: int, ks: int, ke: int, x: np.ndarray,
                out: np.ndarray) -> None:
        """``out = x * keep / (1 - p)`` on a tile (x and out ``(G * (qe - qs), ke - ks)``; out may be x):
        the dropout multiplier of rule 13, exactly 0 on dropped keys."""
        assert self.keep is not None
        tile = out.reshape(self.plan.group_size, qe - qs, ke - ks)
        np.multiply(x.reshape(tile.shape), self.keep.tile(idx, qs, qe, ks, ke), out=tile)
        if self.dropout_scale != 1:
            np.multiply(out, self.dropout_scale, out=out)  # rule 13: keep / (1 - p), the factor rounded once


def _run(items: Sequence[Any], work: Callable[[_Workspace, Any], None], size: int, threads: int) -> None:
    """``work(workspace, item)`` for every item, with BLAS limited to one thread when threadpoolctl is
    importable: on a pool of ``threads`` threads when the call is at least ``POOL_WORK`` logit
    elements (``size``), else on the calling thread (which also runs everything without
    threadpoolctl, BLAS threading its own matmuls). Each worker thread runs with the caller's NumPy
    error state."""
    with _one_blas_thread():
        if threadpoolctl is None or size < POOL_WORK or threads <= 1 or len(items) <= 1:
            workspace = _Workspace()
            for item in items:
                work(workspace, item)
            return
        errors = np.geterr()
        local = threading.local()

        def run(item: Any) -> None:
            workspace = getattr(local, "workspace", None)
            if workspace is None:
                workspace = local.workspace = _Workspace()
            with np.errstate(**errors):
                work(workspace, item)

        with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
            for _ in pool.map(run, items):
                pass


def _forward(call: _Call, out_dtype: Any, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` on the grouped layout: out ``(*B, Hkv, G, L, Ev)`` in ``out_dtype`` (rounded once
    from the compute dtype), lse ``(*B, Hkv, G, L)`` in the compute dtype."""
    plan, compute = call.plan, call.compute
    out = np.empty(plan.grouped_shape(plan.value_dim), out_dtype)
    lse = np.empty(plan.grouped_shape(1)[:-1], compute)
    items: list[tuple[int, tuple[int, ...], int]] = []
    size = 0
    for qb in range(plan.num_query_blocks):
        qs, qe = call.query_block(qb)
        first, stop = plan.key_block_range(qs, qe)
        size += (stop - first) * (qe - qs) * (plan.block_k or 0) * plan.group_size * len(call.heads)
        items.extend((stop - first, idx, qb) for idx in call.heads)
    items.sort(key=lambda item: -item[0])  # the longest first: the pool's threads end together

    def work(ws: _Workspace, item: tuple[int, tuple[int, ...], int]) -> None:
        _, idx, qb = item
        _forward_item(call, ws, idx, qb, out, lse)

    _run(items, work, size, threads)
    return out, lse


def _forward_item(call: _Call, ws: _Workspace, idx: tuple[int, ...], qb: int, out: np.ndarray,
                  lse: np.ndarray) -> None:
    """Query block ``qb`` of the G query heads of kv head ``idx``: the online softmax of rule 19 over
    the key blocks causal and window leave, into ``out[idx][:, qs:qe]`` and ``lse[idx][:, qs:qe]``."""
    plan, compute = call.plan, call.compute
    qs, qe = call.query_block(qb)
    rows = plan.group_size * (qe - qs)
    m = ws.get("m", (rows,), compute)  # rule 19: m = -inf, l = 0, acc = 0
    m.fill(-np.inf)
    l_sum = ws.get("l", (rows,), compute)
    l_sum.fill(0)
    acc = ws.get("acc", (rows, plan.value_dim), compute)
    acc.fill(0)
    first, stop = plan.key_block_range(qs, qe)  # rule 19: the other key blocks are skipped
    if first < stop:
        q_tile = call.gather(ws, "q", call.q, idx, qs, qe)
        m_new = ws.get("m_new", (rows,), compute)
        shift = ws.get("shift", (rows,), compute)
        lowest = compute.type(np.finfo(compute).min)
        row_sum = ws.get("row_sum", (rows,), compute)
        pv = ws.get("pv", (rows, plan.value_dim), compute)
        k_head, v_head = call.k[idx], call.v[idx]
        for kb in range(first, stop):
            ks, ke = call.key_block(kb)
            x = call.logits(ws, idx, q_tile, qs, qe, ks, ke, k_head=k_head)
            np.maximum.reduce(x, axis=1, out=m_new)
            np.maximum(m_new, m, out=m_new)  # rule 19: m_new = max(m, max_j x_j)
            # rule 19: s = m_new if m_new > -inf; else any finite s gives the same p = 0 and alpha = 0
            # (every x and m are -inf then): the lowest finite number, without a pass to find them
            np.maximum(m_new, lowest, out=shift)
            np.subtract(m, shift, out=m)
            alpha = np.exp(m, out=m)  # rule 19: alpha = exp(m - s), 1 when m is unchanged, 0 before any key
            np.subtract(x, shift[:, None], out=x)
            np.exp(x, out=x)  # rule 19: p_j = exp(x_j - s), exactly 0 on excluded keys
            np.add.reduce(x, axis=1, out=row_sum)
            np.multiply(l_sum, alpha, out=l_sum)
            np.add(l_sum, row_sum, out=l_sum)  # rule 19: l = alpha l + sum_j p_j
            if call.keep is not None:
                call.dropout(idx, qs, qe, ks, ke, x, x)  # rule 13: p_j z_j
            np.multiply(acc, alpha[:, None], out=acc)
            np.matmul(x, v_head[ks:ke], out=pv)
            np.add(acc, pv, out=acc)  # rule 19: acc = alpha acc + sum_j p_j z_j v_j
            np.copyto(m, m_new)
    # rule 8: l = 0 exactly when no key was attended (the largest attended p is exp(0) = 1); then
    # out = 0 (acc is 0) and lse = m + log 1 = -inf
    l_safe = ws.get("l_safe", (rows,), compute)
    np.copyto(l_safe, l_sum)
    l_safe[l_safe == 0] = 1
    np.divide(acc, l_safe[:, None], out=acc)  # rule 19: out = acc / l
    np.log(l_safe, out=l_safe)
    np.add(m, l_safe, out=l_safe)  # rule 19: lse = m + log l
    heads, length = plan.group_size, qe - qs
    lse[idx][:, qs:qe] = l_safe.reshape(heads, length)
    np.copyto(out[idx][:, qs:qe], acc.reshape(heads, length, plan.value_dim), casting="unsafe")  # rule 10


def blocked_forward(plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any, *,
                    threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` of a blocked plan (rule 19) by the online softmax: out ``plan.out_shape`` in the
    input dtype (rounded once), lse ``plan.lse_shape`` in the compute dtype. q, k, v, mask, bias and
    dropout_mask as given to ``attention`` (None when absent); ``threads`` None: ``default_threads()``."""
    call = _Call(plan, q, k, v, mask, bias, dropout_mask)
    out, lse = _forward(call, numpy_dtype(plan.dtype), default_threads() if threads is None else threads)
    return out.reshape(plan.out_shape), lse.reshape(plan.lse_shape)


def _backward_items(call: _Call) -> list[tuple[list[tuple[int, ...]], int, int, int]]:
    """The backward's work items ``(kv heads, chunk, first key block, stop key block)``: the kv heads
    grouped by the slice of bias they share (one per group without a bias), times contiguous chunks
    of key blocks, at least ``MIN_BACKWARD_ITEMS`` items where the key blocks allow (one chunk when
    the bias has a single key column, so that no two items write one dbias entry)."""
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for idx in call.heads:
        groups.setdefault(idx if call.bias is None else call.bias.index(idx), []).append(idx)
    blocks = call.plan.num_key_blocks
    chunks = 1
    if call.bias is None or not call.bias.one_column:
        chunks = max(1, min(blocks, -(-MIN_BACKWARD_ITEMS // len(groups))))
    bounds = [c * blocks // chunks for c in range(chunks + 1)]
    return [(heads, c, bounds[c], bounds[c + 1]) for heads in groups.values() for c in range(chunks)]


def blocked_backward(plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any,
                     d_out: Any, *, threads: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(dq, dk, dv, dbias)`` of ``sum(out * d_out)`` for a blocked plan: the FlashAttention-2 backward
    of rule 19, after the blocked forward's out (compute dtype, not rounded) and lse. dq, dk, dv have
    the shapes and dtype of q, k, v; dbias (None without a bias) bias's shape and dtype, summed over
    its broadcast dims. Computed in the compute dtype; ``threads`` None: ``default_threads()``."""
    threads = default_threads() if threads is None else threads
    call = _Call(plan, q, k, v, mask, bias, dropout_mask)
    compute = call.compute
    out, lse = _forward(call, compute, threads)  # rule 19: O in the compute dtype, and lse
    d_out = np.asarray(d_out).astype(compute, copy=False).reshape(plan.grouped_shape(plan.value_dim))
    items = _backward_items(call)
    chunks = 1 + max(item[1] for item in items) if items else 1
    # dq of chunk 0 accumulates into dq itself; the other chunks into partials added in chunk order
    dq_parts = [np.zeros(plan.grouped_shape(plan.head_dim), compute) for _ in range(chunks)]
    dk = np.zeros(plan.kv_shape(plan.head_dim), compute)
    dv = np.zeros(plan.kv_shape(plan.value_dim), compute)
    dbias = None if bias is None else np.zeros(np.shape(bias), compute)
    dbias_view = None if dbias is None else _Operand(plan, dbias)
    size, costed = 0, []
    for heads, chunk, kb0, kb1 in items:
        cost = 0
        for qb in range(plan.num_query_blocks):
            qs, qe = call.query_block(qb)
            first, stop = plan.key_block_range(qs, qe)
            cost += max(0, min(stop, kb1) - max(first, kb0)) * (qe - qs)
        cost *= len(heads) * plan.group_size * (plan.block_k or 0)
        size += cost
        costed.append((cost, heads, chunk, kb0, kb1))
    costed.sort(key=lambda item: -item[0])

    def work(ws: _Workspace, item: tuple[int, list[tuple[int, ...]], int, int, int]) -> None:
        _, heads, chunk, kb0, kb1 = item
        for idx in heads:
            for qb in range(plan.num_query_blocks):
                _backward_item(call, ws, idx, qb, kb0, kb1, out, lse, d_out, dq_parts[chunk], dk, dv, dbias_view)

    _run(costed, work, size, threads)
    dq = dq_parts[0]
    for part in dq_parts[1:]:
        np.add(dq, part, out=dq)
    np.multiply(dq, call.scale, out=dq)  # rule 14: dq = scale dR k
    if not call.prescaled:
        np.multiply(dk, call.scale, out=dk)  # rule 14: dk = scale dR^T q (prescaled: q was scale q)
    return (
        dq.astype(numpy_dtype(plan.dtype), copy=False).reshape(np.shape(q)),
        dk.astype(numpy_dtype(plan.dtype), copy=False).reshape(np.shape(k)),
        dv.astype(numpy_dtype(plan.dtype), copy=False).reshape(np.shape(v)),
        None if dbias is None else dbias.astype(np.asarray(bias).dtype, copy=False),
    )


def _backward_item(call: _Call, ws: _Workspace, idx: tuple[int, ...], qb: int, kb0: int, kb1: int,
                   out: np.ndarray, lse: np.ndarray, d_out: np.ndarray, dq: np.ndarray, dk: np.ndarray,
                   dv: np.ndarray, dbias: _Operand | None) -> None:
    """Query block ``qb`` of the G query heads of kv head ``idx`` against its key blocks in
    ``kb0:kb1``: rule 14's formulas per tile with ``P = exp(x - lse)`` and ``D = rowsum(dO O)``
    (rule 19), adding into dq (a chunk's partial, before the scale), dk (before the scale unless q was
    prescaled), dv and dbias (compute dtype, the operand view of bias's shape)."""
    plan, compute = call.plan, call.compute
    qs, qe = call.query_block(qb)
    first, stop = plan.key_block_range(qs, qe)  # rule 19: the other key blocks are skipped
    first, stop = max(first, kb0), min(stop, kb1)
    if first >= stop:
        return
    heads, length = plan.group_size, qe - qs
    rows = heads * length
    q_tile = call.gather(ws, "q", call.q, idx, qs, qe)
    do_tile = call.gather(ws, "d_out", d_out, idx, qs, qe)
    o_tile = call.gather(ws, "out", out, idx, qs, qe)
    row_dot = ws.get("row_dot", (rows,), compute)
    np.multiply(o_tile, do_tile, out=o_tile)
    np.add.reduce(o_tile, axis=1, out=row_dot)  # rule 19: D_i = sum_c dO_ic O_ic
    row_lse = ws.get("lse", (rows,), compute)
    np.copyto(row_lse.reshape(heads, length), lse[idx][:, qs:qe])
    row_lse[row_lse == -np.inf] = np.inf  # rule 8: a fully excluded row's P is exactly 0 (x - inf = -inf)
    dq_tile = ws.get("dq", (rows, plan.head_dim), compute)
    dq_tile.fill(0)
    tanh = None
    k_head, v_head = call.k[idx], call.v[idx]
    for kb in range(first, stop):
        ks, ke = call.key_block(kb)
        width = ke - ks
        if call.softcap is not None:
            tanh = ws.get("tanh", (rows, width), compute)
        p = call.logits(ws, idx, q_tile, qs, qe, ks, ke, tanh, k_head)
        np.subtract(p, row_lse[:, None], out=p)
        np.exp(p, out=p)  # rule 19: P = exp(x - lse), exactly 0 on excluded keys
        d_weights = ws.get("d_weights", (rows, width), compute)
        np.matmul(do_tile, v_head[ks:ke].T, out=d_weights)  # rule 14: dW = dO v^T
        dropped = p
        if call.keep is not None:
            dropped = ws.get("dropped", (rows, width), compute)
            call.dropout(idx, qs, qe, ks, ke, p, dropped)  # rule 13: P Z
            call.dropout(idx, qs, qe, ks, ke, d_weights, d_weights)  # rule 14: dW = Z (dO v^T)
        kv_tile = ws.get("dv", (width, plan.value_dim), compute)
        np.matmul(dropped.T, do_tile, out=kv_tile)
        np.add(dv[idx][ks:ke], kv_tile, out=dv[idx][ks:ke])  # rule 14: dv = (P Z)^T dO, over the group
        np.subtract(d_weights, row_dot[:, None], out=d_weights)
        d_logits = np.multiply(d_weights, p, out=d_weights)  # rule 14: dS = P (dW - D)
        if dbias is not None:
            _add_to_bias(dbias, idx, qs, qe, ks, ke, d_logits.reshape(heads, length, width))
        if tanh is not None:
            np.multiply(tanh, tanh, out=tanh)
            np.subtract(1, tanh, out=tanh)
            np.multiply(d_logits, tanh, out=d_logits)  # rule 14: dR = dS (1 - tanh^2)
        q_part = ws.get("dq_part", (rows, plan.head_dim), compute)
        np.matmul(d_logits, k_head[ks:ke], out=q_part)
        np.add(dq_tile, q_part, out=dq_tile)  # rule 14: dq = scale dR k (the scale at the end)
        k_part = ws.get("dk", (width, plan.head_dim), compute)
        np.matmul(d_logits.T, q_tile, out=k_part)
        np.add(dk[idx][ks:ke], k_part, out=dk[idx][ks:ke])  # rule 14: dk = scale dR^T q, over the group
    target = dq[idx][:, qs:qe]
    np.add(target, dq_tile.reshape(target.shape), out=target)


def _add_to_bias(dbias: _Operand, idx: tuple[int, ...], qs: int, qe: int, ks: int, ke: int,
                 d_logits: np.ndarray) -> None:
    """Add a tile's dS ``(G, qe - qs, ke - ks)`` into dbias's tile, summed over its broadcast dims (rule 14)."""
    target = dbias.tile(idx, qs, qe, ks, ke)
    axes = tuple(a for a in range(3) if target.shape[a] == 1 and d_logits.shape[a] != 1)
    part = np.add.reduce(d_logits, axis=axes, keepdims=True) if axes else d_logits
    np.add(target, part, out=target)
