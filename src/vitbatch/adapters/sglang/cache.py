"""SGLang's own embedding cache as vitbatch's device tier: one cache, not two.

Why: SGLang reserves ``SGLANG_VLM_CACHE_SIZE_MB`` of GPU memory for
``mm_schedule.embedding_cache`` (a ``MultiModalStaticCache``) and fills it on
every step it serves itself (multi-run items, EVS, fallbacks). A second cache of
vitbatch's beside it would hold up to twice that reservation, would not see what
SGLang encoded (nor SGLang what vitbatch did), and would outlive
``init_mm_embedding_cache()``. :class:`SGLangDeviceTier` is a
:class:`vitbatch.core.cache.DeviceTier` over SGLang's cache instead:

- **Which cache**: the module global ``mm_schedule.embedding_cache``, read on every
  call and never kept (SGLang replaces the object in ``init_mm_embedding_cache``).
  A replaced cache bumps :attr:`generation`, and the core then drops its host
  tier, which held entries demoted from the old one.
- **Keys and values**: SGLang's per-item key (``item.hash``) and
  ``EmbeddingResult(embedding=[rows, hidden])``, exactly what SGLang's per-image
  path reads and writes, so a hit for one is a hit for the other. An entry
  whose row count differs from the key's is a miss; storing over it first frees
  it, as SGLang does with a token-count mismatch — unless the current step holds
  that entry (then the first writer stays, as with SGLang's no-overwrite
  ``set``). EVS results (another type) are never taken for vitbatch's.
- **Bound and eviction**: SGLang's ``max_size`` and its own size accounting
  (``_get_tensor_size``, which differs between releases). vitbatch evicts in
  SGLang's LRU order itself, skipping the keys the current step holds, and only
  then calls ``set``, so ``set`` never evicts (SGLang 0.5.19's ``set`` would
  empty the whole cache for an entry larger than the bound) and every eviction
  is seen and can be demoted to vitbatch's host tier. Entries SGLang evicts on
  steps it serves itself are dropped, not demoted: SGLang does not say which.
  An entry that cannot fit is not stored; the step keeps its own reference.
- **No cache** (``embedding_cache`` is ``None`` before SGLang initialises it):
  a tier of capacity 0 that stores nothing.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from vitbatch.adapters.sglang import surface
from vitbatch.core.cache import tensor_bytes
from vitbatch.core.host_tier import LruTier
from vitbatch.core.items import ItemKey


def _plain(hash_: int, entry: Any) -> tuple[ItemKey, torch.Tensor] | None:
    """A plain SGLang entry as vitbatch sees it, ``(ItemKey(hash, rows), [rows, hidden])``;
    ``None`` for anything else (absent, or an EVS result: another layout)."""
    embedding = surface.plain_embedding(entry)
    if embedding is None:
        return None
    tensor = embedding.reshape(-1, embedding.shape[-1])
    return ItemKey(hash_, tensor.shape[0]), tensor


class SGLangDeviceTier:
    """``mm_schedule.embedding_cache`` seen as a :class:`~vitbatch.core.cache.DeviceTier`."""

    def __init__(self) -> None:
        self._seen: weakref.ref[Any] | None = None  # never keeps an old cache alive
        self._generation = 0

    # -- which cache ---------------------------------------------------------
    @property
    def generation(self) -> int:
        """Bumped each time SGLang's module global names another cache object."""
        cache = surface.embedding_cache()
        seen = self._seen() if self._seen is not None else None
        if cache is not seen:
            self._seen = weakref.ref(cache) if cache is not None else None
            self._generation += 1
        return self._generation

    @property
    def capacity(self) -> int:
        cache = surface.embedding_cache()
        return surface.cache_capacity(cache) if cache is not None else 0

    @property
    def used(self) -> int:
        cache = surface.embedding_cache()
        return surface.cache_used(cache) if cache is not None else 0

    # -- lookups ---------------------------------------------------------------
    def _entry(self, key: ItemKey) -> torch.Tensor | None:
        """The usable embedding under ``key`` (no recency change), else ``None``."""
        cache = surface.embedding_cache()
        if cache is None:
            return None
        plain = _plain(key.hash, surface.cache_entries(cache).get(key.hash))
        return plain[1] if plain is not None and plain[0] == key else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, ItemKey) and self._entry(key) is not None

    def __len__(self) -> int:
        cache = surface.embedding_cache()
        return len(surface.cache_entries(cache)) if cache is not None else 0

    def items(self) -> list[tuple[ItemKey, torch.Tensor]]:
        """Every plain entry as ``(ItemKey(hash, rows), [rows, hidden])``, LRU first."""
        cache = surface.embedding_cache()
        if cache is None:
            return []
        plain = (_plain(hash_, entry) for hash_, entry in surface.cache_entries(cache).items())
        return [item for item in plain if item is not None]

    def peek(self, key: ItemKey) -> torch.Tensor | None:
        return self._entry(key)

    def touch(self, key: ItemKey) -> None:
        cache = surface.embedding_cache()
        if cache is not None:
            surface.cache_touch(cache, key.hash)

    def pop(self, key: ItemKey) -> torch.Tensor | None:
        tensor = self._entry(key)
        if tensor is not None:
            surface.cache_free(surface.embedding_cache(), key.hash)
        return tensor

    # -- stores ----------------------------------------------------------------
    def put(
        self, key: ItemKey, value: torch.Tensor, protected: Iterable[ItemKey] = ()
    ) -> list[tuple[ItemKey, torch.Tensor]] | None:
        """Store ``value`` under ``key.hash``, evicting unprotected entries in SGLang's
        LRU order; ``None`` (nothing evicted) when it cannot fit."""
        cache = surface.embedding_cache()
        if cache is None:
            return None
        if self._entry(key) is not None:
            surface.cache_touch(cache, key.hash)
            return []
        protected = set(protected)
        other = surface.cache_entries(cache).get(key.hash)
        if other is not None:  # another row count under the same hash, or EVS
            plain = _plain(key.hash, other)
            if plain is not None and plain[0] in protected:
                return None  # this step uses it (SGLang's set keeps the first writer too)
            surface.cache_free(cache, key.hash)  # stale: SGLang frees a mismatch the same way
        if value.untyped_storage().nbytes() > tensor_bytes(value):
            value = value.clone()  # a view would pin its whole base (and count differently)
        victims = self._victims(cache, surface.sglang_bytes(value), {k.hash for k in protected})
        if victims is None:
            return None
        evicted = []
        for hash_ in victims:
            plain = _plain(hash_, surface.cache_entries(cache)[hash_])
            surface.cache_free(cache, hash_)
            if plain is not None:
                evicted.append(plain)
        if not surface.cache_store(cache, key.hash, value):
            return None  # not expected (room was made); the step keeps its reference
        return evicted

    @staticmethod
    def _victims(cache: Any, size: int, protected: set[int]) -> list[int] | None:
        """Least recently used unprotected hashes whose room makes ``size`` fit: the core's
        :meth:`LruTier.make_room` over a snapshot of SGLang's order and accounting (the
        snapshot's pops are discarded; SGLang frees the victims itself)."""
        snapshot: LruTier[int, Any] = LruTier(surface.cache_capacity(cache), surface.entry_bytes)
        snapshot.entries = OrderedDict(surface.cache_entries(cache))
        snapshot.used = surface.cache_used(cache)
        evicted = snapshot.make_room(size, protected)
        return None if evicted is None else [hash_ for hash_, _ in evicted]

    def clear(self) -> None:
        cache = surface.embedding_cache()
        if cache is not None:
            surface.cache_clear(cache)
