"""The torch backend's blocked algorithm (SPEC.md rule 19): attention in bounded memory, tile by tile,
on the device of the input tensors.

Shape letters: B... batch dims, N = prod(B), Hq query heads, Hkv kv heads, G = Hq // Hkv query heads
per kv head, R = N * Hkv, L queries, S keys, E q/k head dim, Ev value head dim, bq and bk the tile
(``plan.block_q``, ``plan.block_k``), nq <= bq and nk <= bk the queries and keys of one tile.

Layout: q is held as ``(R, G, L, E)``, k as ``(R, S, E)``, v as ``(R, S, Ev)``. One tile holds every
head at once: the G query heads of a kv head are stacked along the query axis, so that a tile's
logits are one ``(R, G * nq, nk)`` array (one batched matmul per tile, and the sums over the query
heads of a kv head in dk and dv are part of the matmul, rule 2); viewed as ``(*B, Hkv, G, nq, nk)`` it
broadcasts against mask, bias and dropout mask, each held as a view ``(*B|1, Hkv|1, G|1, L|1, S|1)``
of the array given and sliced per tile on its own shape.

Memory: besides the inputs, their compute-dtype copies (none when they already are in it), the
output and the gradients, a call holds a small constant number of tile-sized arrays
(``R * G * bq * bk`` elements each) and per-row statistics. No Python-side synchronisation: which
key blocks a query block visits is arithmetic on the plan (``plan.key_block_range``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..plan import AttentionPlan
from .torch import ieee_float32_matmul

_NEG_INF = -math.inf


def _operand(plan: AttentionPlan, x: torch.Tensor | None) -> torch.Tensor | None:
    """A mask, bias or dropout mask broadcastable to ``(*B, Hq, L, S)`` as a view
    ``(*B|1, Hkv|1, G|1, L|1, S|1)`` (a dim of size 1 stays 1; rank-2 calls have no batch dims and
    Hkv = G = 1); None stays None. Nothing is copied or broadcast."""
    if x is None:
        return None
    rank = len(plan.logits_shape)
    shape = (1,) * (rank - x.dim()) + tuple(x.shape)
    if not plan.has_head_axis:
        return x.reshape(1, 1, *shape)
    batch, heads, tail = shape[:-3], shape[-3], shape[-2:]
    split = (plan.num_kv_heads, plan.group_size) if heads != 1 else (1, 1)  # rule 2: query head h = g * G + r
    return x.reshape(*batch, *split, *tail)


def _tile(x: torch.Tensor, q_start: int, q_stop: int, k_start: int, k_stop: int) -> torch.Tensor:
    """The ``[q_start:q_stop, k_start:k_stop]`` tile of an ``_operand`` view (size-1 dims stay 1)."""
    rows = slice(None) if x.shape[-2] == 1 else slice(q_start, q_stop)
    cols = slice(None) if x.shape[-1] == 1 else slice(k_start, k_stop)
    return x[..., rows, cols]


class _Tiles:
    """What every tile of one call shares: the grouped inputs in the compute dtype, the operand views,
    the scalars, reusable tile storage and the causal/window exclusion of the tiles that straddle
    the band's edges (rule 7)."""

    def __init__(self, plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, bias: torch.Tensor | None, dropout_mask: torch.Tensor | None) -> None:
        compute = getattr(torch, plan.compute_dtype)
        self.plan = plan
        self.device = q.device
        self.compute = compute
        self.rows = math.prod(plan.batch_shape) * plan.num_kv_heads  # R
        self.group = plan.group_size
        # rule 10: inputs widened exactly; rule 1: a rank-2 input is one head; rule 2: kv head h // G
        self.q = q.to(compute).reshape(self.rows, self.group, plan.q_len, plan.head_dim)
        self.k = k.to(compute).reshape(self.rows, plan.kv_len, plan.head_dim)
        self.v = v.to(compute).reshape(self.rows, plan.kv_len, plan.value_dim)
        self.mask = _operand(plan, mask)
        self.bias = _operand(plan, None if bias is None else bias.to(compute))  # rule 5: converted exactly
        self.keep = _operand(plan, dropout_mask)
        self.scale = plan.scale  # rule 3: rounded once to the compute dtype by the matmul's alpha
        # rule 4: a tensor, so that the division is a true division on every device
        self.softcap = None if plan.softcap is None else torch.tensor(plan.softcap, dtype=compute, device=self.device)
        # rule 13: 1 / (1 - p) computed in float64, rounded once to the compute dtype
        self.dropout_scale = torch.tensor(plan.dropout_scale, dtype=compute, device=self.device)
        self.rescale_dropout = plan.dropout_p != 0.0
        self.low, self.high = plan.key_range
        self.tile_shape = (*plan.batch_shape, plan.num_kv_heads, self.group) if plan.has_head_axis else (1, 1)
        self._bands: dict[tuple[int, int, int], torch.Tensor | None] = {}
        tile_size = self.rows * self.group * (plan.block_q or 0) * (plan.block_k or 0)
        self._storage = [torch.empty(tile_size, dtype=compute, device=self.device) for _ in range(2)]

    def buffer(self, index: int, rows: int, cols: int) -> torch.Tensor:
        """Tile storage number ``index`` (0 or 1) as a contiguous ``(R, rows, cols)`` array."""
        return self._storage[index][: self.rows * rows * cols].view(self.rows, rows, cols)

    def band_exclusion(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> torch.Tensor | None:
        """Boolean ``(nq, nk)``: True where causal or the window (rule 7, ``plan.key_range``) excludes
        the key; None when the tile lies inside the band (the interior tiles build no mask)."""
        low, high = self.low, self.high
        inside_low = low is None or k_start - (q_stop - 1) >= low
        inside_high = high is None or (k_stop - 1) - q_start <= high
        if inside_low and inside_high:
            return None
        key = (k_start - q_start, q_stop - q_start, k_stop - k_start)
        if key not in self._bands:
            key_minus_query = (torch.arange(k_start, k_stop, device=self.device)
                               - torch.arange(q_start, q_stop, device=self.device)[:, None])
            excluded = torch.zeros(key_minus_query.shape, dtype=torch.bool, device=self.device)
            if low is not None:
                excluded |= key_minus_query < low
            if high is not None:
                excluded |= key_minus_query > high
            self._bands[key] = excluded
        return self._bands[key]

    def query_block(self, x: torch.Tensor, q_start: int, q_stop: int) -> torch.Tensor:
        """Rows ``q_start:q_stop`` of a ``(R, G, L, C)`` array as ``(R, G * nq, C)`` (the G query heads
        of a kv head stacked; a copy when G > 1)."""
        return x[:, :, q_start:q_stop].reshape(self.rows, self.group * (q_stop - q_start), x.shape[-1])

    def logits(self, qt: torch.Tensor, q_start: int, q_stop: int, k_start: int, k_stop: int,
               capped: torch.Tensor | None = None) -> torch.Tensor:
        """The tile's logits ``(R, G * nq, nk)`` in tile storage 0, of the stacked query block qt
        ``(R, G * nq, E)``: scaled, capped, biased, and -inf on every excluded key (rules 3-8).
        With a softcap, ``tanh(raw / softcap)`` is also written to ``capped`` when given."""
        rows, cols = qt.shape[1], k_stop - k_start
        x = self.buffer(0, rows, cols)
        kt = self.k[:, k_start:k_stop].transpose(1, 2)
        torch.baddbmm(x, qt, kt, beta=0, alpha=self.scale, out=x)  # rule 3: x = scale * (q · k)
        if self.softcap is not None:
            x.div_(self.softcap).tanh_()  # rule 4: c * tanh(x / c), before the bias
            if capped is not None:
                capped.copy_(x)
            x.mul_(self.softcap)
        x5 = x.view(*self.tile_shape, q_stop - q_start, cols)
        if self.bias is not None:
            x5.add_(_tile(self.bias, q_start, q_stop, k_start, k_stop))  # rule 5
        if self.mask is not None:
            x5.masked_fill_(~_tile(self.mask, q_start, q_stop, k_start, k_stop), _NEG_INF)  # rule 6
        band = self.band_exclusion(q_start, q_stop, k_start, k_stop)
        if band is not None:
            x5.masked_fill_(band, _NEG_INF)  # rule 7: only tiles straddling the band's edges
        return x  # rule 8: a -inf logit (bias) stays -inf and excludes its key

    def apply_dropout(self, p: torch.Tensor, q_start: int, q_stop: int, k_start: int, k_stop: int) -> None:
        """Multiply the tile p ``(R, G * nq, nk)`` in place by ``keep / (1 - p)`` (rule 13)."""
        assert self.keep is not None
        p.view(*self.tile_shape, q_stop - q_start, k_stop - k_start).masked_fill_(
            ~_tile(self.keep, q_start, q_stop, k_start, k_stop), 0)
        if self.rescale_dropout:
            p.mul_(self.dropout_scale)


def _forward(plan: AttentionPlan, tiles: _Tiles, out: torch.Tensor, lse: torch.Tensor) -> None:
    """The online softmax (rule 19) of every query block, written into out ``(R, G, L, Ev)`` (any
    floating dtype: each block is rounded once, from the compute dtype) and lse ``(R, G, L)`` in the
    compute dtype."""
    assert plan.block_q is not None and plan.block_k is not None
    block_q, block_k, group, rows = plan.block_q, plan.block_k, tiles.group, tiles.rows
    acc_storage = torch.empty(rows * group * block_q * plan.value_dim, dtype=tiles.compute, device=tiles.device)
    for q_start in range(0, plan.q_len, block_q):
        q_stop = min(plan.q_len, q_start + block_q)
        stacked = group * (q_stop - q_start)
        first, stop = plan.key_block_range(q_start, q_stop)  # rule 19: the other key blocks are skipped
        if first == stop:  # rule 8: every key excluded: out 0, lse -inf
            out[:, :, q_start:q_stop] = 0
            lse[:, :, q_start:q_stop] = _NEG_INF
            continue
        qt = tiles.query_block(tiles.q, q_start, q_stop)
        acc = acc_storage[: rows * stacked * plan.value_dim].view(rows, stacked, plan.value_dim)
        m = l_sum = torch.empty(0)
        for block in range(first, stop):
            k_start, k_stop = block * block_k, min(plan.kv_len, (block + 1) * block_k)
            x = tiles.logits(qt, q_start, q_stop, k_start, k_stop)
            tile_max = torch.amax(x, dim=-1)
            m_new = tile_max if block == first else torch.maximum(m, tile_max)  # rule 19: m_new = max(m, max x)
            s = m_new.masked_fill(m_new == _NEG_INF, 0)  # s = m_new if m_new > -inf else 0
            p = x.sub_(s.unsqueeze(-1)).exp_()  # p = exp(x - s): exactly 0 on excluded keys
            row_sum = p.sum(dim=-1)
            if tiles.keep is not None:
                tiles.apply_dropout(p, q_start, q_stop, k_start, k_stop)  # z: after l's sum (rule 13)
            vt = tiles.v[:, k_start:k_stop]
            if block == first:  # m = -inf, l = 0, acc = 0: alpha does not matter
                l_sum = row_sum
                torch.bmm(p, vt, out=acc)
            else:
                alpha = torch.exp(m - s)  # exactly 1 when m is unchanged, 0 while no key was attended
                l_sum = l_sum.mul_(alpha).add_(row_sum)
                acc.mul_(alpha.unsqueeze(-1)).baddbmm_(p, vt)
            m = m_new
        empty = l_sum == 0  # rule 8: a fully excluded row
        safe = l_sum.masked_fill(empty, 1)
        acc.div_(safe.unsqueeze(-1))  # out = acc / l (exactly 0 where l = 0: acc is 0 there)
        out[:, :, q_start:q_stop] = acc.view(rows, group, q_stop - q_start, plan.value_dim)
        block_lse = m.add_(torch.log(safe)).masked_fill_(empty, _NEG_INF)  # lse = m + log l, or -inf
        lse[:, :, q_start:q_stop] = block_lse.view(rows, group, q_stop - q_start)


def _forward_arrays(plan: AttentionPlan, tiles: _Tiles, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the tiles: out ``plan.out_shape`` in ``out_dtype``, lse ``plan.lse_shape`` in
    the compute dtype."""
    out = torch.empty(tiles.rows, tiles.group, plan.q_len, plan.value_dim, dtype=out_dtype, device=tiles.device)
    lse = torch.empty(tiles.rows, tiles.group, plan.q_len, dtype=tiles.compute, device=tiles.device)
    _forward(plan, tiles, out, lse)
    return out.reshape(plan.out_shape), lse.reshape(plan.lse_shape)


def _backward(
    plan: AttentionPlan, tiles: _Tiles, out: torch.Tensor, lse: torch.Tensor, d_out: torch.Tensor | None,
    d_lse: torch.Tensor | None, needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The FlashAttention-2 backward (rule 19) from the forward's out (``plan.out_shape``, compute
    dtype, unrounded) and lse (``plan.lse_shape``), for the cotangents d_out (``plan.out_shape``) and
    d_lse (``plan.lse_shape``; None: zero). ``needs`` says which of dq, dk, dv, dbias to compute
    (the others are None). Returns them in the compute dtype, dq ``(R, G, L, E)``, dk ``(R, S, E)``,
    dv ``(R, S, Ev)``, dbias in the shape of the bias's ``_operand`` view."""
    assert plan.block_q is not None and plan.block_k is not None
    need_dq, need_dk, need_dv, need_dbias = needs
    need_ds = need_dq or need_dk or need_dbias
    block_q, block_k, group, rows = plan.block_q, plan.block_k, tiles.group, tiles.rows
    compute, device = tiles.compute, tiles.device
    out = out.reshape(rows, group, plan.q_len, plan.value_dim)
    lse = lse.reshape(rows, group, plan.q_len)
    if d_out is None:
        d_out = torch.zeros_like(out)
    d_out = d_out.to(compute).reshape(rows, group, plan.q_len, plan.value_dim)
    d_lse = None if d_lse is None else d_lse.to(compute).reshape(rows, group, plan.q_len)
    dq = torch.zeros_like(tiles.q) if need_dq else None
    dk = torch.zeros_like(tiles.k) if need_dk else None
    dv = torch.zeros_like(tiles.v) if need_dv else None
    dbias = None
    if need_dbias:
        assert tiles.bias is not None
        dbias = torch.zeros(tiles.bias.shape, dtype=compute, device=device)
    capped_storage = None
    if tiles.softcap is not None and need_ds:
        capped_storage = torch.empty(rows * group * block_q * block_k, dtype=compute, device=device)
    for q_start in range(0, plan.q_len, block_q):
        q_stop = min(plan.q_len, q_start + block_q)
        first, stop = plan.key_block_range(q_start, q_stop)  # rule 19: skipped blocks have zero gradient
        if first == stop:
            continue
        nq, stacked = q_stop - q_start, group * (q_stop - q_start)
        qt = tiles.query_block(tiles.q, q_start, q_stop)
        dot = tiles.query_block(d_out, q_start, q_stop)
        # rule 19: D = rowsum(dO * O) replaces rowsum(P dW); a cotangent of lse adds P d_lse to dS
        big_d = (dot * tiles.query_block(out, q_start, q_stop)).sum(dim=-1)
        if d_lse is not None:
            big_d = big_d.sub_(d_lse[:, :, q_start:q_stop].reshape(rows, stacked))
        block_lse = lse[:, :, q_start:q_stop].reshape(rows, stacked)
        shift = block_lse.masked_fill(block_lse == _NEG_INF, 0).unsqueeze(-1)  # fully excluded rows: P = 0
        dq_block = torch.zeros(rows, stacked, plan.head_dim, dtype=compute, device=device) if need_dq else None
        for block in range(first, stop):
            k_start, k_stop = block * block_k, min(plan.kv_len, (block + 1) * block_k)
            nk = k_stop - k_start
            capped = None
            if capped_storage is not None:
                capped = capped_storage[: rows * stacked * nk].view(rows, stacked, nk)
            p = tiles.logits(qt, q_start, q_stop, k_start, k_stop, capped)
            p.sub_(shift).exp_()  # P = exp(x - lse): exactly 0 on excluded keys and fully excluded rows
            kt, vt = tiles.k[:, k_start:k_stop], tiles.v[:, k_start:k_stop]
            if need_dv:
                assert dv is not None
                if tiles.keep is None:
                    dv[:, k_start:k_stop].baddbmm_(p.transpose(1, 2), dot)  # dv = P^T dO, summed over G
                else:
                    dropped = tiles.buffer(1, stacked, nk)
                    dropped.copy_(p)
                    tiles.apply_dropout(dropped, q_start, q_stop, k_start, k_stop)
                    dv[:, k_start:k_stop].baddbmm_(dropped.transpose(1, 2), dot)  # dv = (P Z)^T dO
            if not need_ds:
                continue
            ds = tiles.buffer(1, stacked, nk)
            torch.bmm(dot, vt.transpose(1, 2), out=ds)  # dO v^T
            if tiles.keep is not None:
                tiles.apply_dropout(ds, q_start, q_stop, k_start, k_stop)  # dW = Z (dO v^T)
            ds.sub_(big_d.unsqueeze(-1)).mul_(p)  # dS = P (dW - D)
            if dbias is not None:
                assert tiles.bias is not None
                target = _tile(dbias, q_start, q_stop, k_start, k_stop)
                target.add_(ds.view(*tiles.tile_shape, nq, nk).sum_to_size(target.shape))  # summed to bias
            if capped is not None:
                ds.mul_(capped.square_().neg_().add_(1))  # dR = dS (1 - tanh^2(raw / c))
            if dq_block is not None:
                dq_block.baddbmm_(ds, kt, alpha=tiles.scale)  # dq = scale dR k
            if dk is not None:
                dk[:, k_start:k_stop].baddbmm_(ds.transpose(1, 2), qt, alpha=tiles.scale)  # dk = scale dR^T q
        if dq is not None and dq_block is not None:
            dq[:, :, q_start:q_stop] = dq_block.view(rows, group, nq, plan.head_dim)
    return dq, dk, dv, dbias


def _gradients_out(plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The compute-dtype gradients of ``_backward`` in the shapes and dtypes of q, k, v and bias."""
    dq, dk, dv, dbias = grads
    return (
        None if dq is None else dq.reshape(q.shape).to(q.dtype),  # rule 14: returned in the input dtype
        None if dk is None else dk.reshape(k.shape).to(k.dtype),
        None if dv is None else dv.reshape(v.shape).to(v.dtype),
        None if dbias is None or bias is None else dbias.reshape(bias.shape).to(bias.dtype),
    )


def blocked_forward(
    plan: AttentionPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    bias: torch.Tensor | None, dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` by the blocked algorithm (rule 19) for a blocked plan: out ``plan.out_shape``
    rounded once to ``plan.dtype``, lse ``plan.lse_shape`` in the compute dtype. mask, bias and
    dropout_mask are as given to ``attention`` (None when absent). Builds no autograd graph."""
    with torch.no_grad():
        tiles = _Tiles(plan, q, k, v, mask, bias, dropout_mask)
        return _forward_arrays(plan, tiles, getattr(torch, plan.dtype))  # rule 11: out rounded once


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
        out, lse = _forward_arrays(plan, tiles, tiles.compute)
        grads = _backward(plan, tiles, out, lse, d_out, None, (True, True, True, bias is not None))
        dq, dk, dv, dbias = _gradients_out(plan, q, k, v, bias, grads)
    assert dq is not None and dk is not None and dv is not None
    return dq, dk, dv, dbias


class BlockedAttention(torch.autograd.Function):
    """``BlockedAttention.apply(q, k, v, bias, plan, mask, dropout_mask) -> (out, lse)``: the blocked
    forward (``blocked_forward``'s results) differentiable by ``torch.autograd`` with respect to q, k,
    v and bias, through the FlashAttention-2 backward (rule 19; once differentiable). Saves q, k, v,
    bias, the masks, out in the compute dtype and lse; never the weights."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None, plan: AttentionPlan, mask: torch.Tensor | None,
                dropout_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        bias_c = None if bias is None else bias.to(getattr(torch, plan.compute_dtype))  # rule 5: exact
        with ieee_float32_matmul(q.device):  # rule 10
            tiles = _Tiles(plan, q, k, v, mask, bias_c, dropout_mask)
            out, lse = _forward_arrays(plan, tiles, tiles.compute)
        ctx.save_for_backward(tiles.q, tiles.k, tiles.v, bias_c, mask, dropout_mask, out, lse)
        ctx.plan = plan
        ctx.shapes = tuple(None if x is None else (x.shape, x.dtype) for x in (q, k, v, bias))
        ctx.set_materialize_grads(False)
        return out.to(getattr(torch, plan.dtype)), lse  # rule 11: out rounded once

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: torch.Tensor | None,
                 d_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        plan: AttentionPlan = ctx.plan
        q, k, v, bias, mask, dropout_mask, out, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        if d_out is None and d_lse is None:
            return None, None, None, None, None, None, None
        with ieee_float32_matmul(q.device):  # rule 10
            tiles = _Tiles(plan, q, k, v, mask, bias, dropout_mask)
            dq, dk, dv, dbias = _backward(plan, tiles, out, lse, d_out, d_lse,
                                          (need_q, need_k, need_v, need_bias and bias is not None))
        grads = []
        for g, shape in zip((dq, dk, dv, dbias), ctx.shapes, strict=True):
            grads.append(None if g is None or shape is None else g.reshape(shape[0]).to(shape[1]))
        return (*grads, None, None, None)


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
