"""Embedding cache: byte-bounded LRU on the device, with an optional host tier.

Why two tiers: device memory for embeddings competes with the KV cache, so the
device tier stays small; an evicted embedding is still far cheaper to copy back
from pinned host memory than to re-encode (a 1344px image is ~2.4k tokens of
3584 bf16 values = 17 MB, a few microseconds of PCIe, versus tens of
milliseconds of ViT).

Entries held by the current step are never evicted: a request that planned on a
hit must find it when the chunk is assembled. If a new entry cannot fit without
evicting held ones, it is simply not stored; the step keeps its own reference,
so nothing is lost, and the byte bound is never exceeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vitbatch.core.host_tier import LruTier, tensor_bytes, to_host
from vitbatch.core.items import ItemKey

__all__ = ["CacheStats", "EmbeddingCache", "tensor_bytes"]


@dataclass
class CacheStats:
    """Cumulative counters; read them, do not write them."""

    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    stored: int = 0
    rejected: int = 0
    evictions: int = 0
    host_evictions: int = 0


def _tier(capacity_bytes: int) -> LruTier[ItemKey, torch.Tensor]:
    return LruTier(capacity_bytes, tensor_bytes)


class EmbeddingCache:
    """Encoder outputs keyed by :class:`ItemKey`, bounded in bytes.

    :param capacity_bytes: bound of the device tier (entries as produced by the
        encoder, on whatever device it ran).
    :param host_capacity_bytes: bound of the host tier; 0 disables it. Evicted
        device entries move here (pinned when CUDA is available) and come back
        with a non-blocking copy on the next hit instead of being re-encoded.
    """

    def __init__(self, capacity_bytes: int, host_capacity_bytes: int = 0) -> None:
        if capacity_bytes < 0 or host_capacity_bytes < 0:
            raise ValueError("cache capacities must be >= 0")
        self._device = _tier(capacity_bytes)
        self._host = _tier(host_capacity_bytes)
        self._held: set[ItemKey] = set()
        self._home: dict[ItemKey, torch.device] = {}
        self.stats = CacheStats()

    # -- sizes ---------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._device.capacity

    @property
    def host_capacity_bytes(self) -> int:
        return self._host.capacity

    @property
    def used_bytes(self) -> int:
        return self._device.used

    @property
    def host_used_bytes(self) -> int:
        return self._host.used

    def __len__(self) -> int:
        return len(self._device.entries) + len(self._host.entries)

    def __contains__(self, key: ItemKey) -> bool:
        return key in self._device or key in self._host

    def peek_all(self) -> list[tuple[ItemKey, torch.Tensor]]:
        """Every entry of both tiers, without touching LRU order or statistics (checks, tests)."""
        return [*self._device.entries.items(), *self._host.entries.items()]

    def host_keys(self) -> list[ItemKey]:
        """Keys held only in the host tier (an adapter may advertise them)."""
        return list(self._host.entries)

    # -- step protection -----------------------------------------------------
    @contextmanager
    def hold(self, keys: Iterable[ItemKey]) -> Iterator[None]:
        """Protect ``keys`` from eviction for the duration of a step."""
        added = set(keys) - self._held
        self._held |= added
        try:
            yield
        finally:
            self._held -= added

    # -- lookups -------------------------------------------------------------
    def get(self, key: ItemKey) -> torch.Tensor | None:
        """The embedding for ``key``, refreshing its recency; ``None`` if absent.

        A host-tier hit is copied back to the device the entry came from and,
        if it fits, promoted to the device tier.
        """
        tensor = self._device.peek(key)
        if tensor is not None:
            self._device.touch(key)
            self.stats.hits += 1
            return tensor
        host = self._host.pop(key)
        if host is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.host_hits += 1
        home = self._home.get(key, host.device)
        tensor = host.to(home, non_blocking=True) if home != host.device else host
        if not self._store_device(key, tensor):
            self._host.put(key, host)  # keep it for next time (its room was just freed)
        return tensor

    def put(self, key: ItemKey, tensor: torch.Tensor) -> bool:
        """Store ``tensor`` under ``key``. Returns whether it was stored."""
        if key in self._device:
            self._device.touch(key)
            return True
        self._host.pop(key)
        stored = self._store_device(key, tensor)
        if stored:
            self.stats.stored += 1
        else:
            self.stats.rejected += 1
        return stored

    def discard(self, key: ItemKey) -> bool:
        """Forget ``key`` in both tiers (an engine dropped it); whether it was there."""
        found = self._device.pop(key) is not None
        found = self._host.pop(key) is not None or found
        self._home.pop(key, None)
        return found

    def clear(self) -> None:
        self._device = _tier(self._device.capacity)
        self._host = _tier(self._host.capacity)
        self._home.clear()

    # -- internals -----------------------------------------------------------
    def _store_device(self, key: ItemKey, tensor: torch.Tensor) -> bool:
        evicted = self._device.put(key, tensor, self._held)
        if evicted is None:
            return False
        for victim_key, victim in evicted:
            self.stats.evictions += 1
            self._demote(victim_key, victim)
        self._home[key] = tensor.device
        return True

    def _demote(self, key: ItemKey, tensor: torch.Tensor) -> None:
        """Move an evicted device entry into the host tier, if it has room."""
        if self._host.capacity == 0:
            self._home.pop(key, None)
            return
        evicted = self._host.make_room(tensor_bytes(tensor), self._held)
        if evicted is None:
            self._home.pop(key, None)
            return
        for victim_key, _ in evicted:
            self.stats.host_evictions += 1
            self._home.pop(victim_key, None)
        self._host.put(key, to_host(tensor))
