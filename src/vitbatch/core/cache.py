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

The device tier is pluggable (:class:`DeviceTier`): by default a vitbatch
:class:`LruTier`, but an adapter may hand in a view of the engine's own cache so
that there is one cache, not two (SGLang: ``mm_schedule.embedding_cache``). Such
a tier can be replaced underneath (the engine re-creates its cache); it then
bumps its ``generation``, and the host tier — entries demoted from the old
cache — is dropped with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from vitbatch.core.host_arena import HostArena
from vitbatch.core.host_tier import LruTier, tensor_bytes
from vitbatch.core.items import ItemKey

__all__ = ["CacheStats", "DeviceTier", "EmbeddingCache", "tensor_bytes"]


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
    host_demotions: int = 0
    """evicted device entries the host tier took."""


class DeviceTier(Protocol):
    """What :class:`EmbeddingCache` needs of its device tier (:class:`LruTier` has it all).

    Sizes are in bytes. ``put`` must honour ``protected`` (never evict those
    keys) and return what it evicted, or ``None`` — with nothing evicted — when
    the entry cannot fit. ``generation`` changes when the storage behind the
    tier is replaced by its owner (an engine re-creating its cache).
    """

    @property
    def capacity(self) -> int: ...

    @property
    def used(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...

    def items(self) -> list[tuple[ItemKey, torch.Tensor]]: ...

    def peek(self, key: ItemKey) -> torch.Tensor | None: ...

    def touch(self, key: ItemKey) -> None: ...

    def pop(self, key: ItemKey) -> torch.Tensor | None: ...

    def put(
        self, key: ItemKey, value: torch.Tensor, protected: Iterable[ItemKey] = ()
    ) -> list[tuple[ItemKey, torch.Tensor]] | None: ...

    def clear(self) -> None: ...


def _tier(capacity_bytes: int) -> LruTier[ItemKey, torch.Tensor]:
    return LruTier(capacity_bytes, tensor_bytes)


class EmbeddingCache:
    """Encoder outputs keyed by :class:`ItemKey`, bounded in bytes.

    :param capacity_bytes: bound of vitbatch's own device tier (entries as
        produced by the encoder, on whatever device it ran).
    :param host_capacity_bytes: bound of the host tier; 0 disables it. Evicted
        device entries move here (pinned when CUDA is available) and come back
        with a non-blocking copy on the next hit instead of being re-encoded.
    :param device_tier: an engine's cache seen as a :class:`DeviceTier`, used
        instead of a tier of vitbatch's own (then ``capacity_bytes`` must be 0:
        the engine's cache has its own bound). Only evictions made through this
        cache are demoted to the host tier; what the engine evicts itself is gone.
    """

    def __init__(
        self,
        capacity_bytes: int = 0,
        host_capacity_bytes: int = 0,
        *,
        device_tier: DeviceTier | None = None,
    ) -> None:
        if capacity_bytes < 0 or host_capacity_bytes < 0:
            raise ValueError("cache capacities must be >= 0")
        if device_tier is not None and capacity_bytes:
            raise ValueError(
                "EmbeddingCache: give capacity_bytes or device_tier, not both "
                "(a device_tier has its own bound)"
            )
        self._device: DeviceTier = device_tier if device_tier is not None else _tier(capacity_bytes)
        self._host = HostArena(host_capacity_bytes)
        self._generation = self._device.generation
        self._held: set[ItemKey] = set()
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
        self._follow_device_tier()
        return len(self._device) + len(self._host)

    def __contains__(self, key: ItemKey) -> bool:
        self._follow_device_tier()
        return key in self._device or key in self._host

    def peek_all(self) -> list[tuple[ItemKey, torch.Tensor]]:
        """Every entry of both tiers, without touching LRU order or statistics (checks, tests)."""
        self._follow_device_tier()
        host = [(key, self._host.peek(key)) for key in self._host.keys()]
        return [*self._device.items(), *host]  # type: ignore[list-item]

    def host_keys(self) -> list[ItemKey]:
        """Keys held only in the host tier (an adapter may advertise them)."""
        self._follow_device_tier()
        return self._host.keys()

    # -- step protection -----------------------------------------------------
    @contextmanager
    def hold(self, keys: Iterable[ItemKey]) -> Iterator[None]:
        """Protect ``keys`` from eviction for the duration of a step."""
        self._follow_device_tier()
        added = set(keys) - self._held
        self._held |= added
        try:
            yield
        finally:
            self._held -= added

    # -- lookups -------------------------------------------------------------
    def get(self, key: ItemKey) -> torch.Tensor | None:
        """The embedding for ``key``, refreshing its recency; ``None`` if absent.

        A host-tier hit is copied back to the device the entry came from (the
        host tier remembers it per entry) and, if it fits, promoted to the device tier.
        """
        self._follow_device_tier()
        tensor = self._device.peek(key)
        if tensor is not None:
            self._device.touch(key)
            self.stats.hits += 1
            return tensor
        tensor = self._host.restore(key)
        if tensor is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.host_hits += 1
        if self._store_device(key, tensor):
            self._host.discard(key)  # promoted; else kept for next time
        return tensor

    def put(self, key: ItemKey, tensor: torch.Tensor) -> bool:
        """Store ``tensor`` under ``key``. Returns whether it was stored."""
        self._follow_device_tier()
        if key in self._device:
            self._device.touch(key)
            return True
        self._host.discard(key)
        stored = self._store_device(key, tensor)
        if stored:
            self.stats.stored += 1
        else:
            self.stats.rejected += 1
        return stored

    def discard(self, key: ItemKey) -> bool:
        """Forget ``key`` in both tiers (an engine dropped it); whether it was there."""
        self._follow_device_tier()
        found = self._device.pop(key) is not None
        found = self._host.discard(key) or found
        return found

    def clear(self) -> None:
        self._device.clear()
        self._host.clear()

    # -- internals -----------------------------------------------------------
    def _follow_device_tier(self) -> None:
        """The device tier's storage was replaced: host entries demoted from the old
        one belong to it (an engine re-creates its cache on purpose: new weights,
        new bound), so they go too."""
        generation = self._device.generation
        if generation != self._generation:
            self._generation = generation
            self._host.clear()

    def _store_device(self, key: ItemKey, tensor: torch.Tensor) -> bool:
        evicted = self._device.put(key, tensor, self._held)
        if evicted is None:
            return False
        for victim_key, victim in evicted:
            self.stats.evictions += 1
            self._demote(victim_key, victim)
        return True

    def _demote(self, key: ItemKey, tensor: torch.Tensor) -> None:
        """Move an evicted device entry into the host tier, if it has room (its copy is
        enqueued off the step path, see :mod:`vitbatch.core.host_arena`)."""
        if self._host.capacity == 0:
            return
        evicted = self._host.put(key, tensor, self._held)
        if evicted is not None:
            self.stats.host_demotions += 1
            self.stats.host_evictions += len(evicted)
