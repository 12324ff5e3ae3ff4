"""Scheduler side: the index of the workers' host tiers, and the moves it ships.

vLLM forgets an entry it evicts from its encoder cache; vitbatch's workers keep
it in (pinned) host memory instead. The scheduler has to know what they hold -
a later request for the same image then counts as cached, costs no encoder
budget and is restored by a host-to-device copy - so it keeps this index
(mm hash -> embedding rows, LRU, bounded in rows) and decides every move:
demote, restore, drop. The moves ride on the step's
:class:`~.metadata.VitBatchStepMetadata`, so every tensor-parallel rank's host
tier (:mod:`.worker_host_tier`) mirrors the index exactly.

:class:`HostTierIndex` is a mixin of
:class:`~.scheduler.VitBatchEncoderCacheManager` rather than a member, so that
the index stays the manager's ``host`` (what tests and ``stats()`` read) while
the bookkeeping lives here, apart from vLLM's accounting. It touches no vLLM
name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vitbatch.core.host_tier import LruTier, SeenTwice


@dataclass
class SchedulerStats:
    """Cumulative counters of the scheduler-side manager."""

    cache_hits: int = 0
    """check_and_update_cache answered True from vLLM's device cache (an embedding
    another request, or an earlier chunk, already computed)."""
    host_restores: int = 0
    """host-tier entries counted as cached and scheduled for a host-to-device copy."""
    revived: int = 0
    """entries evicted earlier in the same scheduling pass and taken back (no copy at all)."""
    demotions: int = 0
    host_drops: int = 0
    restores_refused: int = 0
    """host-tier hits that could not get device-cache room (encoded instead)."""
    prefetch_hits: int = 0
    """inputs counted as cached because a prefetch holds them (no encoder budget)."""
    not_admitted: int = 0
    """evicted entries left out of the host tier by ``host_admission="repeated"``
    (asked for by one request only)."""


class HostTierIndex:
    """The host-tier index of the manager and this step's moves (restore, demote, drop, reset)."""

    stats: SchedulerStats

    def _init_host_index(self, capacity_embeds: int, host_admission: str) -> None:
        # What the workers' host tiers hold: mm hash -> embedding rows, LRU, bounded in rows.
        self.host: LruTier[str, int] = LruTier(capacity_embeds, int)
        self._restore: list[str] = []
        self._demote: list[str] = []
        self._drop: list[str] = []
        self._reset = False
        # host_admission="repeated": which images more than one request asked for.
        self._seen: SeenTwice[str] | None = SeenTwice() if host_admission == "repeated" else None

    def _clear_host_index(self) -> None:
        """vLLM reset its cache: forget everything, and tell the workers to clear theirs."""
        self.host.clear()
        self._restore, self._demote, self._drop = [], [], []
        self._reset = True
        if self._seen is not None:
            self._seen.clear()

    def _host_holds(self, mm_hash: str, num_embeds: int) -> bool:
        """Whether the host tier holds ``mm_hash`` with ``num_embeds`` rows.

        Same identifier, other row count (a reused client UUID): the host copy
        is stale; it is forgotten (and dropped on the workers) so it is never
        restored.
        """
        host_rows = self.host.peek(mm_hash)
        if host_rows is None:
            return False
        if host_rows != num_embeds:
            self.host.pop(mm_hash)
            self._drop.append(mm_hash)
            self.stats.host_drops += 1
            return False
        return True

    def _restoring(self, mm_hash: str) -> None:
        """``mm_hash`` is cached again: it leaves the index for a host-to-device copy."""
        self.host.pop(mm_hash)
        self._restore.append(mm_hash)
        self.stats.host_restores += 1

    def _demote_freed(self, freed: Iterable[str], evicted_sizes: Mapping[str, int]) -> None:
        """Index the entries vLLM frees this step (rows known from ``evicted_sizes``).

        Those the index cannot hold stay out (vLLM's workers drop them, as
        without vitbatch); entries the index evicts for room are dropped on the
        workers, unless demoted in this same step (then never sent at all).
        """
        demoted: list[str] = []
        for mm_hash in freed:
            rows = evicted_sizes.get(mm_hash)
            if rows is None:
                continue
            if self._seen is not None and not self._seen.repeated(mm_hash):
                self.stats.not_admitted += 1  # vLLM's workers drop it, as without vitbatch
                continue
            evicted = self.host.put(mm_hash, rows)
            for victim, _ in evicted or ():
                if victim in demoted:
                    demoted.remove(victim)
                else:
                    self._drop.append(victim)
                self.stats.host_drops += 1
            if evicted is not None:
                demoted.append(mm_hash)
        self._demote.extend(demoted)
        self.stats.demotions += len(demoted)

    def _take_tier_moves(self) -> dict[str, Any]:
        """This step's moves, as :class:`~.metadata.VitBatchStepMetadata` fields; cleared."""
        moves = {
            "restore": tuple(self._restore),
            "demote": tuple(self._demote),
            "drop": tuple(self._drop),
            "reset": self._reset,
            "host_capacity_embeds": self.host.capacity,
        }
        self._restore, self._demote, self._drop = [], [], []
        self._reset = False
        return moves
