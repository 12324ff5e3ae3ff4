"""Scheduler side of encoder prefetch: which waiting requests' images the workers encode now.

Each step, after vLLM's scheduling pass, :class:`PrefetchPlanner` looks at the
first waiting requests (vLLM's own queue order) and picks items nobody holds yet
(:func:`~vitbatch.core.prefetch.select_prefetch`: not in vLLM's encoder cache,
not in the host tier, not prefetched already; bounded in requests, cost, items
and pool bytes). The picked items travel to every worker as
:class:`~.metadata.PrefetchOrder` with the step's metadata, inputs included
(the workers see a request's inputs only once it is scheduled).

A :class:`~vitbatch.core.prefetch.PrefetchLedger` records which waiting request
each prefetched item is held for. When one of them is admitted, the manager
counts the item as cached (no encoder budget, like a host-tier restore) and
ships a *consume*; when the last owner leaves unserved (aborted, finished), a
*release*. The workers' pools mirror the ledger; a worker that lacks a consumed
item (its prefetch failed) encodes it at admission, so the count is never wrong.

Engine-free apart from :mod:`.surface`; the manager (:mod:`.scheduler`) owns
one planner when the ``prefetch`` option is on.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import PrefetchOrder
from vitbatch.adapters.vllm.options import VllmOptions
from vitbatch.adapters.vllm.worker_items import item_cost
from vitbatch.core import ItemKey
from vitbatch.core.prefetch import Candidate, PrefetchLedger, PrefetchLimits, select_prefetch

logger = logging.getLogger("vllm.vitbatch")

#: Modalities prefetched: images (a video's embeddings can be pruned per request,
#: EVS; audio towers are cheap). Others are encoded at admission as before.
MODALITIES = frozenset({"image"})


class PrefetchPlanner:
    """The scheduler's prefetch state: the ledger and this step's messages to the workers.

    :param limits: the look-ahead bounds (from the options).
    :param row_bytes: bytes of one embedding row (the LLM's hidden size in its dtype),
        to bound the workers' pools.
    """

    def __init__(self, limits: PrefetchLimits, row_bytes: int) -> None:
        self.limits = limits
        self.row_bytes = max(1, row_bytes)
        self.ledger = PrefetchLedger()
        self._held: dict[str, ItemKey] = {}  # mm hash -> the key held (the pool is by hash)
        self._scheduler: Callable[[], Any] | None = None
        self._orders: list[PrefetchOrder] = []
        self._consume: list[str] = []
        self._release: list[str] = []

    def bind(self, scheduler: Any) -> None:
        """Read waiting requests from ``scheduler`` (weakly: the scheduler owns the manager)."""
        try:
            self._scheduler = weakref.ref(scheduler)
        except TypeError:  # an object without weak references (a test's stand-in)
            self._scheduler = lambda: scheduler

    @property
    def bound(self) -> bool:
        return self._scheduler is not None and self._scheduler() is not None

    # -- admission ------------------------------------------------------------

    def holds(self, mm_hash: str, num_embeds: int) -> bool:
        """Whether a prefetched copy of this input (same rows) is held for someone."""
        return self.ledger.owns(ItemKey(mm_hash, num_embeds))

    def consume(self, mm_hash: str, num_embeds: int) -> None:
        """An admitted request counts the held item as cached: the workers hand it to vLLM."""
        if self.ledger.consumed(ItemKey(mm_hash, num_embeds)):
            self._held.pop(mm_hash, None)
            self._consume.append(mm_hash)

    def drop(self, mm_hash: str) -> None:
        """The held item is not needed (vLLM's cache has it by now): free it everywhere."""
        key = self._held.pop(mm_hash, None)
        if key is not None and self.ledger.evicted(key):
            self._release.append(mm_hash)

    def release_request(self, request_id: str) -> None:
        """A request left for good (finished, aborted): what it alone held is freed."""
        for key in self.ledger.release_request(request_id):
            self._held.pop(str(key.hash), None)
            self._release.append(str(key.hash))

    def reset(self) -> None:
        """vLLM reset its encoder cache; the workers clear their pools on the same step."""
        self.ledger = PrefetchLedger(stats=self.ledger.stats)
        self.ledger.stats.bytes_held = 0
        self._held.clear()
        self._orders, self._consume, self._release = [], [], []

    # -- each step ------------------------------------------------------------

    def _candidates(self, request: Any) -> list[Candidate]:
        request_id = surface.request_id(request)
        found = []
        for mm_hash, modality, num_embeds, data in surface.prefetch_inputs(request):
            if modality not in MODALITIES:
                continue
            key = ItemKey(mm_hash, num_embeds)
            if self.ledger.owns(key):
                self.ledger.adopt(request_id, key)  # held for another waiting request too
            order = PrefetchOrder(mm_hash, modality, num_embeds, item_cost(data, num_embeds), data)
            found.append(Candidate(request_id, key, order.cost, order))
        return found

    def _waiting(self) -> Iterator[list[Candidate]]:
        scheduler = self._scheduler() if self._scheduler is not None else None
        if scheduler is None:
            return
        for request in surface.waiting_requests(scheduler):
            if not surface.request_finished(request):
                yield self._candidates(request)

    def plan(self, is_known: Callable[[str], bool]) -> None:
        """Pick this step's prefetches (``is_known``: the hash is cached or in the host tier)."""

        def known(key: ItemKey) -> bool:
            return str(key.hash) in self._held or is_known(str(key.hash))

        free = self.limits.max_pool_bytes - self.ledger.stats.bytes_held
        picked = select_prefetch(self._waiting(), self.limits, known, free, self.row_bytes)
        if not picked:
            return
        self.ledger.started(picked, {c.key: c.key.num_tokens * self.row_bytes for c in picked})
        for candidate in picked:
            self._held[str(candidate.key.hash)] = candidate.key
            self._orders.append(candidate.payload)

    def take_messages(self) -> tuple[tuple[PrefetchOrder, ...], tuple[str, ...], tuple[str, ...]]:
        """``(orders, consumes, releases)`` for this step's metadata (then forgotten)."""
        messages = (tuple(self._orders), tuple(self._consume), tuple(self._release))
        self._orders, self._consume, self._release = [], [], []
        return messages


def planner_for(
    options: VllmOptions, vllm_config: Any, connector: str | None
) -> PrefetchPlanner | None:
    """The planner when the options ask for prefetch and nothing rules it out (logged)."""
    limits = options.prefetch_limits
    if limits is None:
        return None
    reason = None
    if connector is not None:
        reason = f"vLLM's EC connector {connector} handles encoder outputs"
    elif surface.lora_configured(vllm_config):
        reason = "LoRA is on (a tower adapter needs the request's mapping)"
    if reason is not None:
        logger.warning("vitbatch: prefetch stays off: %s", reason)
        return None
    return PrefetchPlanner(limits, surface.bytes_per_embed(vllm_config))
