"""The host arena: blocks never leak or overlap, restores return the exact rows, bounds hold.

Run on CPU with ``copy_host_tensors`` so the block path (what a CUDA demotion
takes) is exercised; tests/gpu checks the side stream and the absence of
synchronisation on a GPU.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitbatch.core.host_arena import HostArena
from vitbatch.core.items import ItemKey

BLOCK = 64


def tensor_for(key: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(key * 31 + rows)
    return torch.randn(rows, 5, generator=generator).to(dtype)


operations = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "restore", "take", "discard"]),
        st.integers(0, 9),  # key
        st.integers(0, 40),  # rows
        st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
        st.booleans(),  # protect the key's neighbour
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=operations, blocks=st.integers(1, 24))
def test_arena_matches_a_dict_model(ops, blocks) -> None:
    arena = HostArena(blocks * BLOCK, block_bytes=BLOCK, copy_host_tensors=True)
    model: dict[ItemKey, torch.Tensor] = {}
    for op, k, rows, dtype, protect in ops:
        key = ItemKey(k, rows)
        if op == "put":
            value = tensor_for(k, rows, dtype)
            protected = {ItemKey(k + 1, r) for r in range(41)} if protect else set()
            model.pop(key, None)
            evicted = arena.put(key, value, protected)
            if evicted is not None:
                assert not set(evicted) & protected
                for victim in evicted:
                    del model[victim]
                model[key] = value
        elif op in ("restore", "take"):
            restored = getattr(arena, op)(key)
            if key in model:
                assert restored is not None and restored.dtype == model[key].dtype
                assert torch.equal(restored, model[key])
                if op == "take":
                    del model[key]
            else:
                assert restored is None
        else:
            assert arena.discard(key) == (model.pop(key, None) is not None)
        assert set(arena.keys()) == set(model)
        assert arena.used <= arena.capacity
        owned = [block for key in arena.keys() for block in arena.entry(key).blocks]
        assert len(owned) == len(set(owned))  # no block belongs to two entries
        assert arena.row_bytes == sum(arena.entry(key).nbytes for key in arena.keys())
        if arena._segments:  # allocated at the first block demotion
            assert len(owned) + len(set(arena._free)) == blocks == len(owned) + len(arena._free)
    for key, value in model.items():
        assert torch.equal(arena.peek(key), value)


def test_host_tensors_are_kept_without_a_copy_and_too_big_is_refused() -> None:
    arena = HostArena(4 * BLOCK, block_bytes=BLOCK)
    value = torch.ones(3, 4)
    assert arena.put(ItemKey(1, 3), value) == []
    assert arena.restore(ItemKey(1, 3)) is value
    assert arena.put(ItemKey(2, 100), torch.ones(100, 4)) is None and len(arena) == 1
    zero = HostArena(0)
    assert zero.put(ItemKey(1, 3), value) is None and len(zero) == 0


def test_an_entry_reusing_freed_blocks_gets_them_in_one_run() -> None:
    """Freed blocks come back out ascending, so the next entry is one copy, not one per block."""
    arena = HostArena(8 * BLOCK, block_bytes=BLOCK, copy_host_tensors=True)
    rows = 4 * BLOCK // (5 * 4)  # float32 rows of 5: about 4 blocks each
    first, second = tensor_for(1, rows, torch.float32), tensor_for(2, rows, torch.float32)
    arena.put("a", first)
    arena.put("b", second)
    arena.discard("a")
    third = tensor_for(3, rows, torch.float32)
    assert arena.put("c", third) == []
    blocks = arena.entry("c").blocks
    assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    assert len(arena._runs(blocks, arena.entry("c").nbytes)) == 1
    # The arena is full: "d" evicts "b" (least recent) and takes its blocks, in order.
    assert arena.put("d", first) == ["b"]
    blocks = arena.entry("d").blocks
    assert blocks == list(range(blocks[0], blocks[0] + len(blocks)))
    assert torch.equal(arena.take("d"), first) and torch.equal(arena.take("c"), third)


def test_the_arena_is_pinned_in_segments_and_entries_span_them(monkeypatch) -> None:
    """No one allocation beyond SEGMENT_BYTES (the pinned allocator rounds to a power of
    two); an entry whose blocks cross a segment boundary still comes back exact."""
    from vitbatch.core import host_arena

    monkeypatch.setattr(host_arena, "SEGMENT_BYTES", 3 * BLOCK)
    arena = HostArena(8 * BLOCK, block_bytes=BLOCK, copy_host_tensors=True)
    values = {key: tensor_for(key, 2 * BLOCK // 20 + key, torch.float32) for key in range(3)}
    for key, value in values.items():
        assert arena.put(key, value) == []
    assert [segment.numel() for segment in arena._segments] == [3 * BLOCK, 3 * BLOCK, 2 * BLOCK]
    assert any(
        len({block // 3 for block in arena.entry(key).blocks}) > 1 for key in values
    )  # some entry spans two segments
    for key, value in values.items():
        assert torch.equal(arena.peek(key), value)
        assert torch.equal(arena.take(key), value)
