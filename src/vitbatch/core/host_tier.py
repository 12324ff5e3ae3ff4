"""A bounded LRU map: the one tier structure behind every vitbatch cache.

Why one class: the embedding cache's device and host tiers, and an engine
adapter's index of what its workers keep in host memory (vLLM's scheduler
counts embedding rows, not bytes, and holds no tensors), all need the same
three things: least-recently-used order, a bound in some unit, and evictions
that the *caller* turns into demotions or drops. Only the unit differs, so it
is a parameter (``size_of``).

The host tier's storage of tensors is :mod:`vitbatch.core.host_arena`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class LruTier(Generic[K, V]):
    """Entries in least-recently-used order, bounded by ``capacity`` in ``size_of`` units.

    The tier never decides what an eviction means: :meth:`put` and
    :meth:`make_room` return the evicted entries and the caller demotes or
    drops them.

    :param capacity: bound, in the unit of ``size_of``; 0 holds nothing.
    :param size_of: an entry's size (bytes of a tensor, rows of an index entry...).
    """

    generation = 0
    """Never changes: this tier is never replaced underneath its owner (see ``DeviceTier``)."""

    def __init__(self, capacity: int, size_of: Callable[[V], int]) -> None:
        if capacity < 0:
            raise ValueError(f"tier capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.entries: OrderedDict[K, V] = OrderedDict()
        self._size_of = size_of

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def items(self) -> list[tuple[K, V]]:
        """Every entry, least recently used first, without touching the order."""
        return list(self.entries.items())

    def peek(self, key: K) -> V | None:
        """The entry without refreshing its recency."""
        return self.entries.get(key)

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used."""
        self.entries.move_to_end(key)

    def pop(self, key: K) -> V | None:
        value = self.entries.pop(key, None)
        if value is not None:
            self.used -= self._size_of(value)
        return value

    def make_room(self, size: int, protected: Iterable[K] = ()) -> list[tuple[K, V]] | None:
        """Evict least-recently-used unprotected entries until ``size`` more fits.

        :returns: the evicted entries, or ``None`` (and nothing evicted) if
            ``size`` cannot fit without touching ``protected`` entries.
        """
        if size > self.capacity:
            return None
        need = self.used + size - self.capacity
        if need <= 0:
            return []
        protected = set(protected)
        victims: list[K] = []
        freed = 0
        for key, value in self.entries.items():
            if key in protected:
                continue
            victims.append(key)
            freed += self._size_of(value)
            if freed >= need:
                break
        if freed < need:
            return None
        return [(key, self.pop(key)) for key in victims]  # type: ignore[misc]

    def put(self, key: K, value: V, protected: Iterable[K] = ()) -> list[tuple[K, V]] | None:
        """Store ``value`` as the most recent entry, evicting for room.

        :returns: the evicted entries, or ``None`` if it cannot fit (then the
            tier is unchanged, except that an older entry under ``key`` is gone).
        """
        self.pop(key)
        evicted = self.make_room(self._size_of(value), protected)
        if evicted is None:
            return None
        self.entries[key] = value
        self.used += self._size_of(value)
        return evicted

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


class SeenTwice(Generic[K]):
    """Which keys more than one asker asked for: an admission filter for a host tier.

    Why: demoting an entry costs a device-to-host copy and host memory, and pays
    off only if the entry is asked for again. On traffic whose images never
    return, admitting only keys already asked for twice makes no demotion at all.
    A key is remembered with its first asker (chunks and retries of one request
    ask again under the same asker); the least recently asked are forgotten
    beyond ``window`` keys (about 100 bytes each).
    """

    def __init__(self, window: int = 1 << 16) -> None:
        self.window = window
        self._first: OrderedDict[K, Hashable | None] = OrderedDict()  # None: asked twice

    def note(self, key: K, asker: Hashable) -> None:
        first = self._first.get(key, asker)
        if key in self._first:
            self._first.move_to_end(key)
        self._first[key] = None if first != asker else first
        if len(self._first) > self.window:
            self._first.popitem(last=False)

    def repeated(self, key: K) -> bool:
        return key in self._first and self._first[key] is None

    def clear(self) -> None:
        self._first.clear()
