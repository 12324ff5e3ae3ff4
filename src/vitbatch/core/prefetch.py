"""Encoder prefetch: which waiting requests' items to encode ahead of admission.

Under load, requests wait in the engine's queue for many steps with their images
already preprocessed, while the GPU runs memory-bound decode steps. Encoding their
items then, on a side stream, takes the encoder off the step that admits them
(TTFT) and off the decode steps batched with it (TPOT). What this module decides
is engine-agnostic and pure: *which* items, in what order, within which bounds.
Streams, pools and the engine's cache belong to the adapters.

Two rules keep it safe at tensor parallelism: the selection is a deterministic
function of the scheduler's queue (the same list on every rank), and every
prefetched key has owners (the waiting requests that asked for it), so a request
that leaves the queue without consuming its items releases them — nothing is
held for nobody.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from vitbatch.core.items import ItemKey


@dataclass(frozen=True)
class PrefetchLimits:
    """How far ahead of admission the encoder may run.

    :param max_requests: waiting requests looked at, in the engine's queue order
        (the ones admitted next; further back, a prefetch is likelier wasted).
    :param max_cost: encoder cost (``Item.cost`` units, patches) started per step:
        bounds the side stream's activations, which add to the step's peak.
    :param max_items: items started per step.
    :param max_pool_bytes: bytes of prefetched embeddings held at once, waiting to
        be consumed. Size it from what the engine left free after its KV cache.
    """

    max_requests: int = 4
    max_cost: int = 8192
    max_items: int = 16
    max_pool_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"PrefetchLimits.{f.name}: got {value!r}; expected an integer >= 1"
                )


@dataclass(frozen=True)
class Candidate:
    """One item of one waiting request that could be encoded now.

    ``payload`` is the adapter's handle on the item's inputs (untouched here).
    """

    request_id: Hashable
    key: ItemKey
    cost: int
    payload: Any = None


def select_prefetch(
    waiting: Iterable[Sequence[Candidate]],
    limits: PrefetchLimits,
    is_known: Callable[[ItemKey], bool],
    pool_bytes_free: int | None = None,
    row_bytes: int = 0,
) -> list[Candidate]:
    """The items to encode ahead, in queue order.

    :param waiting: one sequence per waiting request, in the engine's queue order.
    :param is_known: True for keys that need no encoding (cached, in a host tier,
        already prefetched or in flight).
    :param pool_bytes_free: room left in the adapter's pool (``None``: the limit's
        ``max_pool_bytes``); an item whose rows do not fit is not started.
    :param row_bytes: bytes of one embedding row (``num_tokens * row_bytes`` per item).

    Stops at the first item that does not fit the step's cost, item or pool room:
    the queue is admitted in order, so skipping ahead would prefetch for requests
    that run later while the next one is left to encode at admission. An item
    costlier than ``max_cost`` on its own is passed over (it is encoded at
    admission, in a call sized for it). Deterministic: the same queue gives the
    same list on every rank.
    """
    room = limits.max_pool_bytes if pool_bytes_free is None else pool_bytes_free
    picked: list[Candidate] = []
    seen: set[ItemKey] = set()
    cost = 0
    for index, request in enumerate(waiting):
        if index >= limits.max_requests:
            break
        for candidate in request:
            if candidate.key in seen or is_known(candidate.key):
                continue
            if candidate.cost > limits.max_cost:
                seen.add(candidate.key)
                continue
            nbytes = candidate.key.num_tokens * row_bytes
            if (
                cost + candidate.cost > limits.max_cost
                or len(picked) >= limits.max_items
                or nbytes > room
            ):
                return picked
            seen.add(candidate.key)
            picked.append(candidate)
            cost += candidate.cost
            room -= nbytes
    return picked


@dataclass
class PrefetchStats:
    """Cumulative counters (what the Prometheus exporter reports)."""

    prefetched: int = 0
    """items encoded ahead of admission (started)."""
    consumed: int = 0
    """prefetched items a request used when it was admitted."""
    wasted: int = 0
    """prefetched items dropped unused: every owner left the queue, or the pool evicted it."""
    cancelled: int = 0
    """prefetches that failed (out of memory, an encoder error): encoded at admission instead."""
    bytes_held: int = 0
    """bytes of prefetched embeddings waiting to be consumed, now."""


@dataclass
class PrefetchLedger:
    """Which prefetched key is held for which waiting requests.

    The adapter's pool mirrors it: an entry exists in the pool exactly while the
    ledger owns its key. One key can serve several requests (the same image in two
    prompts); it is consumed by the first admitted, and released when the last
    owner leaves without consuming it.
    """

    stats: PrefetchStats = field(default_factory=PrefetchStats)
    _owners: dict[ItemKey, set[Hashable]] = field(default_factory=dict)
    _keys_of: dict[Hashable, set[ItemKey]] = field(default_factory=dict)
    _bytes: dict[ItemKey, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._owners)

    def owns(self, key: ItemKey) -> bool:
        return key in self._owners

    def owners(self, key: ItemKey) -> frozenset[Hashable]:
        return frozenset(self._owners.get(key, ()))

    def keys(self) -> list[ItemKey]:
        return list(self._owners)

    def started(
        self, picked: Sequence[Candidate], nbytes: Mapping[ItemKey, int] | None = None
    ) -> None:
        """Record prefetches started for ``picked`` (a key already held gains owners)."""
        for candidate in picked:
            owners = self._owners.get(candidate.key)
            if owners is None:
                owners = self._owners[candidate.key] = set()
                size = (nbytes or {}).get(candidate.key, 0)
                self._bytes[candidate.key] = size
                self.stats.prefetched += 1
                self.stats.bytes_held += size
            owners.add(candidate.request_id)
            self._keys_of.setdefault(candidate.request_id, set()).add(candidate.key)

    def adopt(self, request_id: Hashable, key: ItemKey) -> None:
        """Another waiting request needs a key already held: it becomes an owner too."""
        if key in self._owners:
            self._owners[key].add(request_id)
            self._keys_of.setdefault(request_id, set()).add(key)

    def _forget(self, key: ItemKey) -> None:
        for request_id in self._owners.pop(key, ()):
            keys = self._keys_of.get(request_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys_of[request_id]
        self.stats.bytes_held -= self._bytes.pop(key, 0)

    def consumed(self, key: ItemKey) -> bool:
        """An admitted request used ``key``; False when it was not held."""
        if key not in self._owners:
            return False
        self._forget(key)
        self.stats.consumed += 1
        return True

    def cancelled(self, key: ItemKey) -> None:
        """The prefetch of ``key`` failed: forget it (it is encoded at admission)."""
        if key in self._owners:
            self._forget(key)
            self.stats.cancelled += 1

    def evicted(self, key: ItemKey) -> bool:
        """The pool dropped ``key`` before use; False when it was not held."""
        if key not in self._owners:
            return False
        self._forget(key)
        self.stats.wasted += 1
        return True

    def release_request(self, request_id: Hashable) -> list[ItemKey]:
        """``request_id`` left the queue (admitted, aborted, finished).

        Returns the keys no other owner holds, in a stable order: the adapter frees
        them from its pool; each counts as wasted. Call :meth:`consumed` first for
        the keys the request used.
        """
        freed: list[ItemKey] = []
        for key in sorted(self._keys_of.pop(request_id, ()), key=repr):
            owners = self._owners.get(key)
            if owners is None:
                continue
            owners.discard(request_id)
            if not owners:
                self._owners.pop(key)
                self.stats.bytes_held -= self._bytes.pop(key, 0)
                self.stats.wasted += 1
                freed.append(key)
        return freed
