"""Scheduler side: vLLM's encoder cache manager plus vitbatch's host tier, and the switch.

:class:`VitBatchEncoderCacheManager` subclasses vLLM's ``EncoderCacheManager``.
vLLM's own accounting stays in charge of the device cache. On top of it the
manager keeps an index of a *host tier*: when vLLM evicts an entry, the workers
keep it in (pinned) host memory instead of dropping it, and a later request for
the same image counts as cached - it costs no encoder budget and is restored by
a host-to-device copy. The scheduler decides every move (demote, restore, drop)
and ships them in :class:`~.metadata.VitBatchStepMetadata`, so the workers'
host tiers mirror the index exactly, on every tensor-parallel rank.

With the ``prefetch`` option the manager also owns a
:class:`~.prefetch_plan.PrefetchPlanner`: items of waiting requests are encoded
ahead on the workers, and at admission count as cached the same way.

With vLLM's own EC connector configured (``--ec-transfer-config``, e.g.
``ECCPUConnector``), the host tier steps aside (one log line): the connector
already keeps evicted encoder outputs, and two host tiers for one encoder cache
would hold the same rows twice and evict each other's. Batching stays on.

How the manager gets in: :func:`install_scheduler_patch` (run by the entry
point in every vLLM process) wraps ``Scheduler.__init__``; when the scheduler's
config switches vitbatch on (:func:`~.options.configured_options`) and the
engine surface is complete, the wrapper swaps vLLM's manager for this one. It
wraps ``Scheduler.schedule`` to attach the step's metadata where vLLM does not
ask for it itself (0.26). On vLLM 0.27+ ``--ec-manager-config`` naming this
class builds it directly through :meth:`create_manager`.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata, attach
from vitbatch.adapters.vllm.options import VllmOptions, configured_options
from vitbatch.adapters.vllm.prefetch_plan import PrefetchPlanner, planner_for
from vitbatch.core.host_tier import LruTier, SeenTwice

EncoderCacheManager = surface.manager_base()
logger = logging.getLogger("vllm.vitbatch")

managers: weakref.WeakSet[VitBatchEncoderCacheManager] = weakref.WeakSet()


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


class VitBatchEncoderCacheManager(EncoderCacheManager):
    """vLLM's ``EncoderCacheManager`` plus vitbatch's host tier and per-step worker metadata."""

    @classmethod
    def create_manager(
        cls, *, cache_size: int, vllm_config: Any, options: VllmOptions | None = None
    ) -> Any:
        """The manager for ``vllm_config`` (vLLM 0.27+ calls it for ``--ec-manager-config``).

        Encoder-decoder models keep vLLM's own manager: vLLM does not cache their
        encoder outputs, so there is nothing for a host tier to keep.
        """
        if options is None:
            options = configured_options(vllm_config) or VllmOptions()
        if surface.is_encoder_decoder(vllm_config):
            logger.warning(
                "vitbatch: encoder-decoder model; using vLLM's own encoder cache manager"
            )
            return surface.encoder_decoder_manager(cache_size)
        from vitbatch.adapters.vllm.worker import install_worker_patches

        install_worker_patches()  # in-process executors: this process runs the model too
        host_capacity = options.host_capacity_embeds(surface.bytes_per_embed(vllm_config))
        connector = surface.ec_connector_name(vllm_config)
        if connector is not None and host_capacity:
            # vLLM's own connector keeps (or ships) evicted encoder outputs: a second
            # host tier would hold the same rows twice and fight it over eviction.
            logger.info(
                "vitbatch: vLLM's EC connector %s is configured (--ec-transfer-config); "
                "vitbatch's host tier steps aside (vitbatch still batches encoder calls)",
                connector,
            )
            host_capacity = 0
        prefetch = planner_for(options, vllm_config, connector)
        logger.info(
            "vitbatch: encoder cache manager on "
            "(device cache %d embeddings, host tier %d embeddings, %s, prefetch %s)",
            cache_size,
            host_capacity,
            options.budget,
            prefetch.limits if prefetch is not None else "off",
        )
        return cls(
            cache_size=cache_size,
            options=options,
            host_capacity_embeds=host_capacity,
            prefetch=prefetch,
        )

    def __init__(
        self,
        cache_size: int,
        options: VllmOptions | None = None,
        host_capacity_embeds: int = 0,
        prefetch: PrefetchPlanner | None = None,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.options = options or VllmOptions()
        # What the workers' host tiers hold: mm hash -> embedding rows, LRU, bounded in rows.
        self.host: LruTier[str, int] = LruTier(host_capacity_embeds, int)
        self.stats = SchedulerStats()
        self._evicted_sizes: dict[str, int] = {}  # evicted this pass -> rows
        self._freed_seen = 0
        self._promised: tuple[str, int] | None = None  # (request id, rows can_allocate promised)
        self._restore: list[str] = []
        self._demote: list[str] = []
        self._drop: list[str] = []
        self._reset = False
        self.prefetch = prefetch
        # host_admission="repeated": which images more than one request asked for.
        self._seen: SeenTwice[str] | None = (
            SeenTwice() if self.options.host_admission == "repeated" else None
        )
        managers.add(self)

    def reset(self) -> None:
        super().reset()
        self.host.clear()
        if self.prefetch is not None:
            self.prefetch.reset()
        self._evicted_sizes.clear()
        self._freed_seen = 0
        self._promised = None
        self._restore, self._demote, self._drop = [], [], []
        self._reset = True
        if self._seen is not None:
            self._seen.clear()

    def _evicting(self, wanted: int, evict: Callable[[], bool]) -> bool:
        """Run vLLM's eviction (``evict``: its ``can_allocate``), noting the rows it evicts.

        vLLM forgets an evicted entry's rows; the host tier needs them, so the
        unreferenced entries are read before, the evicted hashes after.
        """
        sizes = surface.rows_to_evict_from(self, wanted)
        ok = evict()
        freed = surface.evicted(self)
        for mm_hash in freed[self._freed_seen :]:
            if mm_hash in sizes:
                self._evicted_sizes[mm_hash] = sizes[mm_hash]
        self._freed_seen = len(freed)
        return ok

    def can_allocate(
        self,
        request: Any,
        input_id: int,
        encoder_compute_budget: int,
        num_embeds_to_schedule: int,
    ) -> bool:
        wanted = request.get_num_encoder_embeds(input_id) + num_embeds_to_schedule
        ok = self._evicting(
            wanted,
            lambda: super(VitBatchEncoderCacheManager, self).can_allocate(
                request, input_id, encoder_compute_budget, num_embeds_to_schedule
            ),
        )
        if ok:
            self._promised = (request.request_id, wanted)
        return ok

    def allocate(self, request: Any, input_id: int) -> None:
        super().allocate(request, input_id)
        self._promised = None

    def check_and_update_cache(self, request: Any, input_id: int) -> bool:
        if self._seen is not None:
            self._seen.note(surface.request_input(request, input_id)[0], request.request_id)
        if super().check_and_update_cache(request, input_id):
            self.stats.cache_hits += 1
            if self.prefetch is not None:  # a prefetched twin is not needed any more
                self.prefetch.drop(surface.request_input(request, input_id)[0])
            return True
        mm_hash, num_embeds = surface.request_input(request, input_id)
        if self.prefetch is not None and self.prefetch.holds(mm_hash, num_embeds):
            return self._take_prefetched(request, input_id, mm_hash, num_embeds)
        revive = self._evicted_sizes.get(mm_hash) == num_embeds
        if not revive:
            host_rows = self.host.peek(mm_hash)
            if host_rows is None:
                return False
            if host_rows != num_embeds:
                # Same identifier, other row count (a reused client UUID): the
                # host copy is stale; forget it so it is never restored.
                self.host.pop(mm_hash)
                self._drop.append(mm_hash)
                self.stats.host_drops += 1
                return False
        if not self._make_room(request, input_id, num_embeds):
            self.stats.restores_refused += 1
            return False
        # vLLM's own allocate() (ours would drop the promise): the entry is
        # cached now; nothing will be encoded for it, so no compute budget.
        super().allocate(request, input_id)
        if revive:
            # The worker still holds it; get_freed_mm_hashes() drops re-cached
            # hashes from the free list.
            del self._evicted_sizes[mm_hash]
            self.stats.revived += 1
        else:
            self.host.pop(mm_hash)
            self._restore.append(mm_hash)
            self.stats.host_restores += 1
        return True

    def _take_prefetched(self, request: Any, input_id: int, mm_hash: str, num_embeds: int) -> bool:
        """A prefetch holds this input: cached, if vLLM's cache has room (else encoded)."""
        assert self.prefetch is not None
        if not self._make_room(request, input_id, num_embeds):
            self.stats.restores_refused += 1
            return False
        super().allocate(request, input_id)  # no compute budget: nothing to encode
        self.prefetch.consume(mm_hash, num_embeds)
        self.stats.prefetch_hits += 1
        return True

    def free(self, request: Any) -> None:
        super().free(request)
        # vLLM also frees a waiting request it could not schedule after all; only a
        # request that left for good gives its prefetched items up.
        if self.prefetch is not None and surface.request_finished(request):
            self.prefetch.release_request(surface.request_id(request))

    def _make_room(self, request: Any, input_id: int, num_embeds: int) -> bool:
        """Free device-cache rows for a restore: vLLM's can_allocate() with no compute budget.

        Rows that can_allocate() already promised to this request's earlier
        inputs (allocated only after the request is scheduled) stay reserved.
        """
        promised = (
            self._promised[1] if self._promised and self._promised[0] == request.request_id else 0
        )
        return self._evicting(
            num_embeds + promised,
            lambda: super(VitBatchEncoderCacheManager, self).can_allocate(
                request, input_id, sys.maxsize, promised
            ),
        )

    def bind(self, scheduler: Any) -> None:
        """Let prefetch read ``scheduler``'s waiting queue (a no-op with prefetch off)."""
        if self.prefetch is not None:
            self.prefetch.bind(scheduler)

    def get_freed_mm_hashes(self) -> list[str]:
        # vLLM 0.27+ already leaves out hashes cached again in this pass; 0.26
        # does not, and freeing a revived entry would lose what the step needs.
        freed = [h for h in super().get_freed_mm_hashes() if not surface.is_cached(self, h)]
        demoted: list[str] = []
        for mm_hash in freed:
            rows = self._evicted_sizes.get(mm_hash)
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
        self._evicted_sizes.clear()
        self._freed_seen = 0
        self._promised = None
        return freed

    def get_manager_metadata(self) -> VitBatchStepMetadata:
        prefetch: dict[str, Any] = {}
        if self.prefetch is not None:
            if self.prefetch.bound:
                self.prefetch.plan(lambda h: surface.is_cached(self, h) or h in self.host)
            orders, consume, release = self.prefetch.take_messages()
            prefetch = {
                "prefetch": orders,
                "prefetch_consume": consume,
                "prefetch_release": release,
                "prefetch_pool_bytes": self.prefetch.limits.max_pool_bytes,
            }
        metadata = VitBatchStepMetadata(
            restore=tuple(self._restore),
            demote=tuple(self._demote),
            drop=tuple(self._drop),
            reset=self._reset,
            max_batch_patches=self.options.max_batch_patches,
            max_batch_items=self.options.max_batch_items,
            check_finite=self.options.check_finite,
            host_capacity_embeds=self.host.capacity,
            **prefetch,
        )
        self._restore, self._demote, self._drop = [], [], []
        self._reset = False
        return metadata


# ---------------------------------------------------------------------------
# The switch: vLLM's Scheduler takes this manager when its config says so
# ---------------------------------------------------------------------------


def enable_on(scheduler: Any) -> bool:
    """Swap ``scheduler``'s encoder cache manager for vitbatch's if its config asks for it.

    :raises ValueError: vitbatch's options are set to something invalid (vLLM
        then fails to start, with a message naming the option).
    :returns: whether vitbatch's manager is in charge now.
    """
    vllm_config = surface.scheduler_config(scheduler)
    options = configured_options(vllm_config)
    current = surface.scheduler_manager(scheduler)
    if options is None or isinstance(current, VitBatchEncoderCacheManager):
        if isinstance(current, VitBatchEncoderCacheManager):
            current.bind(scheduler)  # built by vLLM from --ec-manager-config
        return isinstance(current, VitBatchEncoderCacheManager)
    report = surface.check()
    if not report.ok("scheduler"):
        logger.warning("vitbatch: off, vLLM runs unchanged: %s", report.describe("scheduler"))
        return False
    if not (report.ok("runner_v1") or report.ok("runner_v2")):
        logger.warning(
            "vitbatch: off, vLLM runs unchanged: %s; %s",
            report.describe("runner_v1"),
            report.describe("runner_v2"),
        )
        return False
    if type(current) is not EncoderCacheManager:
        logger.warning(
            "vitbatch: off: vLLM's scheduler uses %s, not its EncoderCacheManager "
            "(encoder-decoder model, or another plugin's manager)",
            type(current).__name__,
        )
        return False
    manager = VitBatchEncoderCacheManager.create_manager(
        cache_size=surface.cache_size(current), vllm_config=vllm_config, options=options
    )
    surface.set_scheduler_manager(scheduler, manager)
    if isinstance(manager, VitBatchEncoderCacheManager):
        manager.bind(scheduler)
    return isinstance(manager, VitBatchEncoderCacheManager)


def _wrapped_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        enable_on(self)

    return __init__


def _wrapped_schedule(original: Callable[..., Any]) -> Callable[..., Any]:
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        manager = surface.scheduler_manager(self)
        if isinstance(manager, VitBatchEncoderCacheManager) and not isinstance(
            surface.carried_metadata(output), VitBatchStepMetadata
        ):
            attach(output, manager.get_manager_metadata())  # vLLM 0.26: no field for it
        return output

    return schedule


_PATCHES = (
    (surface.SCHEDULER_INIT, _wrapped_init),
    (surface.SCHEDULER_SCHEDULE, _wrapped_schedule),
)


def install_scheduler_patch() -> bool:
    """Wrap ``Scheduler`` so that its config can switch vitbatch on. Idempotent.

    Without vitbatch in the config the wrappers only call vLLM's methods
    (``schedule`` adds one isinstance check per step).
    """
    if not surface.check().ok("scheduler"):
        return False
    for point, factory in _PATCHES:
        surface.wrap(point, factory)
    return True
