"""Prometheus metrics of a :class:`~vitbatch.core.batcher.VitBatcher`, for operators.

The process that runs the vision encoder (SGLang's scheduler, vLLM's engine
core or worker) is not the one that answers ``/metrics``, so the values travel
one of two ways, decided in the encoder's process by :func:`export_batcher`:

* **push** (``PROMETHEUS_MULTIPROC_DIR`` set before the engine started, as
  SGLang's launcher and vLLM's ``--api-server-count > 1`` set it): ordinary
  ``prometheus_client`` counters, which in multiprocess mode land in that
  directory and appear on the engine's own endpoint next to its metrics.
* **snapshot** (:data:`DIR_ENV` set, by :func:`serve_engine_metrics` in the
  process that answers ``/metrics``, when it serves a single-process registry,
  vLLM's default): each encoder process writes its cumulative values to a small
  JSON file in that directory after each step; a collector registered in the
  serving process's default registry reads them at scrape time.

One definition per fact (:func:`values_of`) feeds both. Host-tier counters come
from the tier that holds the rows (:class:`HostTierCounts`): the core cache's
host tier (SGLang) or the adapter's own (vLLM's workers).

Nothing here is required: without ``prometheus_client`` :func:`export_batcher`
returns ``False`` and vitbatch runs as before (``vitbatch bench --json`` too).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any

from vitbatch.core.stats import COST_BUCKETS, ITEM_BUCKETS, SECONDS_BUCKETS, StepStats

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher
    from vitbatch.core.prefetch import PrefetchStats

logger = logging.getLogger("vitbatch.metrics")

LABELS = ("model_name", "engine", "tp_rank")
"""Every vitbatch metric carries these labels (vLLM's ``model_name`` and ``engine``
(the engine index), SGLang's ``tp_rank``); an adapter leaves a label it does not know empty."""

#: Where encoder processes write their snapshots (set by :func:`serve_engine_metrics`).
DIR_ENV = "VITBATCH_METRICS_DIR"
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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


def _label_values(labels: Mapping[str, str]) -> list[str]:
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"vitbatch metrics: unknown label(s) {unknown}; expected some of {LABELS}")
    return [str(labels.get(name, "")) for name in LABELS]


# -- push: prometheus_client's own metrics --------------------------------------

_lock = threading.Lock()
_families: dict[str, Any] | None = None


def _make_families() -> dict[str, Any]:
    """The metric objects, once per process (prometheus_client refuses duplicates)."""
    from prometheus_client import Counter, Gauge, Histogram

    families: dict[str, Any] = {n: Counter(n, text, LABELS) for n, text in COUNTERS.items()}
    families[FALLBACKS] = Counter(FALLBACKS, FALLBACKS_HELP, (*LABELS, "reason"))
    for name, (text, bounds, _) in HISTOGRAMS.items():
        families[name] = Histogram(name, text, LABELS, buckets=bounds)
    for name, text in GAUGES.items():
        families[name] = Gauge(name, text, LABELS, multiprocess_mode="livesum")
    return families


class PrometheusObserver:
    """Pushes each step's statistics into the process's metric families."""

    def __init__(
        self,
        families: dict[str, Any],
        labels: Mapping[str, str],
        host_tier: HostTier | None,
        prefetch: Prefetch | None = None,
    ) -> None:
        self._labels = _label_values(labels)
        self._families = families
        self._host_tier = host_tier
        self._prefetch = prefetch
        self._children = {name: families[name].labels(*self._labels) for name in COUNTERS}
        self._gauges = {name: families[name].labels(*self._labels) for name in GAUGES}
        self._histograms = [
            (families[name].labels(*self._labels), field)
            for name, (_, _, field) in HISTOGRAMS.items()
        ]
        self._sent: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._sync_lock = threading.Lock()

    def sync(self, batcher: VitBatcher) -> None:
        """Bring the counters and gauges up to the batcher's (and tier's) totals."""
        counters, gauges = values_of(batcher, self._host_tier, self._prefetch)
        with self._sync_lock:
            for name, value in counters.items():
                if value > self._sent[name]:
                    self._children[name].inc(value - self._sent[name])
                    self._sent[name] = value
        for name, value in gauges.items():
            self._gauges[name].set(value)

    def on_step(self, batcher: VitBatcher, stats: StepStats) -> None:
        for child, field in self._histograms:
            for value in getattr(stats, field):
                child.observe(value)
        self.sync(batcher)

    def on_fallback(self, batcher: VitBatcher, reason: str) -> None:
        self._families[FALLBACKS].labels(*self._labels, reason).inc()


def _client_is_multiprocess() -> bool:
    """Whether this process's prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR``
    (it decides once, when first imported)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


# -- snapshot: files the serving process reads ---------------------------------

_snapshot_ids = count()


#: Least time between two snapshot files of one writer. Why: writing one (JSON, a
#: file, a rename) cost about 2 ms of the engine's step loop, twice a step on a busy
#: vLLM server; scrapes come seconds apart. Values within the interval are written
#: by a timer at its end, so the file lags the step by at most this much.
SNAPSHOT_INTERVAL_S = 0.2


class SnapshotWriter:
    """Writes the batcher's cumulative values to ``directory`` after a step, at most
    every :data:`SNAPSHOT_INTERVAL_S` (a fallback: at once)."""

    def __init__(
        self,
        directory: str,
        labels: Mapping[str, str],
        host_tier: HostTier | None,
        prefetch: Prefetch | None = None,
    ) -> None:
        _label_values(labels)
        self._labels = dict(labels)
        self._host_tier = host_tier
        self._prefetch = prefetch
        self._path = os.path.join(directory, f"vitbatch-{os.getpid()}-{next(_snapshot_ids)}.json")
        self._lock = threading.Lock()
        self._written = -SNAPSHOT_INTERVAL_S  # time.monotonic() of the last file
        self._pending: dict[str, Any] | None = None  # the latest values not yet written
        self._timer: threading.Timer | None = None

    def _data(self, batcher: VitBatcher) -> dict[str, Any]:
        """The values now (read on the step's thread: the batcher is not locked)."""
        counters, gauges = values_of(batcher, self._host_tier, self._prefetch)
        totals = batcher.totals
        histograms = {
            name: {"counts": list(h.counts), "sum": h.total}
            for name, (_, _, field) in HISTOGRAMS.items()
            for h in (getattr(totals, field),)
        }
        return {
            "pid": os.getpid(),
            "labels": self._labels,
            "counters": counters,
            "gauges": gauges,
            "histograms": histograms,
            "fallbacks": dict(totals.fallbacks),
        }

    def sync(self, batcher: VitBatcher, *, now: bool = False) -> None:
        data = self._data(batcher)
        with self._lock:
            wait = self._written + SNAPSHOT_INTERVAL_S - time.monotonic()
            if wait > 0 and not now:
                self._pending = data
                if self._timer is None:
                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._pending = None
            self._write(data)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending is not None:
                data, self._pending = self._pending, None
                try:
                    self._write(data)
                except OSError:  # the serving process removed the directory: it is gone
                    pass

    def _write(self, data: dict[str, Any]) -> None:
        """Write ``data`` (the caller holds the lock)."""
        tmp = self._path + ".tmp"
        with open(tmp, "w") as file:
            json.dump(data, file)
        os.replace(tmp, self._path)
        self._written = time.monotonic()

    def on_step(self, batcher: VitBatcher, stats: StepStats) -> None:
        self.sync(batcher)

    def on_fallback(self, batcher: VitBatcher, reason: str) -> None:
        self.sync(batcher, now=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: str) -> list[dict[str, Any]]:
    """The snapshots in ``directory`` (unreadable or half-written ones are skipped)."""
    found = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for name in names:
        if not (name.startswith("vitbatch-") and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(directory, name)) as file:
                found.append(json.load(file))
        except (OSError, ValueError):
            continue
    return found


class SnapshotCollector:
    """A ``prometheus_client`` collector of the snapshots in one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> list[Any]:
        return []  # names are only known at scrape time; don't read files on register

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = read_snapshots(self.directory)
        counters: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in COUNTERS}
        gauges: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in GAUGES}
        fallbacks: dict[tuple[str, ...], float] = {}
        histograms: dict[str, dict[tuple[str, ...], tuple[list[float], float]]] = {
            name: {} for name in HISTOGRAMS
        }
        for snap in snapshots:
            key = tuple(_label_values(snap.get("labels", {})))
            for name, value in snap.get("counters", {}).items():
                if name in counters:
                    counters[name][key] = counters[name].get(key, 0) + value
            if _alive(int(snap.get("pid", 0))):  # gauges of live processes, like "livesum"
                for name, value in snap.get("gauges", {}).items():
                    if name in gauges:
                        gauges[name][key] = gauges[name].get(key, 0) + value
            for reason, value in snap.get("fallbacks", {}).items():
                fallbacks[(*key, reason)] = fallbacks.get((*key, reason), 0) + value
            for name, hist in snap.get("histograms", {}).items():
                if name in histograms:
                    old_counts, old_sum = histograms[name].get(key, ([0] * len(hist["counts"]), 0))
                    summed = [a + b for a, b in zip(old_counts, hist["counts"])]
                    histograms[name][key] = (summed, old_sum + hist["sum"])
        for name, text in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=LABELS)
            for key, value in counters[name].items():
                family.add_metric(key, value)
            yield family
        family = CounterMetricFamily(FALLBACKS, FALLBACKS_HELP, labels=(*LABELS, "reason"))
        for key, value in fallbacks.items():
            family.add_metric(key, value)
        yield family
        for name, text in GAUGES.items():
            family = GaugeMetricFamily(name, text, labels=LABELS)
            for key, value in gauges[name].items():
                family.add_metric(key, value)
            yield family
        for name, (text, bounds, _) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, text, labels=LABELS)
            for key, (counts, total) in histograms[name].items():
                running, buckets = 0.0, []
                for bound, value in zip((*bounds, float("inf")), counts):
                    running += value
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
                family.add_metric(key, buckets, total)
            yield family


_served: dict[str, Any] = {}


def serve_engine_metrics() -> str | None:
    """In the process that answers ``/metrics``: collect vitbatch's engine-side values.

    Call it before the engine's processes start. Where ``PROMETHEUS_MULTIPROC_DIR``
    is set the engine's multiprocess collector already reads vitbatch's pushed
    values; nothing to do. Otherwise it points :data:`DIR_ENV` at a private
    temporary directory (removed at exit) unless it is set, for the engine
    processes to inherit, and registers a :class:`SnapshotCollector` of it in
    ``prometheus_client``'s default registry. Idempotent.

    :returns: the snapshot directory, or ``None`` (multiprocess mode, or no
        ``prometheus_client``).
    """
    if os.environ.get(_MULTIPROC_ENV):
        return None
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return None
    with _lock:
        directory = os.environ.get(DIR_ENV)
        if not directory:
            holder = tempfile.TemporaryDirectory(prefix="vitbatch-metrics-")
            _served["tempdir"] = holder  # lives as long as this process
            directory = os.environ[DIR_ENV] = holder.name
        if directory not in _served:
            collector = SnapshotCollector(directory)
            REGISTRY.register(collector)
            _served[directory] = collector
            logger.debug("vitbatch: engine metrics collected from %s", directory)
    return directory


# -- the entry point adapters call ------------------------------------------------

_warned: set[str] = set()


def export_batcher(
    batcher: VitBatcher,
    labels: Mapping[str, str],
    host_tier: HostTier | None = None,
    prefetch: Prefetch | None = None,
) -> bool:
    """Export ``batcher``'s statistics as ``vitbatch_*`` Prometheus metrics.

    :param labels: values of :data:`LABELS` (e.g. ``{"model_name": ..., "tp_rank": "0"}``).
    :param host_tier: the adapter's host tier when it is not the batcher cache's own.
    :param prefetch: the adapter's encoder-prefetch counters, if it prefetches (published
        with the batcher's after each step).
    :returns: ``False`` when ``prometheus_client`` is not installed (nothing exported).
    """
    global _families
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    directory = os.environ.get(DIR_ENV)
    multiprocess = bool(os.environ.get(_MULTIPROC_ENV))
    if multiprocess and not _client_is_multiprocess() and "late" not in _warned:
        _warned.add("late")
        logger.warning(
            "vitbatch: PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported "
            "in this process, so its metrics reach no /metrics; set it before starting the engine"
        )
    observer: PrometheusObserver | SnapshotWriter
    if directory and not multiprocess:
        observer = SnapshotWriter(directory, labels, host_tier, prefetch)
    else:
        with _lock:
            if _families is None:
                _families = _make_families()
        observer = PrometheusObserver(_families, labels, host_tier, prefetch)
    batcher.observers.append(observer)
    return True


def sync(batcher: VitBatcher) -> None:
    """Publish ``batcher``'s current values now (an adapter's host tier moved between steps)."""
    for observer in batcher.observers:
        if isinstance(observer, (PrometheusObserver, SnapshotWriter)):
            observer.sync(batcher)
