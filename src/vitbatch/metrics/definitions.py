"""What vitbatch exports, defined once: labels, metric names and help, and
:func:`values_of`, the one definition per fact that both ways of exporting
(:mod:`.push`, :mod:`.snapshot`) read.

Host-tier counters come from the tier that holds the rows
(:class:`HostTierCounts`): the core cache's host tier (SGLang) or the
adapter's own (vLLM's workers).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitbatch.core.stats import COST_BUCKETS, ITEM_BUCKETS, SECONDS_BUCKETS

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher
    from vitbatch.core.prefetch import PrefetchStats

logger = logging.getLogger("vitbatch.metrics")

#: Guards the process-wide state: the pushed metric families, the served collectors.
LOCK = threading.Lock()

LABELS = ("model_name", "engine", "tp_rank")
"""Every vitbatch metric carries these labels (vLLM's ``model_name`` and ``engine``
(the engine index), SGLang's ``tp_rank``); an adapter leaves a label it does not know empty."""

#: Where encoder processes write their snapshots (set by :func:`serve_engine_metrics`).
DIR_ENV = "VITBATCH_METRICS_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class HostTierCounts:
    """What a host tier did, counted by the tier that holds the rows (cumulative)."""

    hits: int = 0
    """entries restored to the device from host memory instead of being encoded."""
    demotions: int = 0
    """entries copied (or handed) into host memory when the device cache evicted them."""
    drops: int = 0
    """entries the host tier let go (evicted for room, or stale)."""
    entries: int = 0
    bytes: int = 0


HostTier = Callable[[], HostTierCounts]
Prefetch = Callable[[], "PrefetchStats"]
"""The adapter's prefetch ledger's counters (:class:`~vitbatch.core.prefetch.PrefetchStats`)."""

COUNTERS: dict[str, str] = {
    "vitbatch_encoder_calls": "Vision-encoder calls made by vitbatch",
    "vitbatch_items": "Multimodal items of the steps vitbatch served",
    "vitbatch_cache_hits": "Items served from vitbatch's caches (device or host tier) unencoded",
    "vitbatch_host_cache_hits": "Items restored from the pinned host tier instead of encoded",
    "vitbatch_host_cache_demotions": "Entries moved into the host tier on device-cache eviction",
    "vitbatch_host_cache_drops": "Entries the host tier dropped (evicted for room, or stale)",
    "vitbatch_cache_misses": "Distinct items that had to be encoded",
    "vitbatch_deduplicated": "Items encoded once for several requests of a step",
    "vitbatch_oom_splits": "Encoder calls split in half after a device OOM",
    "vitbatch_d2h_copies_avoided": "Releases needing no GPU-to-CPU copy",
    "vitbatch_d2h_bytes_avoided": "Bytes of GPU-to-CPU copies avoided",
    "vitbatch_prefetched": "Items of waiting requests the encoder prefetch started",
    "vitbatch_prefetch_consumed": "Prefetched items a request used when it was admitted",
    "vitbatch_prefetch_wasted": "Prefetched items dropped unused (request aborted, no room)",
    "vitbatch_prefetch_cancelled": "Prefetches that failed (OOM, encoder error): encoded later",
}  # fmt: skip
"""Counter name (``_total`` is added on the wire) -> help."""

GAUGES: dict[str, str] = {
    "vitbatch_cache_bytes": "Bytes held by vitbatch's own device embedding cache "
    "(0 under vLLM, whose encoder cache is vLLM's)",
    "vitbatch_host_cache_bytes": "Bytes held by vitbatch's pinned host tier",
    "vitbatch_host_cache_entries": "Entries held by vitbatch's pinned host tier",
    "vitbatch_prefetch_bytes": "Bytes of prefetched embeddings waiting for their request",
}

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...], str]] = {
    "vitbatch_cost_per_call": (
        "Encoder cost units (patches before merging) per vision-encoder call",
        COST_BUCKETS,
        "cost_per_call",
    ),
    "vitbatch_items_per_call": ("Items per vision-encoder call", ITEM_BUCKETS, "items_per_call"),
    "vitbatch_encode_seconds": (
        "Host wall time of one vision-encoder call (launch time on an asynchronous device)",
        SECONDS_BUCKETS,
        "seconds_per_call",
    ),
}
FALLBACKS = "vitbatch_fallbacks"
FALLBACKS_HELP = "Steps served by the engine's own path because vitbatch failed or declined"


def core_host_tier(batcher: VitBatcher) -> HostTier:
    """The host tier of the batcher's own cache (what SGLang's adapter uses)."""
    cache = batcher.cache

    def counts() -> HostTierCounts:
        return HostTierCounts(
            hits=cache.stats.host_hits,
            demotions=cache.stats.host_demotions,
            drops=cache.stats.host_evictions,
            entries=len(cache.host_keys()),
            bytes=cache.host_used_bytes,
        )

    return counts


def values_of(
    batcher: VitBatcher, host_tier: HostTier | None, prefetch: Prefetch | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """``(counters, gauges)``: the cumulative values of :data:`COUNTERS` and :data:`GAUGES`.

    ``host_tier`` ``None``: the batcher's cache holds the host tier (its hits are
    among the batcher's); otherwise the adapter's tier, whose hits are added.
    ``prefetch`` ``None``: no encoder prefetch (its counters stay 0).
    """
    totals = batcher.totals
    tier = (host_tier or core_host_tier(batcher))()
    hits = totals.hits if host_tier is None else totals.hits + tier.hits
    counters = {
        "vitbatch_encoder_calls": totals.encoder_calls,
        "vitbatch_items": totals.items,
        "vitbatch_cache_hits": hits,
        "vitbatch_host_cache_hits": tier.hits,
        "vitbatch_host_cache_demotions": tier.demotions,
        "vitbatch_host_cache_drops": tier.drops,
        "vitbatch_cache_misses": totals.misses,
        "vitbatch_deduplicated": totals.deduplicated,
        "vitbatch_oom_splits": totals.oom_splits,
        "vitbatch_d2h_copies_avoided": totals.d2h_copies_avoided,
        "vitbatch_d2h_bytes_avoided": totals.d2h_bytes_avoided,
    }
    ahead = prefetch() if prefetch is not None else None
    counters["vitbatch_prefetched"] = ahead.prefetched if ahead else 0
    counters["vitbatch_prefetch_consumed"] = ahead.consumed if ahead else 0
    counters["vitbatch_prefetch_wasted"] = ahead.wasted if ahead else 0
    counters["vitbatch_prefetch_cancelled"] = ahead.cancelled if ahead else 0
    gauges = {
        "vitbatch_cache_bytes": batcher.cache.used_bytes,
        "vitbatch_host_cache_bytes": tier.bytes,
        "vitbatch_host_cache_entries": tier.entries,
        "vitbatch_prefetch_bytes": ahead.bytes_held if ahead else 0,
    }
    return counters, gauges


def label_values(labels: Mapping[str, str]) -> list[str]:
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"vitbatch metrics: unknown label(s) {unknown}; expected some of {LABELS}")
    return [str(labels.get(name, "")) for name in LABELS]
