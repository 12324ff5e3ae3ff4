"""Prometheus metrics of a :class:`~vitbatch.core.batcher.VitBatcher`, for operators.

SGLang and vLLM serve ``/metrics`` with ``prometheus_client``, in its
multiprocess mode: the process that runs the vision encoder (SGLang's scheduler,
vLLM's worker) is not the one that answers HTTP, so values cannot be read by a
collector at scrape time. They are *pushed* instead: after every step the
batcher's observer increments ordinary ``prometheus_client`` counters and
histograms, which in multiprocess mode land in ``PROMETHEUS_MULTIPROC_DIR`` and
appear on the engine's own endpoint next to its metrics.

Nothing here is required: without ``prometheus_client`` :func:`export_batcher`
returns ``False`` and vitbatch runs as before (``vitbatch bench --json`` too).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitbatch.core.stats import COST_BUCKETS, ITEM_BUCKETS, SECONDS_BUCKETS, StepStats

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher

LABELS = ("model_name", "engine", "tp_rank")
"""Every vitbatch metric carries these labels (vLLM's ``model_name``/``engine``,
SGLang's ``tp_rank``); an adapter leaves a label it does not know empty."""

# name -> (help, StepStats field it sums)
COUNTERS: dict[str, tuple[str, str]] = {
    "vitbatch_encoder_calls": ("Vision-encoder calls made by vitbatch", "encoder_calls"),
    "vitbatch_items": ("Multimodal items of the steps vitbatch served", "items"),
    "vitbatch_cache_hits": ("Items served from vitbatch's embedding cache", "hits"),
    "vitbatch_host_cache_hits": ("Cache hits restored from the pinned host tier", "host_hits"),
    "vitbatch_cache_misses": ("Distinct items that had to be encoded", "misses"),
    "vitbatch_deduplicated": ("Items encoded once for several requests of a step", "deduplicated"),
    "vitbatch_oom_splits": ("Encoder calls split in half after a device OOM", "oom_splits"),
    "vitbatch_d2h_copies_avoided": ("Releases needing no GPU-to-CPU copy", "d2h_copies_avoided"),
    "vitbatch_d2h_bytes_avoided": ("Bytes of GPU-to-CPU copies avoided", "d2h_bytes_avoided"),
}  # fmt: skip

_lock = threading.Lock()
_families: dict[str, Any] | None = None


def _make_families() -> dict[str, Any]:
    """The metric objects, once per process (prometheus_client refuses duplicates)."""
    from prometheus_client import Counter, Gauge, Histogram

    families: dict[str, Any] = {
        name: Counter(name, help_text, LABELS) for name, (help_text, _) in COUNTERS.items()
    }
    families["vitbatch_fallbacks"] = Counter(
        "vitbatch_fallbacks",
        "Steps served by the engine's own path because vitbatch failed or declined",
        (*LABELS, "reason"),
    )
    families["vitbatch_cost_per_call"] = Histogram(
        "vitbatch_cost_per_call",
        "Encoder cost units (patches before merging) per vision-encoder call",
        LABELS,
        buckets=COST_BUCKETS,
    )
    families["vitbatch_items_per_call"] = Histogram(
        "vitbatch_items_per_call", "Items per vision-encoder call", LABELS, buckets=ITEM_BUCKETS
    )
    families["vitbatch_encode_seconds"] = Histogram(
        "vitbatch_encode_seconds",
        "Host wall time of one vision-encoder call (launch time on an asynchronous device)",
        LABELS,
        buckets=SECONDS_BUCKETS,
    )
    families["vitbatch_cache_bytes"] = Gauge(
        "vitbatch_cache_bytes",
        "Bytes held by vitbatch's device embedding cache",
        LABELS,
        multiprocess_mode="livesum",
    )
    families["vitbatch_host_cache_bytes"] = Gauge(
        "vitbatch_host_cache_bytes",
        "Bytes held by vitbatch's pinned host tier",
        LABELS,
        multiprocess_mode="livesum",
    )
    return families


class PrometheusObserver:
    """Pushes each step's statistics into the process's metric families."""

    def __init__(self, families: dict[str, Any], labels: Mapping[str, str]) -> None:
        values = [str(labels.get(name, "")) for name in LABELS]
        unknown = sorted(set(labels) - set(LABELS))
        if unknown:
            raise ValueError(
                f"vitbatch metrics: unknown label(s) {unknown}; expected some of {LABELS}"
            )
        self._labels = values
        self._families = families
        self._counters = [
            (families[name].labels(*values), field) for name, (_, field) in COUNTERS.items()
        ]
        self._histograms = [
            (families["vitbatch_cost_per_call"].labels(*values), "cost_per_call"),
            (families["vitbatch_items_per_call"].labels(*values), "items_per_call"),
            (families["vitbatch_encode_seconds"].labels(*values), "seconds_per_call"),
        ]
        self._cache_bytes = families["vitbatch_cache_bytes"].labels(*values)
        self._host_bytes = families["vitbatch_host_cache_bytes"].labels(*values)

    def on_step(self, batcher: VitBatcher, stats: StepStats) -> None:
        for child, field in self._counters:
            value = getattr(stats, field)
            if value:
                child.inc(value)
        for child, field in self._histograms:
            for value in getattr(stats, field):
                child.observe(value)
        self._cache_bytes.set(batcher.cache.used_bytes)
        self._host_bytes.set(batcher.cache.host_used_bytes)

    def on_fallback(self, batcher: VitBatcher, reason: str) -> None:
        self._families["vitbatch_fallbacks"].labels(*self._labels, reason).inc()


def export_batcher(batcher: VitBatcher, labels: Mapping[str, str]) -> bool:
    """Export ``batcher``'s statistics as ``vitbatch_*`` Prometheus metrics.

    :param labels: values of :data:`LABELS` (e.g. ``{"model_name": ..., "tp_rank": "0"}``).
    :returns: ``False`` when ``prometheus_client`` is not installed (nothing exported).
    """
    global _families
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    with _lock:
        if _families is None:
            _families = _make_families()
        batcher.observers.append(PrometheusObserver(_families, labels))
    return True
