"""The JAX backend's blocked algorithm (SPEC.md rule 19): the online-softmax forward and the
FlashAttention-2 backward, tile by tile, in memory bounded by one ``block_q x block_k`` tile per head.

Shape letters: B... batch dims, Hq query heads, Hkv kv heads, G = Hq // Hkv query heads per kv head,
L queries, S keys, E q/k head dim, Ev value head dim. The operands are in the grouped layout of
``AttentionPlan`` (rule 2): q ``(*B, Hkv, G, L, E)``, k ``(*B, Hkv, S, E)``, v ``(*B, Hkv, S, Ev)``;
mask, bias and dropout mask keep their own elements, laid out as ``(*B', Hkv', G', L', S')`` with
each dim either full or 1 (``_grouped_aux``, a reshape, never a broadcast), and only their
``Tq x Tk`` slices are read and broadcast against a tile.

Heads. On the CPU the programs loop over the query heads one at a time (``heads_one_at_a_time``:
a head's unbatched tile matmuls use every core and its tiles stay in cache; measured faster than
batched heads at every size tried), each with its kv head's k and v (never repeated); on accelerators
every head is in each tile. A tile of logits is ``(..., G, Tq, Tk)``.

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


def _tile_of(x: jax.Array | None, q_start: Any, size_q: int, k_start: Any, size_k: int) -> jax.Array | None:
    """The ``size_q x size_k`` slice of a grouped mask, bias or dropout mask at ``(q_start, k_start)``;
    a dim of size 1 stays size 1 (broadcast later, against the tile only)."""
    if x is None:
        return None
    if x.shape[-2] != 1:
        x = lax.dynamic_slice_in_dim(x, q_start, size_q, axis=x.ndim - 2)
    if x.shape[-1] != 1:
        x = lax.dynamic_slice_in_dim(x, k_start, size_k, axis=x.ndim - 1)
    return x


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


class _Inputs(NamedTuple):
    """The operands of one step of the head loop (one kv head and its G query heads, or all heads at
    once): ``(..., G, L, E)`` q, ``(..., S, E)`` k, ``(..., S, Ev)`` v and their transposes ``q_t``
    ``(..., E, G, L)``, ``k_t`` ``(..., E, S)``, ``v_t`` ``(..., Ev, S)`` (every tile matmul then
    contracts one operand on its last axis and the other on its first: no transposed copy of a tile);
    mask, bias and dropout mask ``(..., G', L', S')``; the scalars."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_t: jax.Array
    k_t: jax.Array
    v_t: jax.Array
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


def _heads(plan: AttentionPlan) -> tuple[int, ...]:
    """``(*B, Hkv, G)``: the query heads the head loop runs over, in the grouped layout."""
    return (*plan.batch_shape, plan.num_kv_heads, plan.group_size)


def _head_starts(x: jax.Array, heads: tuple[int, ...], h: Any) -> list[Any]:
    """The start of head h (a flat index over ``heads``) in x, whose leading ``len(heads)`` dims are
    each ``heads``' dim or 1 (broadcast: start 0)."""
    starts: list[Any] = []
    stride = math.prod(heads)
    for size, own in zip(heads, x.shape, strict=False):
        stride //= size
        starts.append(lax.rem(_div(h, stride), jnp.int32(size)) if own != 1 else jnp.zeros((), jnp.int32))
    return starts + [jnp.zeros((), jnp.int32)] * (x.ndim - len(heads))


def _head_of(x: jax.Array | None, heads: tuple[int, ...], h: Any, kept: int = 1) -> jax.Array | None:
    """Head h of x (leading dims ``heads``, each full or 1), its last ``kept`` head dims kept (size 1)."""
    if x is None:
        return None
    sizes = (1,) * len(heads) + x.shape[len(heads):]
    return lax.dynamic_slice(x, _head_starts(x, heads, h), sizes).reshape(sizes[len(heads) - kept:])


def _with_head(x: jax.Array, part: jax.Array, heads: tuple[int, ...], h: Any) -> jax.Array:
    """x with head h replaced by ``part`` (as ``_head_of`` reads it)."""
    return lax.dynamic_update_slice(x, part.reshape((1,) * len(heads) + x.shape[len(heads):]),
                                    _head_starts(x, heads, h))


def _inputs(operands: _Operands, heads: tuple[int, ...] | None, h: Any = None) -> _Inputs:
    """The step inputs of query head h (a flat index over ``heads = (*B, Hkv, G)``, its G axis of size
    1 kept, with its kv head's k and v: rule 2, never repeated), or of all heads when ``heads`` is None."""
    if heads is None:
        q, k, v, mask, bias, keep = operands[:6]
    else:
        q, mask, bias, keep = (_head_of(x, heads, h) for x in (operands.q, *operands[3:6]))
        group = heads[-1]
        k, v = (_head_of(x, heads[:-1], _div(h, group), 0) for x in (operands.k, operands.v))  # rule 2: h // G
    assert q is not None and k is not None and v is not None
    return _Inputs(q, k, v, _transposed(q), jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2), mask, bias, keep,
                   *operands[6:])


def _transposed(x: jax.Array) -> jax.Array:
    """A ``(..., G, L, C)`` array as ``(..., C, G, L)``."""
    return jnp.moveaxis(x, -1, -3)


def _matmul(a: jax.Array, b: jax.Array, contracted: int) -> jax.Array:
    """``a @ b`` over the leading (head) dims of both, contracting the last ``contracted`` axes of a
    with the first ``contracted`` non-head axes of b (b has two axes besides its head dims when
    ``contracted = 1``, three when 2); in a's dtype at HIGHEST precision."""
    batch = tuple(range(b.ndim - 1 - contracted))
    lhs = tuple(range(a.ndim - contracted, a.ndim))
    rhs = tuple(range(len(batch), len(batch) + contracted))
    # rule 10: the matmul in the compute dtype at HIGHEST precision (true float32)
    return lax.dot_general(a, b, ((lhs, rhs), (batch, batch)), precision=_HIGHEST)


class _Tile(NamedTuple):
    """One tile's logits and what the backward needs of them."""

    x: jax.Array  # (..., G, Tq, Tk): scaled, capped, biased; -inf on the keys mask, causal and window exclude
    capped: jax.Array | None  # tanh(raw / softcap), or None without a softcap
    multiplier: jax.Array | None  # keep / (1 - p) broadcastable to the tile, or None without dropout


def _tile_logits(plan: AttentionPlan, geometry: Geometry, inputs: _Inputs, q_tile: jax.Array, kt_tile: jax.Array,
                 q_start: Any, k_first: Any, k_start: Any) -> _Tile:
    """The logits of queries ``q_start ... q_start + Tq - 1`` and keys ``k_start ... k_start + Tk - 1``
    (rules 3-8), with the tile's columns outside key block ``k_first ... k_first + bk - 1`` (and
    padded keys) excluded. A -inf logit (from the bias) stays -inf: its weight is exactly 0 (rule 8)
    without a test of its own."""
    size_q, size_k = q_tile.shape[-2], kt_tile.shape[-1]
    raw = _matmul(q_tile, kt_tile, 1)  # q kᵀ (rule 2: one kv head serves its G query heads)
    x = raw * inputs.scale  # rule 3
    capped = None
    if inputs.softcap is not None:
        capped = jnp.tanh(x / inputs.softcap)  # rule 4: before the bias
        if geometry.softcap_on is None:
            x = inputs.softcap * capped
        else:  # exactly x, and a derivative factor of exactly 1, when the call has no softcap
            x = jnp.where(geometry.softcap_on, inputs.softcap * capped, x)
            capped = jnp.where(geometry.softcap_on, capped, 0)
    bias = _tile_of(inputs.bias, q_start, size_q, k_start, size_k)
    if bias is not None:
        x = x + bias  # rule 5
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
    mask = _tile_of(inputs.mask, q_start, size_q, k_start, size_k)
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask  # rule 6
    if allowed is not None:
        x = jnp.where(allowed, x, -jnp.inf)  # rule 8: excluded keys
    keep = _tile_of(inputs.keep, q_start, size_q, k_start, size_k)
    multiplier = None
    if keep is not None:
        multiplier = jnp.where(keep, inputs.dropout_scale, jnp.zeros((), x.dtype))  # rule 13: keep / (1 - p)
    return _Tile(x, capped, multiplier)


def _rows_of_block(geometry: Geometry, q_first: Any, q_start: Any, size_q: int) -> jax.Array:
    """Bool ``(Tq,)``: the tile's rows that belong to its query block (the others are the previous
    block's, when the tile was moved back, or the next one's, when the logical block is smaller)."""
    rows = q_start + jnp.arange(size_q)
    return (rows >= q_first) & (rows < q_first + geometry.block_q)


def _empty(plan: AttentionPlan) -> bool:
    return plan.q_len == 0 or plan.kv_len == 0


def forward_core(plan: AttentionPlan, inputs: _Inputs, geometry: Geometry) -> tuple[jax.Array, jax.Array]:
    """The online softmax (rule 19) of one step's inputs: ``(out, lse)``, ``(..., G, L, Ev)`` and
    ``(..., G, L)``, both in the compute dtype (out not rounded)."""
    compute = jnp.dtype(plan.compute_dtype)
    assert plan.block_q is not None and plan.block_k is not None
    size_q, size_k = plan.block_q, plan.block_k
    single_q, single_k = _single(plan, geometry)
    rows_shape = inputs.q.shape[:-1]
    stats_shape = rows_shape[:-1] + (size_q,)

    def query_block(b: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out, lse = carry
        q_first, q_start = _block_start(b, geometry.block_q, size_q, plan.q_len)
        q_tile = lax.dynamic_slice_in_dim(inputs.q, q_start, size_q, axis=inputs.q.ndim - 2)
        first, stop = _key_blocks(geometry, q_first, jnp.minimum(q_first + geometry.block_q, geometry.q_valid))

        def key_block(c: Any, state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            m, total, acc = state
            k_first, k_start = _block_start(c, geometry.block_k, size_k, plan.kv_len)
            kt_tile = lax.dynamic_slice_in_dim(inputs.k_t, k_start, size_k, axis=inputs.k_t.ndim - 1)
            v_tile = lax.dynamic_slice_in_dim(inputs.v, k_start, size_k, axis=inputs.v.ndim - 2)
            tile = _tile_logits(plan, geometry, inputs, q_tile, kt_tile, q_start, k_first, k_start)
            m_new = jnp.maximum(m, jnp.max(tile.x, axis=-1))  # rule 19: m_new = max(m, max_j x_j)
            s = jnp.where(m_new > -jnp.inf, m_new, 0)  # rule 19: no NaN while no key was attended
            alpha = jnp.exp(m - s)  # rule 19: exactly 1 when m is unchanged, 0 while no key was attended
            p = jnp.exp(tile.x - s[..., None])  # rule 19: exactly 0 on excluded keys
            total = alpha * total + jnp.sum(p, axis=-1)  # rule 19: l = alpha l + sum_j p_j
            dropped = p if tile.multiplier is None else p * tile.multiplier  # rule 13: p z
            acc = alpha[..., None] * acc + _matmul(dropped, v_tile, 1)  # rule 19: alpha acc + sum_j p_j z_j v_j
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


def backward_core(plan: AttentionPlan, inputs: _Inputs, geometry: Geometry, d_out: jax.Array, out: jax.Array,
                  lse: jax.Array, d_lse: jax.Array | None, dbias: jax.Array | None) -> tuple[Any, ...]:
    """The FlashAttention-2 backward (rule 19) of one step's inputs: ``(dq, dk, dv, dbias)`` in the
    compute dtype, from d_out ``(..., G, L, Ev)``, the forward's out (compute dtype, not rounded), lse
    ``(..., G, L)`` and lse's cotangent (or None); ``dbias`` (the bias's layout, or None) is the
    accumulator the tiles' dbias are added to."""
    compute = jnp.dtype(plan.compute_dtype)
    assert plan.block_q is not None and plan.block_k is not None
    size_q, size_k = plan.block_q, plan.block_k
    single_q, single_k = _single(plan, geometry)
    d_out = d_out.astype(compute)
    d_out_t = _transposed(d_out)
    # rule 19: D_i = sum_c dO_ic O_ic replaces rowsum(P dW); lse's cotangent enters as -d_lse
    d_row = jnp.sum(d_out * out, axis=-1)
    if d_lse is not None:
        d_row = d_row - d_lse.astype(compute)

    def key_block(c: Any, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        dq, dk_t, dv_t, dbias = carry
        k_first, k_start = _block_start(c, geometry.block_k, size_k, plan.kv_len)
        k_tile = lax.dynamic_slice_in_dim(inputs.k, k_start, size_k, axis=inputs.k.ndim - 2)
        kt_tile = lax.dynamic_slice_in_dim(inputs.k_t, k_start, size_k, axis=inputs.k_t.ndim - 1)
        vt_tile = lax.dynamic_slice_in_dim(inputs.v_t, k_start, size_k, axis=inputs.v_t.ndim - 1)
        first, stop = _query_blocks(geometry, k_first, jnp.minimum(k_first + geometry.block_k, geometry.kv_valid))

        def query_block(b: Any, state: tuple[Any, ...]) -> tuple[Any, ...]:
            dq, dkt_tile, dvt_tile, dbias = state
            q_first, q_start = _block_start(b, geometry.block_q, size_q, plan.q_len)
            q_tile = lax.dynamic_slice_in_dim(inputs.q, q_start, size_q, axis=inputs.q.ndim - 2)
            qt_tile = lax.dynamic_slice_in_dim(inputs.q_t, q_start, size_q, axis=inputs.q_t.ndim - 1)
            do_tile = lax.dynamic_slice_in_dim(d_out, q_start, size_q, axis=d_out.ndim - 2)
            dot_tile = lax.dynamic_slice_in_dim(d_out_t, q_start, size_q, axis=d_out_t.ndim - 1)
            lse_tile = lax.dynamic_slice_in_dim(lse, q_start, size_q, axis=lse.ndim - 1)
            d_tile = lax.dynamic_slice_in_dim(d_row, q_start, size_q, axis=d_row.ndim - 1)
            if not (_static_int(geometry.block_q) and plan.q_len % size_q == 0 and geometry.block_q == size_q):
                # rows of another block get zero cotangents here: they add exact zeros
                own = _rows_of_block(geometry, q_first, q_start, size_q)
                do_tile = jnp.where(own[:, None], do_tile, 0)
                dot_tile = jnp.where(own, dot_tile, 0)
                d_tile = jnp.where(own, d_tile, 0)
            tile = _tile_logits(plan, geometry, inputs, q_tile, kt_tile, q_start, k_first, k_start)
            # rule 19: P = exp(x - lse), exactly 0 on excluded keys (x = -inf) and in fully excluded rows
            # (lse = -inf, every x = -inf: subtracting 0 there keeps exp(-inf) = 0, never NaN)
            p = jnp.exp(tile.x - jnp.where(lse_tile == -jnp.inf, 0, lse_tile)[..., None])
            d_weights = _matmul(do_tile, vt_tile, 1)  # dO vᵀ
            dropped = p
            if tile.multiplier is not None:
                d_weights = d_weights * tile.multiplier  # rule 14: dW = Z (dO vᵀ)
                dropped = p * tile.multiplier
            d_logits = p * (d_weights - d_tile[..., None])  # rule 14: dS = P (dW - D)
            # rule 14: dv = (P Z)ᵀ dO and dk = scale dRᵀ q, summed over the G query heads of the kv head
            dvt_tile = dvt_tile + _matmul(dot_tile, dropped, 2)
            if dbias is not None:
                dbias = _add_tile(dbias, _reduce_to(d_logits, dbias.shape), q_start, k_start)  # rule 14: dS
            if tile.capped is not None:
                d_logits = d_logits * (1 - tile.capped * tile.capped)  # rule 14: through the softcap
            d_logits = d_logits * inputs.scale
            dq = _add_tile(dq, _matmul(d_logits, k_tile, 1), q_start, None)  # rule 14: dq = scale dR k
            dkt_tile = dkt_tile + _matmul(qt_tile, d_logits, 2)
            return dq, dkt_tile, dvt_tile, dbias

        init = (dq, jnp.zeros(kt_tile.shape, compute), jnp.zeros(vt_tile.shape, compute), dbias)
        dq, dkt_tile, dvt_tile, dbias = _loop(first, stop, query_block, init, single_q)
        # columns before the block belong to the previous one; they hold exact zeros here
        dk_t = _add_tile(dk_t, dkt_tile, None, k_start)
        dv_t = _add_tile(dv_t, dvt_tile, None, k_start)
        return dq, dk_t, dv_t, dbias

    # dk and dv are accumulated transposed, (..., E, S) and (..., Ev, S)
    init = (jnp.zeros(inputs.q.shape, compute), jnp.zeros(inputs.k_t.shape, compute),
            jnp.zeros(inputs.v_t.shape, compute), dbias)
    num_blocks = _div(geometry.kv_valid + geometry.block_k - 1, geometry.block_k)
    dq, dk_t, dv_t, dbias = _loop(0, num_blocks, key_block, init, single_k)
    return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2), dbias


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


def heads_one_at_a_time(arrays: tuple[Any, ...]) -> bool:
    """Whether the programs loop over kv heads one at a time (on the CPU, where a head's unbatched
    tile matmuls run on all cores and its tiles stay in cache: measured faster than batched heads) or
    take all heads in each tile (accelerators). Arrays on a device decide; tracers (a user's
    transformation) go by the default backend."""
    for x in arrays:
        if x is not None and not isinstance(x, jax.core.Tracer):
            return all(d.platform == "cpu" for d in x.devices())
    return jax.default_backend() == "cpu"


def _forward(plan: AttentionPlan, operands: _Operands, geometry: Geometry,
             per_head: bool) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` grouped, ``(*B, Hkv, G, L, Ev)`` and ``(*B, Hkv, G, L)``, in the compute dtype."""
    compute = jnp.dtype(plan.compute_dtype)
    shape = plan.grouped_shape(plan.value_dim)
    if _empty(plan):
        return jnp.zeros(shape, compute), jnp.full(shape[:-1], -jnp.inf, compute)  # rule 8: L = 0 or S = 0
    if not per_head:
        return forward_core(plan, _inputs(operands, None), geometry)
    heads = _heads(plan)
    out, lse = lax.map(lambda h: forward_core(plan, _inputs(operands, heads, h), geometry),
                       jnp.arange(math.prod(heads), dtype=jnp.int32))
    return out.reshape(shape), lse.reshape(shape[:-1])


def _backward(plan: AttentionPlan, operands: _Operands, geometry: Geometry, per_head: bool, d_out: jax.Array,
              out: jax.Array, lse: jax.Array, d_lse: jax.Array | None) -> tuple[Any, ...]:
    """``(dq, dk, dv, dbias)`` in the compute dtype and the grouped layouts of q, k, v and the bias
    (dbias None without a bias), from the grouped d_out, out, lse and lse's cotangent (or None)."""
    compute = jnp.dtype(plan.compute_dtype)
    dbias = None if operands.bias is None else jnp.zeros(operands.bias.shape, compute)
    if _empty(plan):
        return (jnp.zeros(operands.q.shape, compute), jnp.zeros(operands.k.shape, compute),
                jnp.zeros(operands.v.shape, compute), dbias)
    if not per_head:
        return backward_core(plan, _inputs(operands, None), geometry, d_out, out, lse, d_lse, dbias)
    heads = _heads(plan)

    def head(dbias: jax.Array | None, h: Any) -> tuple[Any, tuple[jax.Array, ...]]:
        d_out_h, out_h, lse_h = (_head_of(x, heads, h) for x in (d_out, out, lse))
        assert d_out_h is not None and out_h is not None and lse_h is not None
        dq, dk, dv, dbias_h = backward_core(plan, _inputs(operands, heads, h), geometry, d_out_h, out_h, lse_h,
                                            _head_of(d_lse, heads, h), _head_of(dbias, heads, h))
        if dbias is not None and dbias_h is not None:
            dbias = _with_head(dbias, dbias_h, heads, h)  # rule 14: summed into bias's shape
        return dbias, (dq, dk, dv)

    dbias, (dq, dk, dv) = lax.scan(head, dbias, jnp.arange(math.prod(heads), dtype=jnp.int32))
    # rule 2: dk and dv summed over the G query heads of each kv head
    dk, dv = (x.reshape(*heads, *x.shape[1:]).sum(axis=len(heads) - 1) for x in (dk, dv))
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
def blocked_attention(plan: AttentionPlan, per_head: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                      mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                      scale: jax.Array, softcap: jax.Array | None,
                      dropout_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a blocked plan (static, its traced values zeroed; scale, softcap and dropout
    scale traced): out ``plan.out_shape`` in ``plan.dtype``, lse ``plan.lse_shape`` in the compute
    dtype. ``per_head``: ``heads_one_at_a_time``. Differentiable in reverse mode (``jax.grad``,
    ``jax.vjp``), by the blocked backward."""
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    return _results(plan, *_forward(plan, operands, _static_geometry(plan), per_head))


def _blocked_attention_fwd(plan: AttentionPlan, per_head: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                           scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array) -> tuple[Any, Any]:
    with precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
        operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
        out, lse = _forward(plan, operands, _static_geometry(plan), per_head)
        # rule 19: the residuals are the inputs, out in the compute dtype and lse; never the weights
        residuals = (q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, out, lse)
        return _results(plan, out, lse), residuals


def _blocked_attention_bwd(plan: AttentionPlan, per_head: bool, residuals: tuple[Any, ...],
                           cotangents: tuple[jax.Array, jax.Array]) -> tuple[Any, ...]:
    # rule 10: the pullback may be traced after the forward's scope has closed (jax.vjp's pullback
    # called later): float64 again inside a scoped jax.enable_x64
    with precision_scope(plan):
        q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale, out, lse = residuals
        d_out, d_lse = cotangents
        operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
        grads = _backward(plan, operands, _static_geometry(plan), per_head,
                          d_out.reshape(plan.grouped_shape(plan.value_dim)), out, lse, d_lse.reshape(lse.shape))
        dq, dk, dv, dbias = _gradients(plan, q, k, v, bias, grads)
        return dq, dk, dv, None, dbias, None, None, None, None  # masks and scalars get no cotangent


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def blocked_vjp(plan: AttentionPlan, per_head: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None, d_out: jax.Array,
                scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
                geometry: Geometry | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, dbias)`` of ``sum(out * d_out)`` for a blocked plan: the blocked forward's out
    (compute dtype) and lse, then the FlashAttention-2 backward; in the shapes and dtypes of q, k, v
    and bias (dbias None without a bias). ``geometry`` (traced) replaces the plan's blocks and key
    range (the padded bucket programs)."""
    geometry = _static_geometry(plan) if geometry is None else geometry
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    out, lse = _forward(plan, operands, geometry, per_head)  # rule 19: out and lse recomputed first
    grads = _backward(plan, operands, geometry, per_head, d_out.reshape(plan.grouped_shape(plan.value_dim)), out,
                      lse, None)
    return _gradients(plan, q, k, v, bias, grads)


def bucket_forward(plan: AttentionPlan, per_head: bool, q: jax.Array, k: jax.Array, v: jax.Array,
                   mask: jax.Array | None, bias: jax.Array | None, dropout_mask: jax.Array | None,
                   scale: jax.Array, softcap: jax.Array | None, dropout_scale: jax.Array,
                   geometry: Geometry) -> tuple[jax.Array, jax.Array]:
    """``(out, lse)`` of a padded plan with traced ``geometry``, both in the compute dtype (out not
    rounded: the caller cuts and rounds it)."""
    operands = _prepare(plan, q, k, v, mask, bias, dropout_mask, scale, softcap, dropout_scale)
    out, lse = _forward(plan, operands, geometry, per_head)
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
        return blocked_attention_jit(JaxBackend._static_plan(plan), heads_one_at_a_time((q, k, v)), q, k, v, mask,
                                     bias, dropout_mask, *JaxBackend._traced_scalars(plan))


def blocked_backward(plan: AttentionPlan, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     bias: jax.Array | None, dropout_mask: jax.Array | None,
                     d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """``(dq, dk, dv, dbias)`` of a blocked plan (rule 19), as ``blocked_vjp``."""
    from .jax import JaxBackend

    with precision_scope(plan):  # rule 10: float64 inside a scoped jax.enable_x64
        return blocked_vjp_jit(JaxBackend._static_plan(plan), heads_one_at_a_time((q, k, v)), q, k, v, mask, bias,
                               dropout_mask, d_out, *JaxBackend._traced_scalars(plan))
