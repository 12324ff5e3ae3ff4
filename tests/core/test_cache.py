"""EmbeddingCache: byte bound, LRU order, holds, host tier."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitbatch.core import EmbeddingCache, ItemKey
from vitbatch.core.host_tier import LruTier, tensor_bytes


def t(rows: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((rows, 4), float(value), dtype=torch.float32)  # 16 bytes a row


def test_lru_eviction_order_and_bound() -> None:
    cache = EmbeddingCache(3 * 16 * 2)
    for h in range(3):
        assert cache.put(ItemKey(h, 2), t(2, h))
    cache.get(ItemKey(0, 2))  # 0 becomes most recent
    assert cache.put(ItemKey(3, 2), t(2))
    assert ItemKey(1, 2) not in cache and ItemKey(0, 2) in cache
    assert cache.used_bytes <= cache.capacity_bytes
    assert cache.stats.evictions == 1


def test_held_entries_are_not_evicted_and_new_entry_is_rejected() -> None:
    cache = EmbeddingCache(2 * 16 * 2)
    cache.put(ItemKey(0, 2), t(2))
    cache.put(ItemKey(1, 2), t(2))
    with cache.hold([ItemKey(0, 2), ItemKey(1, 2)]):
        assert not cache.put(ItemKey(2, 2), t(2))
        assert ItemKey(0, 2) in cache and ItemKey(1, 2) in cache
    assert cache.put(ItemKey(2, 2), t(2))
    assert cache.stats.rejected == 1


def test_oversized_entry_is_not_stored() -> None:
    cache = EmbeddingCache(16)
    assert not cache.put(ItemKey(0, 2), t(2))
    assert len(cache) == 0


def test_host_tier_keeps_evicted_entries_and_brings_them_back() -> None:
    cache = EmbeddingCache(2 * 16 * 2, host_capacity_bytes=2 * 16 * 2)
    for h in range(4):
        cache.put(ItemKey(h, 2), t(2, h))
    assert cache.host_keys() == [ItemKey(0, 2), ItemKey(1, 2)]
    back = cache.get(ItemKey(0, 2))
    torch.testing.assert_close(back, t(2, 0))
    assert cache.stats.host_hits == 1
    assert (
        cache.used_bytes <= cache.capacity_bytes
        and cache.host_used_bytes <= cache.host_capacity_bytes
    )


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(0, 400),
    host=st.integers(0, 400),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get", "hold"]), st.integers(0, 8), st.integers(1, 6)),
        max_size=60,
    ),
)
def test_cache_never_exceeds_bounds_and_returns_what_was_stored(capacity, host, ops) -> None:
    cache = EmbeddingCache(capacity, host_capacity_bytes=host)
    for op, h, rows in ops:
        key = ItemKey(h, rows)
        if op == "put":
            cache.put(key, t(rows, h * 10 + rows))
        elif op == "get":
            got = cache.get(key)
            if got is not None:
                torch.testing.assert_close(got, t(rows, h * 10 + rows))
        else:
            with cache.hold([key]):
                present = key in cache
                cache.put(ItemKey(h + 100, rows), t(rows))
                assert (key in cache) == present or key in cache.host_keys()
        assert cache.used_bytes <= cache.capacity_bytes
        assert cache.host_used_bytes <= cache.host_capacity_bytes


class ReplaceableTier:
    """A device tier whose storage its owner can replace (as an engine re-creates its
    cache): a fresh ``LruTier`` behind it and a bumped generation."""

    def __init__(self, capacity: int) -> None:
        self.capacity_each = capacity
        self.generation = 0
        self.tier = LruTier(capacity, tensor_bytes)

    def replace(self) -> None:
        self.tier = LruTier(self.capacity_each, tensor_bytes)
        self.generation += 1

    def __getattr__(self, name: str):
        return getattr(self.tier, name)

    def __contains__(self, key: object) -> bool:
        return key in self.tier

    def __len__(self) -> int:
        return len(self.tier)


def test_engine_device_tier_demotes_and_follows_replacement() -> None:
    tier = ReplaceableTier(2 * 16 * 2)
    cache = EmbeddingCache(device_tier=tier, host_capacity_bytes=4 * 16 * 2)
    assert cache.capacity_bytes == tier.capacity_each
    for h in range(3):
        assert cache.put(ItemKey(h, 2), t(2, h))
    assert cache.host_keys() == [ItemKey(0, 2)]  # evicted from the engine's tier, demoted
    assert tier.tier.used == cache.used_bytes == 2 * 16 * 2
    assert torch.equal(cache.get(ItemKey(0, 2)), t(2, 0)) and cache.stats.host_hits == 1
    tier.replace()  # the engine re-created its cache: nothing of the old one serves
    assert ItemKey(1, 2) not in cache and len(cache) == 0 and cache.host_used_bytes == 0
    assert cache.get(ItemKey(2, 2)) is None


def test_device_tier_and_capacity_are_exclusive() -> None:
    with pytest.raises(ValueError, match="capacity_bytes or device_tier"):
        EmbeddingCache(1024, device_tier=ReplaceableTier(16))
