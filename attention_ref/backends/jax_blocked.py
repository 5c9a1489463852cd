"""The JAX backend's blocked algorithm (SPEC.md rule 19): the online-softmax forward and the
FlashAttention-2 backward, tile by tile, in memory bounded by one ``block_q x block_k`` tile per head.

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. The operands are in the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``;
mask, bias and dropout mask keep their own elements, laid out as ``(*B', Hkv', G', L', S')`` with
each dim either full or 1 (``_grouped_aux``, a reshape, never a broadcast), and only their
``Tq x Tk`` slices are read and broadcast against a tile.

Heads. On the CPU the programs loop over the heads (``heads_per_step``): one query head a step (a
head's unbatched tile matmuls use every core and its tiles stay in cache; measured faster than
batched heads at every size tried), or one kv head's G query heads stacked when their rows are few
(decoding); tiles are sliced from the whole arrays, k and v never repeated (rule 2). On accelerators
every head is in each tile. A tile of logits is ``(..., g, Tq, Tk)``.

Tiles. A tile has the static shape ``Tq x Tk`` (the plan's ``block_q`` and ``block_k``). Query block b
holds queries ``b * bq ... (b + 1) * bq - 1`` and key block c keys ``c * bk ... (c + 1) * bk - 1``,
where ``bq <= Tq`` and ``bk <= Tk`` are the plan's blocks, or traced values (``Geometry``: the padded
bucket programs of ``jax.py``, whose tile is the whole padded problem, so that one program serves
every block size). A tile starts at its block's first query (key), moved back so that it ends inside
the array (``min(start, L - Tq)``): nothing is padded; the tile's key columns outside its block are
excluded and its rows outside its block are neither written (forward) nor given a cotangent
(backward), so they add exact zeros. Key blocks that causal and window leave no key in are skipped
(``fori_loop`` bounds computed from the traced block index); a dim covered by one tile has no loop.

Dtypes: every step runs in the compute dtype (float32 or float64, inputs widened exactly, rule 10),
every matmul at ``Precision.HIGHEST``; out is rounded once to the input dtype, lse stays in the
compute dtype; dq, dk, dv are returned in the input dtype and dbias in bias's dtype. float64 runs
inside a scoped ``jax.enable_x64`` (``precision_scope``), the custom_vjp's rules included.

Gradients: ``blocked_attention`` is a ``jax.custom_vjp`` whose residuals are the inputs, out in the
compute dtype and lse (never the weights), so that ``jax.grad`` / ``jax.vjp`` of ``attention``, under
a user's transformation or not, run the blocked backward in bounded memory; lse's cotangent is taken
too. Forward-mode differentiation (``jax.jvp``) of a blocked call is not defined (``dense=True`` has
it).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..plan import AttentionPlan

_HIGHEST = jax.lax.Precision.HIGHEST


class Geometry(NamedTuple):
    """Traced block sizes and bounds of a padded (bucket) problem; int32 scalars.

    ``block_q <= plan.block_q`` and ``block_k <= plan.block_k`` are the logical blocks (the plan's
    blocks are the static tile); query i may attend key j only if ``low <= j - i <= high``; queries
    ``i >= q_valid`` and keys ``j >= kv_valid`` are padding (excluded, never visited when a whole
    block is padding)."""

    block_q: Any
    block_k: Any
    low: Any
    high: Any
    q_valid: Any
    kv_valid: Any
    #: Whether the softcap applies (a traced bool; the softcap is then a dummy 1 when it does not),
    #: so that one program serves calls with and without one; None: as the plan says.
    softcap_on: Any = None


def precision_scope(plan: AttentionPlan) -> contextlib.AbstractContextManager[Any]:
    """rule 10: float64 is computed inside a scoped ``jax.enable_x64``, the global flag untouched."""
    needs_x64 = plan.compute_dtype == "float64" or plan.dtype == "float64"
    return jax.enable_x64(True) if needs_x64 else contextlib.nullcontext()


def _static_geometry(plan: AttentionPlan) -> Geometry:
    """The plan's own blocks and key range as Python ints (None: an unbounded side)."""
    assert plan.block_q is not None and plan.block_k is not None
    low, high = plan.key_range
    return Geometry(plan.block_q, plan.block_k, low, high, plan.q_len, plan.kv_len)


def _grouped_aux(plan: AttentionPlan, x: jax.Array | None) -> jax.Array | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)`` as ``(*B', Hkv', G', L', S')``
    (each dim full or 1; a reshape of its own elements, never a broadcast); None stays None."""
    if x is None:
        return None
    shape = (1,) * (len(plan.logits_shape) - x.ndim) + tuple(x.shape)
    if plan.has_head_axis:
        batch, heads, rest = shape[:-3], shape[-3], shape[-2:]
        grouped = (1, 1) if heads == 1 else (plan.num_kv_heads, plan.group_size)  # rule 2: h // G
    else:
        batch, rest, grouped = (), shape, (1, 1)  # rule 1: a rank-2 input is one head
    return x.reshape(*batch, *grouped, *rest)


def _block_start(index: Any, block: Any, tile: int, length: int) -> tuple[Any, Any]:
    """``(first, start)``: the block's first position ``index * block`` and its tile's start, moved
    back so that the tile ``start ... start + tile - 1`` ends inside ``length`` (int32 scalars)."""
    first = index * jnp.asarray(block, jnp.int32)
    return first, jnp.clip(first, 0, length - tile)


def _loop(first: Any, stop: Any, body: Any, init: Any, single: bool) -> Any:
    """``lax.fori_loop`` over the int32 range ``first <= i < stop`` (no iteration when stop <= first);
    with ``single`` (the tile covers the whole dim: there is one block, block 0), block 0 is visited
    unconditionally, no loop: a block that causal, window or padding leave empty adds exact zeros
    (weights exactly 0), so visiting it changes nothing."""
    if single:
        return body(jnp.zeros((), jnp.int32), init)
    return lax.fori_loop(jnp.asarray(first, jnp.int32), jnp.asarray(stop, jnp.int32), body, init)


def _div(a: Any, b: Any) -> Any:
    """``a // b`` of non-negative ints (no sign handling to compile); Python ints stay Python ints."""
    if _static_int(a) and _static_int(b):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def _single(plan: AttentionPlan, geometry: Geometry) -> tuple[bool, bool]:
    """Whether the query tile and the key tile each cover their whole dim (static: one block)."""
    single_q = _static_int(geometry.block_q) and geometry.block_q >= plan.q_len
    single_k = _static_int(geometry.block_k) and geometry.block_k >= plan.kv_len
    return single_q, single_k


def _static_int(x: Any) -> bool:
    return isinstance(x, int)


def _key_blocks(geometry: Geometry, q_first: Any, q_stop: Any) -> tuple[Any, Any]:
    """``(first, stop)``: the key blocks causal and window leave any key in for queries
    ``q_first <= i < q_stop`` (rule 19: the others are skipped); traced, as ``plan.key_block_range``."""
    first_key = 0 if geometry.low is None else jnp.maximum(0, q_first + geometry.low)
    last_key = geometry.kv_valid - 1
    if geometry.high is not None:
        last_key = jnp.minimum(last_key, q_stop - 1 + geometry.high)
    first = _div(first_key, geometry.block_k)
    nonempty = (last_key >= first_key) & (q_stop > q_first)
    return first, jnp.where(nonempty, _div(last_key, geometry.block_k) + 1, first)


def _query_blocks(geometry: Geometry, k_first: Any, k_stop: Any) -> tuple[Any, Any]:
    """``(first, stop)``: the query blocks with any query that causal and window let attend a key
    ``k_first <= j < k_stop`` (query i may attend key j only if ``j - high <= i <= j - low``)."""
    first_query = 0 if geometry.high is None else jnp.maximum(0, k_first - geometry.high)
    last_query = geometry.q_valid - 1
    if geometry.low is not None:
        last_query = jnp.minimum(last_query, k_stop - 1 - geometry.low)
    first = _div(first_query, geometry.block_q)
    nonempty = (last_query >= first_query) & (k_stop > k_first)
    return first, jnp.where(nonempty, _div(last_query, geometry.block_q) + 1, first)


class _Operands(NamedTuple):
    """The whole problem in the grouped layout: q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``,
    v ``(*B, Hkv, S, Ev)`` in the compute dtype; mask, bias (compute dtype) and dropout mask as
    ``_grouped_aux``; the scalars in the compute dtype."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    mask: jax.Array | None
    bias: jax.Array | None
    keep: jax.Array | None
    scale: jax.Array
    softcap: jax.Array | None
    dropout_scale: jax.Array


def _prepare(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
             bias: jax.Array | None, keep: jax.Array | None, scale: jax.Array, softcap: jax.Array | None,
             dropout_scale: jax.Array) -> _Operands:
    compute = jnp.dtype(plan.compute_dtype)
    return _Operands(
        q.astype(compute).reshape(plan.grouped_shape(plan.head_dim)),  # rule 10: widened exactly; rule 2
        k.astype(compute).reshape(plan.kv_shape(plan.head_dim)),  # rule 1: a rank-2 input is one head
        v.astype(compute).reshape(plan.kv_shape(plan.value_dim)),
        _grouped_aux(plan, mask),
        None if bias is None else _grouped_aux(plan, bias.astype(compute)),  # rule 5: converted exactly
        _grouped_aux(plan, keep),
        jnp.asarray(scale).astype(compute),  # rule 10: scalars in the compute dtype
        None if softcap is None else jnp.asarray(softcap).astype(compute),
        jnp.asarray(dropout_scale).astype(compute),
    )


#: On the CPU, the G query heads of a kv head share a step of the head loop (their rows stacked in one
#: matmul, the kv head's tiles read once: decoding) when they stack to at most this many rows.
STACKED_ROWS = 512


class _View(NamedTuple):
    """The heads one step of the head loop computes: every head at once (``step`` None: tiles
    ``(*B, Hkv, G, Tq, Tk)``, on accelerators), or query heads ``gi * g ... gi * g + g - 1`` of one
    kv head, ``step`` the flat index over ``(*B, Hkv, G // g)`` (tiles ``(g, Tq, Tk)``). Tiles are
    sliced from the whole arrays: no step copies a head."""

    heads: tuple[int, ...]  # (*B, Hkv)
    group: int  # G
    per_step: int  # g (G when every head is computed at once)
    step: Any

    @staticmethod
    def of(plan: AttentionPlan, per_step: int | None, step: Any = None) -> _View:
        return _View((*plan.batch_shape, plan.num_kv_heads), plan.group_size,
                     plan.group_size if per_step is None else per_step, step)

    @property
    def num_steps(self) -> int:
        return math.prod(self.heads) * (self.group // self.per_step)

    def _starts(self, x: jax.Array, group: bool) -> tuple[list[Any], list[int]]:
        """Starts and sizes of the step's heads in the leading dims of x: ``(*B, Hkv)`` and, with
        ``group``, G (each x's own or 1: broadcast, start 0)."""
        lead = len(self.heads) + group
        if self.step is None:
            return [0] * lead, list(x.shape[:lead])
        kv_head = _div(self.step, self.group // self.per_step)
        starts: list[Any] = []
        stride = math.prod(self.heads)
        for size, own in zip(self.heads, x.shape, strict=False):
            stride //= size
            starts.append(lax.rem(_div(kv_head, stride), jnp.int32(size)) if own != 1 else 0)
        sizes = [1] * len(self.heads)
        if group:
            own = x.shape[len(self.heads)]
            starts.append(lax.rem(self.step, jnp.int32(self.group // self.per_step)) * self.per_step
                          if own != 1 else 0)
            sizes.append(self.per_step if own != 1 else 1)
        return starts, sizes

    def _window(self, x: jax.Array, group: bool, tail: tuple[tuple[Any, int] | None, ...]) -> tuple[list, list]:
        starts, sizes = self._starts(x, group)
        for own, spec in zip(x.shape[len(starts):], tail, strict=True):
            starts.append(0 if spec is None or own == 1 else spec[0])
            sizes.append(own if spec is None or own == 1 else spec[1])
        return [jnp.asarray(start, jnp.int32) for start in starts], sizes

    def shape_of(self, x: jax.Array, group: bool, *tail: tuple[Any, int] | None) -> tuple[int, ...]:
        """The shape of ``part(x, group, *tail)``."""
        sizes = self._window(x, group, tail)[1]
        return tuple(sizes if self.step is None else sizes[len(self.heads):])

    def part(self, x: jax.Array, group: bool, *tail: tuple[Any, int] | None) -> jax.Array:
        """The step's heads of x (leading dims ``(*B, Hkv)``, then G with ``group``, each full or 1)
        and, on each remaining dim, the ``(start, size)`` window of ``tail`` (None, or a dim of 1: all);
        the head dims are dropped but for the step's G axis."""
        starts, sizes = self._window(x, group, tail)
        part = lax.dynamic_slice(x, starts, sizes)
        return part if self.step is None else part.reshape(sizes[len(self.heads):])

    def add(self, x: jax.Array, part: jax.Array, group: bool, *tail: tuple[Any, int] | None) -> jax.Array:
        """x with ``part`` (as ``part`` reads it) added in place."""
        starts, sizes = self._window(x, group, tail)
        return lax.dynamic_update_slice(x, lax.dynamic_slice(x, starts, sizes) + part.reshape(sizes), starts)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a bᵀ``: a ``(..., g, Tq, C)``, b ``(..., T, C)`` (``...`` the head dims of both) to
    ``(..., g, Tq, T)``: q kᵀ and dO vᵀ; one kv head serves its query heads (rule 2)."""
    batch = tuple(range(b.ndim - 2))
    # rule 10: every matmul in the compute dtype at HIGHEST precision (true float32)
    return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)), precision=_HIGHEST)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a b``: a ``(..., g, Tq, T)``, b ``(..., T, C)`` to ``(..., g, Tq, C)``: P v and dS k."""
    batch = tuple(range(b.ndim - 2))
    return lax.dot_general(a, b, (((a.ndim - 1,), (len(batch),)), (batch, batch)), precision=_HIGHEST)


def _dot_heads(a_t: jax.Array, b: jax.Array) -> jax.Array:
    """``sum_g a_t[g] b[g]``: a_t ``(..., g, C, Tq)``, b ``(..., g, Tq, T)`` to ``(..., C, T)``: the
    transposed dv and dk of a key tile, summed over the query heads of its kv head (rule 2)."""
    n = b.ndim - 3
    batch = tuple(range(n))
    return lax.dot_general(a_t, b, (((n, a_t.ndim - 1), (n, n + 1)), (batch, batch)), precision=_HIGHEST)


class _Tile(NamedTuple):
    """One tile's logits and what the backward needs of them."""

    x: jax.Array  # (..., g, Tq, Tk): scaled, capped, biased; -inf on the keys mask, causal and window exclude
    capped: jax.Array | None  # tanh(raw / softcap), or None without a softcap
    multiplier: jax.Array | None  # keep / (1 - p) broadcastable to the tile, or None without dropout


def _tile_logits(plan: AttentionPlan, geometry: Geometry, view: _View, operands: _Operands, q_tile: jax.Array,
                 k_tile: jax.Array, q_start: Any, k_first: Any, k_start: Any) -> _Tile:
    """The logits of queries ``q_start ... q_start + Tq - 1`` and keys ``k_start ... k_start + Tk - 1``
    (rules 3-8), with the tile's columns outside key block ``k_first ... k_first + bk - 1`` (and
    padded keys) excluded. A -inf logit (from the bias) stays -inf: its weight is exactly 0 (rule 8)
    without a test of its own."""
    size_q, size_k = q_tile.shape[-2], k_tile.shape[-2]
    window = ((q_start, size_q), (k_start, size_k))
    raw = _dot_t(q_tile, k_tile)  # q kᵀ
    x = raw * operands.scale  # rule 3
    capped = None
    if operands.softcap is not None:
        capped = jnp.tanh(x / operands.softcap)  # rule 4: before the bias
        if geometry.softcap_on is None:
            x = operands.softcap * capped
        else:  # exactly x, and a derivative factor of exactly 1, when the call has no softcap
            x = jnp.where(geometry.softcap_on, operands.softcap * capped, x)
            capped = jnp.where(geometry.softcap_on, capped, 0)
    if operands.bias is not None:
        x = x + view.part(operands.bias, True, *window)  # rule 5
    cols = k_start + jnp.arange(size_k)
    rows = q_start + jnp.arange(size_q)
    allowed = None
    # Every tile covers its key block exactly when the blocks are static and divide S: no test then.
    exact = (all(map(_static_int, (geometry.block_k, geometry.kv_valid))) and geometry.block_k == size_k
             and geometry.kv_valid == plan.kv_len and plan.kv_len % size_k == 0)
    if not exact:  # the tile's columns before its block belong to the previous one; padded keys are none
        allowed = ((cols >= k_first) & (cols < jnp.minimum(k_first + geometry.block_k, geometry.kv_valid)))[None, :]
    for bound, keep_key in ((geometry.low, jnp.greater_equal), (geometry.high, jnp.less_equal)):
        if bound is not None:  # rule 7: causal and window, as plan.key_range
            in_range = keep_key(cols[None, :] - rows[:, None], bound)
            allowed = in_range if allowed is None else allowed & in_range
    if operands.mask is not None:
        mask = view.part(operands.mask, True, *window)
        allowed = mask if allowed is None else allowed & mask  # rule 6
    if allowed is not None:
        x = jnp.where(allowed, x, -jnp.inf)  # rule 8: excluded keys
    multiplier = None
    if operands.keep is not None:  # rule 13: keep / (1 - p)
        keep = view.part(operands.keep, True, *window)
        multiplier = jnp.where(keep, operands.dropout_scale, jnp.zeros((), x.dtype))
    return _Tile(x, capped, multiplier)


def _rows_of_block(geometry: Geometry, q_first: Any, q_start: Any, size_q: int) -> jax.Array:
    """Bool ``(Tq,)``: the tile's rows that belong to its query block (the others are the previous
    block's, when the tile was moved back, or the next one's, when the logical block is smaller)."""
    rows = q_start + jnp.arange(size_q)
    return (rows >= q_first) & (rows < q_first + geometry.block_q)


def _empty(plan: AttentionPlan) -> bool:
    return plan.q_len == 0 or plan.kv_len == 0


def _step_rows(plan: AttentionPlan, view: _View) -> tuple[int, ...]:
    """The shape of the step's rows: ``(g, L)``, or ``(*B, Hkv, G, L)`` for every head at once."""
    return (view.per_step, plan.q_len) if view.step is not None else (*view.heads, view.group, plan.q_len)


def forward_core(plan: AttentionPlan, operands: _Operands, geometry: Geometry,
                 view: _View) -> tuple[jax.Array, jax.Array]:
    """The online softmax (rule 19) of one step of the head loop: ``(out, lse)`` of its query heads,
    ``(..., g, L, Ev)`` and ``(..., g, L)``, in the compute dtype (out not rounded)."""
    compute = jnp.dtype(plan.compute_dtype)
    assert plan.block_q is not None and plan.block_k is not None
    size_q, size_k = plan.block_q, plan.block_k
    single_q, single_k = _single(plan, geometry)
    rows_shape = _step_rows(plan, view)
    stats_shape = rows_shape[:-1] + (size_q,)

    def query_block(b: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out, lse = carry
        q_first, q_start = _block_start(b, geometry.block_q, size_q, plan.q_len)
        q_tile = view.part(operands.q, True, (q_start, size_q), None)
        first, stop = _key_blocks(geometry, q_first, jnp.minimum(q_first + geometry.block_q, geometry.q_valid))

        def key_block(c: Any, state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            m, total, acc = state
            k_first, k_start = _block_start(c, geometry.block_k, size_k, plan.kv_len)
            k_tile, v_tile = (view.part(x, False, (k_start, size_k), None) for x in (operands.k, operands.v))
            tile = _tile_logits(plan, geometry, view, operands, q_tile, k_tile, q_start, k_first, k_start)
            m_new = jnp.maximum(m, jnp.max(tile.x, axis=-1))  # rule 19: m_new = max(m, max_j x_j)
            s = jnp.where(m_new > -jnp.inf, m_new, 0)  # rule 19: no NaN while no key was attended
            alpha = jnp.exp(m - s)  # rule 19: exactly 1 when m is unchanged, 0 while no key was attended
            p = jnp.exp(tile.x - s[..., None])  # rule 19: exactly 0 on excluded keys
            total = alpha * total + jnp.sum(p, axis=-1)  # rule 19: l = alpha l + sum_j p_j
            dropped = p if tile.multiplier is None else p * tile.multiplier  # rule 13: p z
            acc = alpha[..., None] * acc + _dot(dropped, v_tile)  # rule 19: alpha acc + sum_j p_j z_j v_j
            return m_new, total, acc

        init = (jnp.full(stats_shape, -jnp.inf, compute), jnp.zeros(stats_shape, compute),
                jnp.zeros((*stats_shape, plan.value_dim), compute))
        m, total, acc = _loop(first, stop, key_block, init, single_k)
        attended = total > 0  # rule 8: out 0 and lse -inf in a fully excluded row
        safe_l = jnp.where(attended, total, 1)
        tile_out = jnp.where(attended[..., None], acc / safe_l[..., None], 0)  # rule 19: out = acc / l
        tile_lse = jnp.where(attended, m + jnp.log(safe_l), -jnp.inf)  # rule 19: lse = m + log l
        write = _rows_of_block(geometry, q_first, q_start, size_q)
        old_out = lax.dynamic_slice_in_dim(out, q_start, size_q, axis=out.ndim - 2)
        old_lse = lax.dynamic_slice_in_dim(lse, q_start, size_q, axis=lse.ndim - 1)
        out = lax.dynamic_update_slice_in_dim(out, jnp.where(write[:, None], tile_out, old_out), q_start,
                                              axis=out.ndim - 2)
        lse = lax.dynamic_update_slice_in_dim(lse, jnp.where(write, tile_lse, old_lse), q_start, axis=lse.ndim - 1)
        return out, lse

    out = jnp.zeros((*rows_shape, plan.value_dim), compute)
    lse = jnp.full(rows_shape, -jnp.inf, compute)
    num_blocks = _div(geometry.q_valid + geometry.block_q - 1, geometry.block_q)
    return _loop(0, num_blocks, query_block, (out, lse), single_q)


class _Cotangents(NamedTuple):
    """What the backward reads besides the operands, whole and grouped: d_out ``(*B, Hkv, G, L, Ev)``
    and its transpose ``(*B, Hkv, G, Ev, L)``, q's transpose ``(*B, Hkv, G, E, L)``, lse and
    ``D - d_lse`` ``(*B, Hkv, G, L)``; compute dtype."""

    d_out: jax.Array
    d_out_t: jax.Array
    q_t: jax.Array
    lse: jax.Array
    d_row: jax.Array


def backward_core(plan: AttentionPlan, operands: _Operands, geometry: Geometry, view: _View,
                  cotangents: _Cotangents, dbias: jax.Array | None) -> tuple[Any, ...]:
    """The FlashAttention-2 backward (rule 19) of one step of the head loop: ``(dq, dk_t, dv_t,
    dbias)`` in the compute dtype, dq ``(..., g, L, E)`` of the step's query heads, dk and dv of its
    kv head transposed, ``(..., E, S)`` and ``(..., Ev, S)``, summed over the step's query heads;
    ``dbias`` (the grouped bias's layout, or None) the whole accumulator the tiles are added to."""
    compute = jnp.dtype(plan.compute_dtype)
    assert plan.block_q is not None and plan.block_k is not None
    size_q, size_k = plan.block_q, plan.block_k
    single_q, single_k = _single(plan, geometry)
    rows_shape = _step_rows(plan, view)
    kv_lead = rows_shape[:-2]
    divides = _static_int(geometry.block_q) and plan.q_len % size_q == 0 and geometry.block_q == size_q

    def key_block(c: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        dq, dk_t, dv_t, dbias = carry
        k_first, k_start = _block_start(c, geometry.block_k, size_k, plan.kv_len)
        k_tile, v_tile = (view.part(x, False, (k_start, size_k), None) for x in (operands.k, operands.v))
        first, stop = _query_blocks(geometry, k_first, jnp.minimum(k_first + geometry.block_k, geometry.kv_valid))

        def query_block(b: Any, state: tuple[Any, ...]) -> tuple[Any, ...]:
            dq, dkt_tile, dvt_tile, dbias = state
            q_first, q_start = _block_start(b, geometry.block_q, size_q, plan.q_len)
            rows = (q_start, size_q)
            q_tile = view.part(operands.q, True, rows, None)
            qt_tile = view.part(cotangents.q_t, True, None, rows)
            do_tile = view.part(cotangents.d_out, True, rows, None)
            dot_tile = view.part(cotangents.d_out_t, True, None, rows)
            lse_tile = view.part(cotangents.lse, True, rows)
            d_tile = view.part(cotangents.d_row, True, rows)
            if not divides:  # rows of another block get zero cotangents here: they add exact zeros
                own = _rows_of_block(geometry, q_first, q_start, size_q)
                do_tile = jnp.where(own[:, None], do_tile, 0)
                dot_tile = jnp.where(own, dot_tile, 0)
                d_tile = jnp.where(own, d_tile, 0)
            tile = _tile_logits(plan, geometry, view, operands, q_tile, k_tile, q_start, k_first, k_start)
            # rule 19: P = exp(x - lse), exactly 0 on excluded keys (x = -inf) and in fully excluded rows
            # (lse = -inf, every x = -inf: subtracting 0 there keeps exp(-inf) = 0, never NaN)
            p = jnp.exp(tile.x - jnp.where(lse_tile == -jnp.inf, 0, lse_tile)[..., None])
            d_weights = _dot_t(do_tile, v_tile)  # dO vᵀ
            dropped = p
            if tile.multiplier is not None:
                d_weights = d_weights * tile.multiplier  # rule 14: dW = Z (dO vᵀ)
                dropped = p * tile.multiplier
            d_logits = p * (d_weights - d_tile[..., None])  # rule 14: dS = P (dW - D)
            # rule 14: dv = (P Z)ᵀ dO and dk = scale dRᵀ q, summed over the query heads of the kv head
            dvt_tile = dvt_tile + _dot_heads(dot_tile, dropped)
            if dbias is not None:  # rule 14: dbias = dS, summed into bias's shape tile by tile
                window = ((q_start, size_q), (k_start, size_k))
                shape = view.shape_of(dbias, True, *window)
                dbias = view.add(dbias, _reduce_to(d_logits, shape), True, *window)
            if tile.capped is not None:
                d_logits = d_logits * (1 - tile.capped * tile.capped)  # rule 14: through the softcap
            d_logits = d_logits * operands.scale
            dq = _add_tile(dq, _dot(d_logits, k_tile), q_start, None)  # rule 14: dq = scale dR k
            dkt_tile = dkt_tile + _dot_heads(qt_tile, d_logits)
            return dq, dkt_tile, dvt_tile, dbias

        init = (dq, jnp.zeros((*kv_lead, plan.head_dim, size_k), compute),
                jnp.zeros((*kv_lead, plan.value_dim, size_k), compute), dbias)
        dq, dkt_tile, dvt_tile, dbias = _loop(first, stop, query_block, init, single_q)
        # columns before the block belong to the previous one; they hold exact zeros here
        dk_t = _add_tile(dk_t, dkt_tile, None, k_start)
        dv_t = _add_tile(dv_t, dvt_tile, None, k_start)
        return dq, dk_t, dv_t, dbias

    init = (jnp.zeros((*rows_shape, plan.head_dim), compute),
            jnp.zeros((*kv_lead, plan.head_dim, plan.kv_len), compute),
            jnp.zeros((*kv_lead, plan.value_dim, plan.kv_len), compute), dbias)
    num_blocks = _div(geometry.kv_valid + geometry.block_k - 1, geometry.block_k)
    return _loop(0, num_blocks, key_block, init, single_k)


def _reduce_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x summed over the dims where ``shape`` has 1 (and x does not), keeping them: a tile of dbias."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _add_tile(x: jax.Array, tile: jax.Array, row_start: Any, col_start: Any) -> jax.Array:
    """x with ``tile`` added at ``row_start`` on axis -2 and ``col_start`` on axis -1 (each where not
    None and x's dim is larger than 1; else at 0)."""
    starts = [jnp.zeros((), jnp.int32)] * x.ndim
    if row_start is not None and x.shape[-2] != 1:
        starts[-2] = jnp.asarray(row_start, jnp.int32)
    if col_start is not None and x.shape[-1] != 1:
        starts[-1] = jnp.asarray(col_start, jnp.int32)
    old = lax.dynamic_slice(x, starts, tile.shape)
    return lax.dynamic_update_slice(x, old + tile, starts)


# ---- the head loop and the programs --------------------------------------------------------------


def heads_per_step(plan: AttentionPlan, arrays: tuple[Any, ...]) -> int | None:
    """The query heads one step of the head loop computes (its programs' static ``per_step``): None,
    every head at once, on accelerators; on the CPU, one kv head's G query heads when they stack to at
    most ``STACKED_ROWS`` tile rows (decoding: k and v read once per kv head), else one query head
    (a head's unbatched tile matmuls use every core and its tiles stay in cache: measured faster than
    batched heads at every size tried). Arrays on a device decide; tracers (a user's transformation)
    go by the default backend."""
    assert plan.block_q is not None
    cpu = jax.default_backend() == "cpu"
    for x in arrays:
        if x is not None and not isinstance(x, jax.core.Tracer):
            cpu = all(d.platform == "cpu" for d in x.devices())
            break
    if not cpu:
        return None
    return plan.group_size if plan.group_size * plan.block_q <= STACKED_ROWS else 1


def _forward(plan: AttentionPlan, operands: _Operands, geometry: Geometry,
             per_step: int | None) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` grouped, ``(*B, Hkv, G, L, Ev)`` and ``(*B, Hkv, G, L)``, in the compute dtype."""
    compute = jnp.dtype(plan.compute_dtype)
    shape = plan.grouped_shape(plan.value_dim)
    if _empty(plan):
        return jnp.zeros(shape, compute), jnp.full(shape[:-1], -jnp.inf, compute)  # rule 8: L = 0 or S = 0
    view = _View.of(plan, per_step)
    if per_step is None:
        return forward_core(plan, operands, geometry, view)
    out, lse = lax.map(lambda step: forward_core(plan, operands, geometry, view._replace(step=step)),
                       jnp.arange(view.num_steps, dtype=jnp.int32))
    return out.reshape(shape), lse.reshape(shape[:-1])


def _backward(plan: AttentionPlan, operands: _Operands, geometry: Geometry, per_step: int | None, d_out: jax.Array,
              out: jax.Array, lse: jax.Array, d_lse: jax.Array | None) -> tuple[Any, ...]:
    """``(dq, dk, dv, dbias)`` in the compute dtype and the grouped layouts of q, k, v and the bias
    (dbias None without a bias), from the grouped d_out, out, lse and lse's cotangent (or None)."""
    compute = jnp.dtype(plan.compute_dtype)
    dbias = None if operands.bias is None else jnp.zeros(operands.bias.shape, compute)
    if _empty(plan):
        return (jnp.zeros(operands.q.shape, compute), jnp.zeros(operands.k.shape, compute),
                jnp.zeros(operands.v.shape, compute), dbias)
    d_out = d_out.astype(compute)
    # rule 19: D_i = sum_c dO_ic O_ic replaces rowsum(P dW); lse's cotangent enters as -d_lse
    d_row = jnp.sum(d_out * out, axis=-1)
    if d_lse is not None:
        d_row = d_row - d_lse.astype(compute)
    cotangents = _Cotangents(d_out, jnp.swapaxes(d_out, -1, -2), jnp.swapaxes(operands.q, -1, -2), lse, d_row)
    view = _View.of(plan, per_step)
    if per_step is None:
        dq, dk_t, dv_t, dbias = backward_core(plan, operands, geometry, view, cotangents, dbias)
        return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2), dbias

    def step(dbias: jax.Array | None, index: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        dq, dk_t, dv_t, dbias = backward_core(plan, operands, geometry, view._replace(step=index), cotangents, dbias)
        return dbias, (dq, dk_t, dv_t)

    dbias, (dq, dk_t, dv_t) = lax.scan(step, dbias, jnp.arange(view.num_steps, dtype=jnp.int32))
    # rule 2: dk and dv summed over the steps (query heads) of each kv head
    dk, dv = (jnp.swapaxes(x.reshape(*view.heads, -1, *x.shape[1:]).sum(axis=len(view.heads)), -1, -2)
              for x in (dk_t, dv_t))
    return dq.reshape(operands.q.shape), dk, dv, dbias


def _results(plan: AttentionPlan, out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Grouped out and lse in the plan's shapes: out rounded once to ``plan.dtype`` (rule 11)."""
    return out.astype(plan.dtype).reshape(plan.out_shape), lse.reshape(plan.lse_shape)


def _gradients(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
               grads: tuple[Any, ...]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Grouped gradients in the shapes and dtypes of q, k, v and bias (rule 14)."""
    dq, dk, dv, dbias = grads
    return (dq.reshape(q.shape).astype(q.dtype), dk.reshape(k.shape).astype(k.dtype),
            dv.reshape(v.shape).astype(v.dtype),
            None if bias is None or dbias is None else dbias.reshape(bias.shape).astype(bias.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def blocked_attention(plan: AttentionPlan, per_step: int | None, q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                      scale: jax.Array, softcap: jax.Array | None,
                      dropout_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a blocked plan (static, its traced values zeroed; scale, softcap and dropout
    scale traced): out ``plan.out_shape`` in ``plan.dtype``, lse ``plan.lse_shape`` in the compute
    dtype. ``per_step``: ``heads_per_step``. Differentiable in reverse mode (``jax.grad``,
    ``jax.vjp``), by the blocked backward."""
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    return _results(plan, *_forward(plan, operands, _static_geometry(plan), per_step))


def _blocked_attention_fwd(plan: AttentionPlan, per_step: int | None, q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                           scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array) -> tuple[Any, Any]:
    with precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
        operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
        out, lse = _forward(plan, operands, _static_geometry(plan), per_step)
        # rule 19: the residuals are the inputs, out in the compute dtype and lse; never the weights
        residuals = (q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, out, lse)
        return _results(plan, out, lse), residuals


def _blocked_attention_bwd(plan: AttentionPlan, per_step: int | None, residuals: tuple[Any, ...],
                           cotangents: tuple[jax.Array, jax.Array]) -> tuple[Any, ...]:
    # rule 10: the pullback may be traced after the forward's scope has closed (jax.vjp's pullback
    # called later): float64 again inside a scoped jax.enable_x64
    with precision_scope(plan):
        q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, out, lse = residuals
        d_out, d_lse = cotangents
        operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
        grads = _backward(plan, operands, _static_geometry(plan), per_step,
                          d_out.reshape(plan.grouped_shape(plan.value_dim)), out, lse, d_lse.reshape(lse.shape))
        dq, dk, dv, dbias = _gradients(plan, q, k, v, bias, grads)
        return dq, dk, dv, None, dbias, None, None, None, None  # masks and scalars get no cotangent


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def blocked_vjp(plan: AttentionPlan, per_step: int | None, q: jax.Array, k: jax.Array, v: jax.Array,
                mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None, d_out: jax.Array,
                scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
                geometry: Geometry | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, dbias)`` of ``sum(out * d_out)`` for a blocked plan: the blocked forward's out
    (compute dtype) and lse, then the FlashAttention-2 backward; in the shapes and dtypes of q, k, v
    and bias (dbias None without a bias). ``geometry`` (traced) replaces the plan's blocks and key
    range (the padded bucket programs)."""
    geometry = _static_geometry(plan) if geometry is None else geometry
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    out, lse = _forward(plan, operands, geometry, per_step)  # rule 19: out and lse recomputed first
    grads = _backward(plan, operands, geometry, per_step, d_out.reshape(plan.grouped_shape(plan.value_dim)), out,
                      lse, None)
    return _gradients(plan, q, k, v, bias, grads)


def bucket_forward(plan: AttentionPlan, per_step: int | None, q: jax.Array, k: jax.Array, v: jax.Array,
                   mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                   scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
                   geometry: Geometry) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a padded plan with traced ``geometry``, both in the compute dtype (out not
    rounded: the caller cuts and rounds it)."""
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    out, lse = _forward(plan, operands, geometry, per_step)
    return out.reshape(plan.out_shape), lse.reshape(plan.lse_shape)


#: One program per static plan (its blocks included) and head loop.
blocked_attention_jit = jax.jit(blocked_attention, static_argnums=(0, 1))
blocked_vjp_jit = jax.jit(blocked_vjp, static_argnums=(0, 1))
#: One program per padded (bucket) plan, its static tile included; the logical blocks are traced.
bucket_forward_jit = jax.jit(bucket_forward, static_argnums=(0, 1))
bucket_vjp_jit = jax.jit(blocked_vjp, static_argnums=(0, 1))


def blocked_forward(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    bias: jax.Array | None, dropout_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a blocked plan (rule 19): out ``plan.out_shape`` in ``plan.dtype`` (rounded
    once), lse ``plan.lse_shape`` in the compute dtype."""
    from .jax import JaxBackend

    with precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
        return blocked_attention_jit(JaxBackend._static_plan(plan), heads_per_step(plan, (q, k, v)), q, k, v, mask,
                                     bias, dropout_mask, *JaxBackend._traced_scalars(plan))


def blocked_backward(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     bias: jax.Array | None, dropout_mask: jax.Array | None,
                     d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, dbias)`` of a blocked plan (rule 19), as ``blocked_vjp``."""
    from .jax import JaxBackend

    with precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
        return blocked_vjp_jit(JaxBackend._static_plan(plan), heads_per_step(plan, (q, k, v)), q, k, v, mask, bias,
                               dropout_mask, d_out, *JaxBackend._traced_scalars(plan))
