"""Sequence layouts (issue 14, part 2): each is a permutation of the sequence with global positions,
shard and unshard are inverses on every framework, and the layouts are the ones their names say."""

from __future__ import annotations

import numpy as np
import pytest

from attention_ref.distributed.layouts import LAYOUTS, layout

from .conftest import import_or_skip


def test_the_layouts_as_written() -> None:
    """Small cases worked out by hand from the definitions."""
    zigzag = layout("zigzag", 2, 8)  # 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag.positions(0).tolist() == [0, 1, 6, 7] and zigzag.positions(1).tolist() == [2, 3, 4, 5]
    striped = layout("striped", 3, 7)
    assert [striped.positions(r).tolist() for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    contiguous = layout("contiguous", 3, 7)  # np.array_split sizes: 3, 2, 2
    assert [contiguous.positions(r).tolist() for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    uneven = layout("zigzag", 2, 6)  # 4 chunks of sizes 2, 2, 1, 1
    assert [uneven.positions(r).tolist() for r in range(2)] == [[0, 1, 5], [2, 3, 4]]
    documents = layout("zigzag", 2, 10, documents=[0, 4, 8])  # documents [0, 4), [4, 8), then [8, 10)
    assert documents.positions(0).tolist() == [0, 3, 4, 7, 8]
    assert documents.positions(1).tolist() == [1, 2, 5, 6, 9]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("length", [0, 1, 5, 16, 17, 33])
def test_every_layout_is_a_permutation(name: str, world_size: int, length: int) -> None:
    for documents in (None, [0], [0, length // 2], [0, 0, length // 3, length]):
        split = layout(name, world_size, length, documents=documents)
        held = [split.positions(r) for r in range(world_size)]
        assert sorted(np.concatenate(held).tolist()) == list(range(length))
        if documents is None:
            sizes = [len(p) for p in held]
            assert max(sizes, default=0) - min(sizes, default=0) <= (2 if name == "zigzag" else 1)


def test_zigzag_balances_causal_work() -> None:
    """Causal work of a rank is the sum over its queries of the keys at or before them: equal on every rank
    when L is a multiple of 2W, the reason for the layout."""
    for world_size in (2, 4, 8):
        split = layout("zigzag", world_size, 16 * world_size)
        work = {int((split.positions(r) + 1).sum()) for r in range(world_size)}
        assert len(work) == 1
        contiguous = layout("contiguous", world_size, 16 * world_size)
        assert len({int((contiguous.positions(r) + 1).sum()) for r in range(world_size)}) == world_size


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_shard_and_unshard_are_inverses(framework: str) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 17, 4)).astype(np.float32)
    if framework == "torch":
        convert = import_or_skip("torch").as_tensor
    elif framework == "jax":
        convert = import_or_skip("jax").numpy.asarray
    else:
        convert = np.asarray
    for name in LAYOUTS:
        split = layout(name, 4, 17, documents=[0, 5, 12])
        shards = [split.shard(convert(x), r) for r in range(4)]
        for r, shard in enumerate(shards):
            np.testing.assert_array_equal(np.asarray(shard), x[:, :, split.positions(r)])
        np.testing.assert_array_equal(np.asarray(split.unshard(shards)), x)
        np.testing.assert_array_equal(np.asarray(split.unshard([split.shard(convert(x), r, axis=2)
                                                                 for r in range(4)], axis=2)), x)


def test_bad_layouts_are_value_errors() -> None:
    with pytest.raises(ValueError, match="layout must be one of contiguous, zigzag, striped"):
        layout("ring", 2, 8)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        layout("zigzag", 0, 8)
    with pytest.raises(ValueError, match="documents must be cu_seqlens"):
        layout("zigzag", 2, 8, documents=[0, 5, 3])
    split = layout("striped", 2, 8)
    with pytest.raises(ValueError, match="the layout is of 8 tokens, got 7"):
        split.shard(np.zeros((7, 2)), 0)
    with pytest.raises(ValueError, match="unshard needs 2 shards, got 1"):
        split.unshard([np.zeros((4, 2))])
    with pytest.raises(ValueError, match="rank must be in"):
        split.positions(2)
