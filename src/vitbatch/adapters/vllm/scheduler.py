"""Scheduler side: vLLM's encoder cache manager with vitbatch's host tier and prefetch.

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

Where the jobs live: the host-tier index and the moves it ships are
:class:`~.host_index.HostTierIndex` (a mixin of the manager); the switch that
puts the manager into vLLM's ``Scheduler`` is :mod:`.scheduler_patch`. This
module keeps vLLM's accounting (eviction noted for the host tier, restores
given device-cache room) and the prefetch hand-off. On vLLM 0.27+
``--ec-manager-config`` naming this class builds it directly through
:meth:`VitBatchEncoderCacheManager.create_manager`.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.host_index import HostTierIndex, SchedulerStats
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata
from vitbatch.adapters.vllm.options import VllmOptions, configured_options
from vitbatch.adapters.vllm.prefetch_plan import PrefetchPlanner, planner_for

EncoderCacheManager = surface.manager_base()
logger = logging.getLogger("vllm.vitbatch")

managers: weakref.WeakSet[VitBatchEncoderCacheManager] = weakref.WeakSet()


class VitBatchEncoderCacheManager(HostTierIndex, EncoderCacheManager):
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
        self._init_host_index(host_capacity_embeds, self.options.host_admission)
        self.stats = SchedulerStats()
        self._evicted_sizes: dict[str, int] = {}  # evicted this pass -> rows
        self._freed_seen = 0
        self._promised: tuple[str, int] | None = None  # (request id, rows can_allocate promised)
        self.prefetch = prefetch
        managers.add(self)

    def reset(self) -> None:
        super().reset()
        self._clear_host_index()
        if self.prefetch is not None:
            self.prefetch.reset()
        self._evicted_sizes.clear()
        self._freed_seen = 0
        self._promised = None

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
        if not revive and not self._host_holds(mm_hash, num_embeds):
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
            self._restoring(mm_hash)
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
        self._demote_freed(freed, self._evicted_sizes)
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
        return VitBatchStepMetadata(
            max_batch_patches=self.options.max_batch_patches,
            max_batch_items=self.options.max_batch_items,
            check_finite=self.options.check_finite,
            **self._take_tier_moves(),
            **prefetch,
        )
