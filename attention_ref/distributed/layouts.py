"""Sequence layouts of context-parallel attention: how the L tokens of a sequence are split over W
ranks, as permutations with the **global position** of every token each rank holds.

* ``contiguous``: rank r holds the r-th of W consecutive chunks (``np.array_split`` sizes: the first
  ``L % W`` ranks one token more);
* ``zigzag`` (head-tail, DUAL_CHUNK_SWAP): the sequence in 2W consecutive chunks (``np.array_split``
  sizes), rank r holding chunks r and 2W-1-r, in that order, so that causal work is balanced;
* ``striped``: token i on rank ``i % W``, in order.

A per-document layout (``documents=cu_seqlens``, FlashAttention's offsets, rule 20) splits each
document by the layout on its own and gives rank r its part of every document, in document order;
tokens after the last offset are split as one more document. ``positions(rank)`` are always the
positions in the whole sequence, which causal, window and document masks need.

``shard`` and ``unshard`` work on NumPy, JAX and torch arrays along any axis (default -2, the
sequence axis of the heads-first layout ``(..., L, E)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..frameworks import framework_of

#: The layouts, by name.
LAYOUTS = ("contiguous", "zigzag", "striped")


def _split(positions: np.ndarray, layout: str, world_size: int) -> list[np.ndarray]:
    """The positions of each rank, for one run of consecutive ``positions``."""
    if layout == "contiguous":
        return list(np.array_split(positions, world_size))
    if layout == "zigzag":
        chunks = np.array_split(positions, 2 * world_size)
        return [np.concatenate([chunks[r], chunks[2 * world_size - 1 - r]]) for r in range(world_size)]
    return [positions[r::world_size] for r in range(world_size)]


@dataclass(frozen=True)
class SequenceLayout:
    """A layout of ``length`` tokens over ``world_size`` ranks (``layout`` one of ``LAYOUTS``), optionally
    per document (``documents``: ``cu_seqlens``, nondecreasing from 0, at most ``length``)."""

    layout: str
    world_size: int
    length: int
    documents: tuple[int, ...] | None = None
    _ranks: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f"length must be a non-negative int, got {self.length!r}")
        bounds = [0, self.length]
        if self.documents is not None:
            cu = [int(x) for x in self.documents]
            if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:], strict=False)) or cu[-1] > self.length:
                raise ValueError(f"documents must be cu_seqlens: nondecreasing from 0 to at most length {self.length}, "
                                 f"got {cu}")
            object.__setattr__(self, "documents", tuple(cu))
            bounds = [*cu, self.length] if cu[-1] < self.length else cu
        parts: list[list[np.ndarray]] = [[] for _ in range(self.world_size)]
        for start, stop in zip(bounds, bounds[1:], strict=False):
            for rank, positions in enumerate(_split(np.arange(start, stop), self.layout, self.world_size)):
                parts[rank].append(positions)
        ranks = tuple(np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64) for p in parts)
        object.__setattr__(self, "_ranks", ranks)

    def positions(self, rank: int) -> np.ndarray:
        """int64 ``(n_rank,)``: the global positions rank ``rank`` holds, in its order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank!r}")
        return self._ranks[rank].copy()

    def permutation(self) -> np.ndarray:
        """int64 ``(length,)``: the ranks' positions concatenated in rank order (``x[perm]`` is every shard in
        turn)."""
        return np.concatenate(self._ranks) if self._ranks else np.zeros(0, np.int64)

    def shard(self, x: Any, rank: int, axis: int = -2) -> Any:
        """Rank ``rank``'s tokens of x (``length`` along ``axis``), in its order."""
        self._check_length(x, axis)
        return _take(x, self.positions(rank), axis)

    def unshard(self, shards: Any, axis: int = -2) -> Any:
        """The whole sequence from every rank's shard (a sequence of ``world_size`` arrays, in rank
        order): the inverse of ``shard``."""
        if len(shards) != self.world_size:
            raise ValueError(f"unshard needs {self.world_size} shards, got {len(shards)}")
        for rank, x in enumerate(shards):
            if x.shape[axis] != len(self._ranks[rank]):
                raise ValueError(f"shard {rank} has {x.shape[axis]} tokens along axis {axis}, expected "
                                 f"{len(self._ranks[rank])}")
        joined = _concatenate(list(shards), axis)
        return _take(joined, np.argsort(self.permutation(), kind="stable"), axis)

    def _check_length(self, x: Any, axis: int) -> None:
        if x.shape[axis] != self.length:
            raise ValueError(f"the layout is of {self.length} tokens, got {x.shape[axis]} along axis {axis}")


def layout(name: str, world_size: int, length: int, *, documents: Any = None) -> SequenceLayout:
    """``SequenceLayout(name, world_size, length, documents)``; ``documents`` any cu_seqlens (list,
    NumPy array)."""
    return SequenceLayout(name, world_size, length, None if documents is None else tuple(int(x) for x in documents))


def _take(x: Any, index: np.ndarray, axis: int) -> Any:
    framework = framework_of(x)
    if framework == "torch":
        import torch

        return torch.index_select(x, axis, torch.as_tensor(index, device=x.device))
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.take(x, jnp.asarray(index), axis=axis)
    return np.take(np.asarray(x), index, axis=axis)


def _concatenate(parts: list[Any], axis: int) -> Any:
    framework = framework_of(parts[0])
    if framework == "torch":
        import torch

        return torch.cat(parts, dim=axis)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.concatenate(parts, axis=axis)
    return np.concatenate(parts, axis=axis)
