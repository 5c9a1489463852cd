"""The torch backend's blocked algorithm (SPEC.md rule 19): attention in bounded memory, tile by tile,
on the device of the input tensors.

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
A = (*B, Hkv) the head axes of k and v (``(1,)`` for rank-2 inputs), R = prod(A), L queries, S keys,
E q/k head dim, Ev value head dim, bq and bk the tile (``plan.block_q``, ``plan.block_k``), nq <= bq
and nk <= bk the queries and keys of one tile.

Layout: q is held as ``(R, G, L, E)``, k as ``(R, S, E)``, v as ``(R, S, Ev)``; mask, bias and dropout
mask as views ``(*A|1, G|1, L|1, S|1)`` of the arrays given (a dim of size 1 stays 1), sliced per tile
on their own shape and broadcast only against the tile. A tile holds a *chunk* of r kv heads (a
rectangular block of A whose rows are consecutive in R) with all G query heads of each stacked along
the query axis, so that its logits are one ``(r, G * nq, nk)`` array: one batched matmul per tile,
and the sums over the query heads of a kv head in dk and dv happen inside the matmul (rule 2). Chunks
hold about ``TILE_BYTES`` of logits on the CPU (``DEVICE_TILE_BYTES`` elsewhere).

Work: the items are (chunk, query block) pairs. On the CPU they run on ``torch.get_num_threads()``
Python threads, each item's torch ops single-threaded (torch releases the GIL inside them): one
parallel region per call instead of one per op, which matters on a loaded machine (the OpenMP
barriers of small per-op regions stall whenever a thread is descheduled). The forward hands items out
as threads free up (each item is computed the same way whatever thread runs it); the backward assigns
them statically (largest first, to the least loaded thread), each thread summing dk, dv (and dbias
where items share entries) in its own accumulator, added in thread order, so that gradients are
reproducible for a given thread count. On other devices the items run in order in the calling
thread. No Python-side synchronisation with the device: which key blocks an item visits is
arithmetic on the plan (``plan.key_block_range``).

Memory: besides the inputs, their compute-dtype copies (none when they already are in it), the output
(and out in the compute dtype, for the backward) and the gradients, each thread holds a few tile-sized
arrays (``r * G * bq * bk`` elements) and per-row statistics; the backward's threads also hold
k- and v-sized accumulators.

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..plan import AttentionPlan
from .torch import ieee_float32_matmul

_NEG_INF = -math.inf

#: About how many bytes of logits one tile holds (all its kv heads together), chosen by measurement
#: on a 2-core CPU (1 MiB L2 per core): large enough that each op's fixed cost is small, small enough
#: that a thread's tile stays in its cache (float64 at 4096 keys: 1.17x SDPA at 1-2 MiB, 1.25x at 8 MiB).
TILE_BYTES = 1 << 20
#: The same on other devices (CUDA), where each op is a kernel launch: one chunk holds every kv head
#: unless that passes 256 MiB of logits.
DEVICE_TILE_BYTES = 1 << 28


def _operand(plan: AttentionPlan, x: torch.Tensor | None) -> torch.Tensor | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)`` as a view
    ``(*A|1, G|1, L|1, S|1)`` (a dim of size 1 stays 1); None stays None. Nothing is copied or
    broadcast."""
    if x is None:
        return None
    shape = (1,) * (len(plan.logits_shape) - x.dim()) + tuple(x.shape)
    if not plan.has_head_axis:
        return x.reshape(1, 1, *shape)  # rank 2: one kv head, one query head
    batch, heads, tail = shape[:-3], shape[-3], shape[-2:]
    split = (plan.num_kv_heads, plan.group_size) if heads != 1 else (1, 1)  # rule 2: query head h = g * G + r
    return x.reshape(*batch, *split, *tail)


@dataclass(frozen=True)
class _Chunk:
    """Consecutive rows ``start:stop`` of R that form a rectangular block of the head axes A
    (``index`` slices each axis of A: a fixed index, the chunk's range on one axis, all of the axes
    after it; ``shape`` is the block's shape), and the query heads ``heads`` (``group`` of the G) of
    each of its kv heads."""

    start: int
    stop: int
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    heads: slice
    group: int

    def of(self, operand: torch.Tensor) -> tuple[slice, ...]:
        """The index of this chunk into an ``_operand`` view's A axes (a size-1 axis stays whole)."""
        return tuple(slice(None) if size == 1 else s for size, s in zip(operand.shape, self.index, strict=False))


def _chunks(axes: tuple[int, ...], rows: int, group: int, heads: int) -> list[_Chunk]:
    """The head axes A cut into rectangular blocks of about ``rows`` rows (at least one) each, and
    the G = ``group`` query heads of each kv head into ranges of ``heads``."""
    rows = max(1, rows)
    ranges = [slice(g, min(group, g + heads)) for g in range(0, group, max(1, heads))]
    axis = len(axes) - 1  # the first axis whose suffix (it and the axes after it) exceeds rows
    while axis > 0 and math.prod(axes[axis:]) <= rows:
        axis -= 1
    suffix = math.prod(axes[axis + 1:])
    step = max(1, rows // suffix)
    chunks = []
    for prefix in itertools.product(*(range(n) for n in axes[:axis])):
        base = 0
        for i, n in zip(prefix, axes[:axis], strict=True):
            base = base * n + i
        for first in range(0, axes[axis], step):
            last = min(axes[axis], first + step)
            index = (*(slice(i, i + 1) for i in prefix), slice(first, last), *(slice(None) for _ in axes[axis + 1:]))
            start = (base * axes[axis] + first) * suffix
            shape = (*(1 for _ in prefix), last - first, *axes[axis + 1:])
            for g in ranges:
                chunks.append(_Chunk(start, start + (last - first) * suffix, index, shape, g, g.stop - g.start))
    return chunks


class _Tiles:
    """What every tile of one call shares (read only once built): the grouped inputs in the compute
    dtype, the operand views, the scalars, the chunks and the causal/window exclusion of the tiles
    that straddle the band's edges (rule 7)."""

    def __init__(self, plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor | None, dropout_mask: torch.Tensor | None) -> None:
        assert plan.block_q is not None and plan.block_k is not None
        compute = getattr(torch, plan.compute_dtype)
        self.plan = plan
        self.device = q.device
        self.compute = compute
        self.axes = (*plan.batch_shape, plan.num_kv_heads) if plan.has_head_axis else (1,)
        self.rows = math.prod(self.axes)  # R
        self.group = plan.group_size
        # rule 10: inputs widened exactly; rule 1: a rank-2 input is one head; rule 2: kv head h // G
        self.q = q.to(compute).reshape(self.rows, self.group, plan.q_len, plan.head_dim)
        self.k = k.to(compute).reshape(self.rows, plan.kv_len, plan.head_dim)
        self.v = v.to(compute).reshape(self.rows, plan.kv_len, plan.value_dim)
        self.mask = _operand(plan, mask)
        self.bias = _operand(plan, None if bias is None else bias.to(compute))  # rule 5: converted exactly
        self.keep = _operand(plan, dropout_mask)
        self.scale = plan.scale  # rule 3: rounded once to the compute dtype, as the matmul's alpha
        # rule 4: a tensor, so that the division is a true division on every device
        self.softcap = None if plan.softcap is None else torch.tensor(plan.softcap, dtype=compute, device=self.device)
        # rule 13: 1 / (1 - p) computed in float64, rounded once to the compute dtype
        self.dropout_scale = torch.tensor(plan.dropout_scale, dtype=compute, device=self.device)
        self.rescale_dropout = plan.dropout_p != 0.0
        self.low, self.high = plan.key_range
        self.lowest = torch.finfo(compute).min
        self.exp_floor = -87.0 if compute == torch.float32 else -708.0  # exp of it: a normal number
        self.exp_floor_value = torch.tensor(self.exp_floor, dtype=compute).exp().item()
        # MKL's float64 gemm is about twice as fast for dv^T = dO^T P as for dv = P^T dO (measured on
        # a 2-core AMD EPYC); float32 and other devices are as fast either way
        self.transposed_kv_grads = self.device.type == "cpu" and compute == torch.float64
        # query heads per tile: the budget over one head's tile; whole kv heads (G query heads each)
        # while they fit, else a range of one kv head's query heads
        budget = TILE_BYTES if self.device.type == "cpu" else DEVICE_TILE_BYTES
        per_tile = max(1, budget // max(1, plan.block_q * plan.block_k * self.q.element_size()))
        rows, heads = (max(1, per_tile // self.group), self.group) if per_tile >= self.group else (1, per_tile)
        query_blocks = max(1, plan.num_query_blocks)
        threads = self.threads(self.rows * self.group * query_blocks)
        while math.ceil(self.rows / rows) * math.ceil(self.group / heads) * query_blocks < threads:
            rows, heads = (math.ceil(rows / 2), heads) if rows > 1 else (rows, math.ceil(heads / 2))  # more items
        self.chunks = _chunks(self.axes, rows, self.group, heads)
        self.stacked_heads = max((c.stop - c.start) * c.group for c in self.chunks)  # per tile, at most
        self._bands: dict[tuple[int, int, int], torch.Tensor | None] = {}
        self._lock = threading.Lock()

    def items(self) -> list[tuple[int, _Chunk, int, int, int]]:
        """Every ``(cost, chunk, q_start, q_stop, index)``, costliest first (cost: kv heads times
        visited keys; index: the item's place in chunk-major, query-block order)."""
        plan = self.plan
        assert plan.block_q is not None
        items: list[tuple[int, _Chunk, int, int, int]] = []
        for chunk in self.chunks:
            for q_start in range(0, plan.q_len, plan.block_q):
                q_stop = min(plan.q_len, q_start + plan.block_q)
                keys = sum(stop - start for start, stop in self.key_tiles(q_start, q_stop))
                items.append((keys * (chunk.stop - chunk.start) * chunk.group, chunk, q_start, q_stop, len(items)))
        return sorted(items, key=lambda item: (-item[0], item[4]))

    def key_tiles(self, q_start: int, q_stop: int) -> list[tuple[int, int]]:
        """The ``(k_start, k_stop)`` key ranges queries ``q_start:q_stop`` visit: the key blocks of
        ``plan.key_block_range`` (rule 19: the others are skipped), each cut to the keys that causal
        and the window leave any of these queries (the keys cut off have weight 0 for all of them)."""
        plan = self.plan
        assert plan.block_k is not None
        first, stop = plan.key_block_range(q_start, q_stop)
        low, high = self.low, self.high
        first_key = 0 if low is None else max(0, q_start + low)
        stop_key = plan.kv_len if high is None else min(plan.kv_len, q_stop + high)
        return [(max(first_key, b * plan.block_k), min(stop_key, (b + 1) * plan.block_k)) for b in range(first, stop)]

    def threads(self, items: int) -> int:
        """How many threads run the items: ``torch.get_num_threads()`` on the CPU, else 1."""
        return max(1, min(items, torch.get_num_threads())) if self.device.type == "cpu" else 1

    def band_exclusion(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> torch.Tensor | None:
        """Boolean ``(nq, nk)``: True where causal or the window (rule 7, ``plan.key_range``) excludes
        the key; None when the tile lies inside the band (the interior tiles build no mask)."""
        low, high = self.low, self.high
        inside_low = low is None or k_start - (q_stop - 1) >= low
        inside_high = high is None or (k_stop - 1) - q_start <= high
        if inside_low and inside_high:
            return None
        key = (k_start - q_start, q_stop - q_start, k_stop - k_start)
        with self._lock:
            band = self._bands.get(key)
        if band is None:
            key_minus_query = (torch.arange(k_start, k_stop, device=self.device)
                               - torch.arange(q_start, q_stop, device=self.device)[:, None])
            band = torch.zeros(key_minus_query.shape, dtype=torch.bool, device=self.device)
            if low is not None:
                band |= key_minus_query < low
            if high is not None:
                band |= key_minus_query > high
            with self._lock:
                self._bands[key] = band
        return band

    def query_block(self, x: torch.Tensor, chunk: _Chunk, q_start: int, q_stop: int) -> torch.Tensor:
        """The chunk's rows ``q_start:q_stop`` of an ``(R, G, L, C)`` array as ``(r, g * nq, C)`` (the g
        query heads of the chunk stacked; a copy when g > 1)."""
        block = x[chunk.start:chunk.stop, chunk.heads, q_start:q_stop]
        return block.reshape(chunk.stop - chunk.start, chunk.group * (q_stop - q_start), x.shape[-1])

    def operand_tile(self, operand: torch.Tensor, chunk: _Chunk, q_start: int, q_stop: int, k_start: int,
                     k_stop: int) -> torch.Tensor:
        """The ``(chunk, q_start:q_stop, k_start:k_stop)`` tile of an ``_operand`` view (size-1 dims
        stay 1), broadcastable to the tile's ``(*chunk.shape, g, nq, nk)`` view."""
        heads = slice(None) if operand.shape[-3] == 1 else chunk.heads
        rows = slice(None) if operand.shape[-2] == 1 else slice(q_start, q_stop)
        cols = slice(None) if operand.shape[-1] == 1 else slice(k_start, k_stop)
        return operand[(*chunk.of(operand), heads, rows, cols)]

    def tile_view(self, x: torch.Tensor, chunk: _Chunk, q_start: int, q_stop: int) -> torch.Tensor:
        """A tile ``(r, g * nq, nk)`` viewed as ``(*chunk.shape, g, nq, nk)``, the operands' layout."""
        return x.view(*chunk.shape, chunk.group, q_stop - q_start, x.shape[-1])

    def logits(self, x: torch.Tensor, qt: torch.Tensor, chunk: _Chunk, q_start: int, q_stop: int, k_start: int,
               k_stop: int, capped: torch.Tensor | None = None) -> torch.Tensor:
        """The tile's logits, written into x ``(r, G * nq, nk)``, of the stacked query block qt
        ``(r, G * nq, E)``: scaled, capped, biased, and -inf on every excluded key (rules 3-8).
        With a softcap, ``tanh(raw / softcap)`` is also written to ``capped`` when given."""
        kt = self.k[chunk.start:chunk.stop, k_start:k_stop].transpose(1, 2)
        torch.baddbmm(x, qt, kt, beta=0, alpha=self.scale, out=x)  # rule 3: x = scale * (q · k)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_()  # rule 4: c * tanh(x / c), before the bias
            if capped is not None:
                capped.copy_(x)
            x.mul_(self.softcap)
        x5 = self.tile_view(x, chunk, q_start, q_stop)
        if self.bias is not None:
            x5.add_(self.operand_tile(self.bias, chunk, q_start, q_stop, k_start, k_stop))  # rule 5
        if self.mask is not None:
            x5.masked_fill_(~self.operand_tile(self.mask, chunk, q_start, q_stop, k_start, k_stop), _NEG_INF)  # rule 6
        band = self.band_exclusion(q_start, q_stop, k_start, k_stop)
        if band is not None:
            x5.masked_fill_(band, _NEG_INF)  # rule 7: only tiles straddling the band's edges
        return x  # rule 8: a -inf logit (bias) stays -inf and excludes its key

    def exp_shifted(self, x: torch.Tensor, shift: torch.Tensor, q_start: int, q_stop: int, k_start: int,
                    k_stop: int) -> torch.Tensor:
        """``exp(x - shift)`` in place of the tile's logits x (shift ``(r, rows, 1)``): exactly 0 where x
        is -inf. On the CPU, torch's exp takes a slow path (2-3x for -inf, 20x for results below the
        smallest normal number) on arguments below ``exp_floor`` (about ln of the smallest normal):
        those are clamped to it and their results set to 0, i.e. subnormal weights flushed to zero,
        which rule 10's bounds allow (``tiny``). A tile is checked for such arguments (one reduction)
        unless it may hold excluded keys (mask, bias, or the band's edge), which it always treats."""
        x.sub_(shift)
        if self.device.type != "cpu":
            return x.exp_()
        excluded = (self.mask is not None or self.bias is not None
                    or self.band_exclusion(q_start, q_stop, k_start, k_stop) is not None)
        if not excluded and not torch.amin(x).item() < self.exp_floor:  # NaN: not below, and exp keeps it
            return x.exp_()
        return torch.nn.functional.threshold_(x.clamp_min_(self.exp_floor).exp_(), self.exp_floor_value, 0.0)

    def apply_dropout(self, p: torch.Tensor, chunk: _Chunk, q_start: int, q_stop: int, k_start: int,
                      k_stop: int) -> None:
        """Multiply the tile p ``(r, G * nq, nk)`` in place by ``keep / (1 - p)`` (rule 13)."""
        assert self.keep is not None
        keep = self.operand_tile(self.keep, chunk, q_start, q_stop, k_start, k_stop)
        self.tile_view(p, chunk, q_start, q_stop).masked_fill_(~keep, 0)
        if self.rescale_dropout:
            p.mul_(self.dropout_scale)


class _Workspace:
    """One thread's reusable storage: ``count`` flat arrays of ``size`` compute-dtype elements, each
    handed out as a contiguous array of any shape that fits."""

    def __init__(self, tiles: _Tiles, size: int, count: int) -> None:
        self._storage = [torch.empty(size, dtype=tiles.compute, device=tiles.device) for _ in range(count)]

    def array(self, index: int, *shape: int) -> torch.Tensor:
        return self._storage[index][: math.prod(shape)].view(*shape)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, kept for later calls (per process: a forked child's pool threads
    do not exist, so it makes its own)."""
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="attention_ref-torch")
        return _POOLS[key]


def _run(threads: int, work: Callable[[int, Any], None], assignments: Sequence[Sequence[Any]] | None = None,
         queue: Sequence[Any] | None = None) -> None:
    """Run ``work(thread, item)`` for every item: thread t takes ``assignments[t]`` in order, or all
    threads take the items of ``queue`` in order as they free up. With one thread, in the calling
    thread; else on a pool, each thread's torch ops single-threaded and without autograd."""
    if threads == 1:
        for item in queue if queue is not None else assignments[0] if assignments else ():
            work(0, item)
        return
    lock, pending = threading.Lock(), iter(queue or ())
    failed = threading.Event()

    def next_item(thread: int, position: int) -> tuple[bool, Any]:
        if failed.is_set():
            return False, None
        if assignments is not None:
            mine = assignments[thread]
            return (True, mine[position]) if position < len(mine) else (False, None)
        with lock:
            item = next(pending, _DONE)
        return item is not _DONE, item

    def worker(thread: int) -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread's ops: the threads are the parallelism
        try:
            with torch.no_grad():
                for position in itertools.count():
                    more, item = next_item(thread, position)
                    if not more:
                        return
                    work(thread, item)
        except BaseException:
            failed.set()
            raise
        finally:
            torch.set_num_threads(previous)

    caller = torch.get_num_threads()
    try:
        futures = [_pool(threads).submit(worker, t) for t in range(threads)]
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(caller)  # the default ATen gives new threads: the caller's, as before


_DONE = object()


# ---- forward ---------------------------------------------------------------------------------------


def _forward_item(tiles: _Tiles, ws: _Workspace, chunk: _Chunk, q_start: int, q_stop: int, out: torch.Tensor,
                  lse: torch.Tensor) -> None:
    """The online softmax (rule 19) of one chunk and query block, written into out ``(R, G, L, Ev)``
    (any floating dtype: rounded once, from the compute dtype) and lse ``(R, G, L)`` (compute dtype)."""
    plan = tiles.plan
    assert plan.block_k is not None
    rows, stacked, nq = chunk.stop - chunk.start, chunk.group * (q_stop - q_start), q_stop - q_start
    out_block = out[chunk.start:chunk.stop, chunk.heads, q_start:q_stop]
    lse_block = lse[chunk.start:chunk.stop, chunk.heads, q_start:q_stop]
    key_tiles = tiles.key_tiles(q_start, q_stop)  # rule 19: the other key blocks are skipped
    if not key_tiles:  # rule 8: every key excluded: out 0, lse -inf
        out_block.zero_()
        lse_block.fill_(_NEG_INF)
        return
    qt = tiles.query_block(tiles.q, chunk, q_start, q_stop)
    acc = ws.array(1, rows, stacked, plan.value_dim)
    m = l_sum = torch.empty(0)
    for block, (k_start, k_stop) in enumerate(key_tiles):
        x = tiles.logits(ws.array(0, rows, stacked, k_stop - k_start), qt, chunk, q_start, q_stop, k_start, k_stop)
        tile_max = torch.amax(x, dim=-1, keepdim=True)  # per-row statistics as (r, G * nq, 1)
        m_new = tile_max if block == 0 else torch.maximum(m, tile_max)  # rule 19: m_new = max(m, max x)
        # s = m_new if m_new > -inf: a row whose m_new is -inf has x = -inf so far, so any finite s
        # gives it what s = 0 gives (p = 0, alpha = 0); one op instead of three
        s = torch.clamp_min(m_new, tiles.lowest)
        p = tiles.exp_shifted(x, s, q_start, q_stop, k_start, k_stop)  # p = exp(x - s): exactly 0 on excluded keys
        row_sum = p.sum(dim=-1, keepdim=True)
        if tiles.keep is not None:
            tiles.apply_dropout(p, chunk, q_start, q_stop, k_start, k_stop)  # z, after l's sum (rule 13)
        vt = tiles.v[chunk.start:chunk.stop, k_start:k_stop]
        if block == 0:  # m = -inf, l = 0, acc = 0: alpha does not matter
            l_sum = row_sum
            torch.bmm(p, vt, out=acc)
        else:
            alpha = torch.sub(m, s).exp_()  # exactly 1 when m is unchanged, 0 while no key was attended
            l_sum = row_sum.addcmul_(l_sum, alpha)  # l = alpha l + sum p
            acc.mul_(alpha).baddbmm_(p, vt)  # acc = alpha acc + p (z) v
        m = m_new
    empty = l_sum == 0  # rule 8: a fully excluded row
    safe = l_sum.masked_fill_(empty, 1)
    acc.div_(safe)  # out = acc / l (exactly 0 where l = 0: acc is 0 there)
    out_block.copy_(acc.view(rows, chunk.group, nq, plan.value_dim))
    block_lse = m.add_(safe.log_()).masked_fill_(empty, _NEG_INF)  # lse = m + log l, or -inf
    lse_block.copy_(block_lse.view(rows, chunk.group, nq))


def _forward_arrays(tiles: _Tiles, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``plan.out_shape`` in ``out_dtype``, lse ``plan.lse_shape`` in the compute
    dtype."""
    plan = tiles.plan
    assert plan.block_q is not None and plan.block_k is not None
    out = torch.empty(tiles.rows, tiles.group, plan.q_len, plan.value_dim, dtype=out_dtype, device=tiles.device)
    lse = torch.empty(tiles.rows, tiles.group, plan.q_len, dtype=tiles.compute, device=tiles.device)
    items = tiles.items()
    threads = tiles.threads(len(items))
    stacked = tiles.stacked_heads * plan.block_q
    sizes = (stacked * plan.block_k, stacked * plan.value_dim)
    workspaces: list[_Workspace | None] = [None] * threads

    def work(thread: int, item: tuple[int, _Chunk, int, int, int]) -> None:
        ws = workspaces[thread]
        if ws is None:
            ws = workspaces[thread] = _Workspace(tiles, max(sizes), 2)
        _forward_item(tiles, ws, item[1], item[2], item[3], out, lse)

    _run(threads, work, queue=items)
    return out.reshape(plan.out_shape), lse.reshape(plan.lse_shape)


# ---- backward --------------------------------------------------------------------------------------


@dataclass
class _Gradients:
    """Compute-dtype gradient accumulators: dq ``(R, G, L, E)``, dk ``(R, S, E)``, dv ``(R, S, Ev)``
    (or, with ``tiles.transposed_kv_grads``, dk ``(R, E, S)`` and dv ``(R, Ev, S)``), dbias in the
    bias's ``_operand`` shape; None where not computed."""

    dq: torch.Tensor | None
    dk: torch.Tensor | None
    dv: torch.Tensor | None
    dbias: torch.Tensor | None


def _backward_item(tiles: _Tiles, ws: _Workspace, grads: _Gradients, chunk: _Chunk, q_start: int, q_stop: int,
                   out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor | None) -> None:
    """The FlashAttention-2 backward (rule 19) of one chunk and query block: dq written, dk, dv and
    dbias added into ``grads``. out, d_out ``(R, G, L, Ev)``, lse, d_lse ``(R, G, L)``, compute dtype."""
    plan = tiles.plan
    assert plan.block_k is not None
    key_tiles = tiles.key_tiles(q_start, q_stop)  # rule 19: skipped keys have zero gradient
    if not key_tiles:
        return
    need_ds = grads.dq is not None or grads.dk is not None or grads.dbias is not None
    rows, nq = chunk.stop - chunk.start, q_stop - q_start
    stacked = chunk.group * nq
    qt = tiles.query_block(tiles.q, chunk, q_start, q_stop)
    dot = tiles.query_block(d_out, chunk, q_start, q_stop)
    # rule 19: D = rowsum(dO * O) replaces rowsum(P dW); a cotangent of lse adds P d_lse to dS
    big_d = (dot * tiles.query_block(out, chunk, q_start, q_stop)).sum(dim=-1)
    if d_lse is not None:
        big_d = big_d.sub_(tiles.query_block(d_lse.unsqueeze(-1), chunk, q_start, q_stop)[..., 0])
    block_lse = tiles.query_block(lse.unsqueeze(-1), chunk, q_start, q_stop)[..., 0]
    shift = block_lse.masked_fill(block_lse == _NEG_INF, 0).unsqueeze(-1)  # fully excluded rows: P = 0
    dq_block = None
    if grads.dq is not None:
        dq_block = ws.array(3, rows, stacked, plan.head_dim)
        dq_block.zero_()
    for k_start, k_stop in key_tiles:
        nk = k_stop - k_start
        capped = ws.array(2, rows, stacked, nk) if tiles.softcap is not None and need_ds else None
        p = tiles.logits(ws.array(0, rows, stacked, nk), qt, chunk, q_start, q_stop, k_start, k_stop, capped)
        tiles.exp_shifted(p, shift, q_start, q_stop, k_start, k_stop)  # P = exp(x - lse), exactly 0 on excluded keys
        # and fully excluded rows
        kt = tiles.k[chunk.start:chunk.stop, k_start:k_stop]
        vt = tiles.v[chunk.start:chunk.stop, k_start:k_stop]
        if grads.dv is not None:
            dropped = p
            if tiles.keep is not None:
                dropped = ws.array(1, rows, stacked, nk)
                dropped.copy_(p)
                tiles.apply_dropout(dropped, chunk, q_start, q_stop, k_start, k_stop)
            if tiles.transposed_kv_grads:
                grads.dv[chunk.start:chunk.stop, :, k_start:k_stop].baddbmm_(dot.transpose(1, 2), dropped)
            else:
                grads.dv[chunk.start:chunk.stop, k_start:k_stop].baddbmm_(dropped.transpose(1, 2), dot)  # (P Z)^T dO
        if not need_ds:
            continue
        ds = ws.array(1, rows, stacked, nk)
        torch.bmm(dot, vt.transpose(1, 2), out=ds)  # dO v^T
        if tiles.keep is not None:
            tiles.apply_dropout(ds, chunk, q_start, q_stop, k_start, k_stop)  # dW = Z (dO v^T)
        ds.sub_(big_d.unsqueeze(-1)).mul_(p)  # dS = P (dW - D)
        if grads.dbias is not None:
            target = tiles.operand_tile(grads.dbias, chunk, q_start, q_stop, k_start, k_stop)
            target.add_(tiles.tile_view(ds, chunk, q_start, q_stop).sum_to_size(target.shape))  # summed to bias
        if capped is not None:
            ds.mul_(capped.square_().neg_().add_(1))  # dR = dS (1 - tanh^2(raw / c))
        if dq_block is not None:
            dq_block.baddbmm_(ds, kt, alpha=tiles.scale)  # dq = scale dR k
        if grads.dk is not None:
            if tiles.transposed_kv_grads:
                grads.dk[chunk.start:chunk.stop, :, k_start:k_stop].baddbmm_(qt.transpose(1, 2), ds, alpha=tiles.scale)
            else:  # dk = scale dR^T q, summed over the chunk's query heads
                grads.dk[chunk.start:chunk.stop, k_start:k_stop].baddbmm_(ds.transpose(1, 2), qt, alpha=tiles.scale)
    if grads.dq is not None and dq_block is not None:
        grads.dq[chunk.start:chunk.stop, chunk.heads, q_start:q_stop] = dq_block.view(rows, chunk.group, nq,
                                                                                         plan.head_dim)


def _kv_accumulator(tiles: _Tiles, x: torch.Tensor) -> torch.Tensor:
    """Zeros for dk or dv: ``(R, S, C)``, or ``(R, C, S)`` with ``tiles.transposed_kv_grads`` (read back
    as ``(R, S, C)`` through ``.transpose(1, 2)``)."""
    if tiles.transposed_kv_grads:
        return torch.zeros(x.shape[0], x.shape[2], x.shape[1], dtype=x.dtype, device=x.device)
    return torch.zeros_like(x)


def _backward(
    tiles: _Tiles, out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor | None, d_lse: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> _Gradients:
    """The FlashAttention-2 backward (rule 19) from the forward's out (``plan.out_shape``, compute
    dtype, unrounded) and lse (``plan.lse_shape``), for the cotangents d_out (``plan.out_shape``; None:
    zero) and d_lse (``plan.lse_shape``; None: zero). ``needs`` says which of dq, dk, dv, dbias to
    compute (the others are None)."""
    plan = tiles.plan
    assert plan.block_q is not None and plan.block_k is not None
    need_dq, need_dk, need_dv, need_dbias = needs
    group, rows, compute, device = tiles.group, tiles.rows, tiles.compute, tiles.device
    out = out.reshape(rows, group, plan.q_len, plan.value_dim)
    lse = lse.reshape(rows, group, plan.q_len)
    d_out = torch.zeros_like(out) if d_out is None else d_out.to(compute).reshape(out.shape)
    d_lse = None if d_lse is None else d_lse.to(compute).reshape(lse.shape)
    bias_shape = None if tiles.bias is None else tiles.bias.shape
    shared = _Gradients(
        torch.zeros_like(tiles.q) if need_dq else None,
        _kv_accumulator(tiles, tiles.k) if need_dk else None,
        _kv_accumulator(tiles, tiles.v) if need_dv else None,
        torch.zeros(bias_shape, dtype=compute, device=device) if need_dbias and bias_shape is not None else None,
    )
    items = tiles.items()
    threads = tiles.threads(len(items))
    # dq rows belong to one item each; dk and dv rows to every query block and query-head range of a
    # kv head; dbias entries to one item when the bias has every query and is full along the head
    # axes (A and G) the chunks cut
    bias_private = bias_shape is not None and (bias_shape[-2] == 1 or (
        len(tiles.chunks) > 1 and any(n == 1 for n in bias_shape[:len(tiles.axes) + 1])))
    private: list[_Gradients] = [shared]
    for _ in range(1, threads):
        private.append(_Gradients(
            shared.dq,
            None if shared.dk is None else torch.zeros_like(shared.dk),
            None if shared.dv is None else torch.zeros_like(shared.dv),
            None if shared.dbias is None else torch.zeros_like(shared.dbias) if bias_private else shared.dbias,
        ))
    loads, assignments = [0] * threads, [[] for _ in range(threads)]  # type: ignore[var-annotated]
    for item in items:  # largest first, each to the least loaded thread: reproducible for a thread count
        thread = loads.index(min(loads))
        loads[thread] += item[0]
        assignments[thread].append(item)
    stacked = tiles.stacked_heads * plan.block_q
    size = max(stacked * plan.block_k, stacked * plan.head_dim)
    workspaces: list[_Workspace | None] = [None] * threads

    def work(thread: int, item: tuple[int, _Chunk, int, int, int]) -> None:
        ws = workspaces[thread]
        if ws is None:
            ws = workspaces[thread] = _Workspace(tiles, size, 4)
        _backward_item(tiles, ws, private[thread], item[1], item[2], item[3], out, lse, d_out, d_lse)

    _run(threads, work, assignments=assignments)
    for extra in private[1:]:  # in thread order
        for name in ("dk", "dv", "dbias"):
            total, part = getattr(shared, name), getattr(extra, name)
            if total is not None and part is not total:
                total.add_(part)
    if tiles.transposed_kv_grads:
        shared.dk = None if shared.dk is None else shared.dk.transpose(1, 2)
        shared.dv = None if shared.dv is None else shared.dv.transpose(1, 2)
    return shared


def _gradients_out(grads: _Gradients, like: Sequence[tuple[torch.Size, torch.dtype] | None]
                   ) -> tuple[torch.Tensor | None, ...]:
    """The compute-dtype gradients in the shapes and dtypes of q, k, v and bias (``like``)."""
    result = []
    for g, target in zip((grads.dq, grads.dk, grads.dv, grads.dbias), like, strict=True):
        # rule 14: gradients returned in the input dtype, dbias in bias's
        result.append(None if g is None or target is None else g.reshape(target[0]).to(target[1]))
    return tuple(result)


def _like(*arrays: torch.Tensor | None) -> list[tuple[torch.Size, torch.dtype] | None]:
    return [None if x is None else (x.shape, x.dtype) for x in arrays]


# ---- the public functions ----------------------------------------------------------------------------


def blocked_forward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` by the blocked algorithm (rule 19) for a blocked plan: out ``plan.out_shape``
    rounded once to ``plan.dtype``, lse ``plan.lse_shape`` in the compute dtype. mask, bias and
    dropout_mask are as given to ``attention`` (None when absent). Builds no autograd graph."""
    with torch.no_grad():
        tiles = _Tiles(plan, q, k, v, mask, bias, dropout_mask)
        return _forward_arrays(tiles, getattr(torch, plan.dtype))  # rule 11: out rounded once


def blocked_backward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None, d_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dq, dk, dv, dbias)``, the gradients of ``sum(out * d_out)`` by the FlashAttention-2 backward
    (rule 19), d_out ``plan.out_shape``: the blocked forward's out (compute dtype, unrounded) and lse
    are recomputed first. dq, dk, dv in the shapes and dtype of q, k, v; dbias (None without a bias)
    in bias's shape and dtype."""
    with torch.no_grad():
        tiles = _Tiles(plan, q, k, v, mask, bias, dropout_mask)
        out, lse = _forward_arrays(tiles, tiles.compute)
        grads = _backward(tiles, out, lse, d_out, None, (True, True, True, bias is not None))
        dq, dk, dv, dbias = _gradients_out(grads, _like(q, k, v, bias))
    assert dq is not None and dk is not None and dv is not None
    return dq, dk, dv, dbias


class BlockedAttention(torch.autograd.Function):
    """``BlockedAttention.apply(q, k, v, bias, plan, mask, dropout_mask) -> (out, lse)``: the blocked
    forward (``blocked_forward``'s results) differentiable by ``torch.autograd`` with respect to q, k,
    v and bias, through the FlashAttention-2 backward (rule 19; once differentiable). Saves q, k, v,
    bias, the masks, out in the compute dtype and lse; never the weights."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                plan: AttentionPlan, mask: torch.Tensor | None,
                dropout_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        bias_c = None if bias is None else bias.to(getattr(torch, plan.compute_dtype))  # rule 5: exact
        with ieee_float32_matmul(q.device):  # rule 10
            tiles = _Tiles(plan, q, k, v, mask, bias_c, dropout_mask)
            out, lse = _forward_arrays(tiles, tiles.compute)
        ctx.save_for_backward(tiles.q, tiles.k, tiles.v, bias_c, mask, dropout_mask, out, lse)
        ctx.plan = plan
        ctx.like = _like(q, k, v, bias)
        ctx.set_materialize_grads(False)
        return out.to(getattr(torch, plan.dtype)), lse  # rule 11: out rounded once

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: torch.Tensor | None, d_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        plan: AttentionPlan = ctx.plan
        q, k, v, bias, mask, dropout_mask, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if d_out is None and d_lse is None:
            return (None,) * 7
        with ieee_float32_matmul(q.device):  # rule 10
            tiles = _Tiles(plan, q, k, v, mask, bias, dropout_mask)
            needs = (needs[0], needs[1], needs[2], needs[3] and bias is not None)
            grads = _backward(tiles, out, lse, d_out, d_lse, needs)
        return (*_gradients_out(grads, ctx.like), None, None, None)


def blocked_attention(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as ``blocked_forward``; through ``BlockedAttention`` (differentiable by
    autograd) when gradients are enabled and q, k, v or bias requires grad, else without a graph."""
    tracked = [x for x in (q, k, v, bias) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tracked):
        out, lse = BlockedAttention.apply(q, k, v, bias, plan, mask, dropout_mask)
        return out, lse
    return blocked_forward(plan, q, k, v, mask, bias, dropout_mask)
