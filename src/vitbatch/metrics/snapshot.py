"""Snapshot: for a serving process with a single-process registry (vLLM's default).

:func:`serve_engine_metrics`, in the process that answers ``/metrics``, sets
:data:`~.definitions.DIR_ENV` for the engine's processes to inherit; each
encoder process writes its cumulative values to a small JSON file in that
directory after each step (:class:`SnapshotWriter`), and a collector registered
in the serving process's default registry reads them at scrape time
(:class:`SnapshotCollector`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from itertools import count
from typing import TYPE_CHECKING, Any

from vitbatch.core.stats import StepStats
from vitbatch.metrics.definitions import (
    COUNTERS,
    DIR_ENV,
    FALLBACKS,
    FALLBACKS_HELP,
    GAUGES,
    HISTOGRAMS,
    LABELS,
    LOCK,
    MULTIPROC_ENV,
    HostTier,
    Prefetch,
    label_values,
    logger,
    values_of,
)

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher

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
        label_values(labels)
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
                    # Not a daemon: a process that exits within the interval (a vLLM
                    # worker at shutdown) still writes its last values, at most
                    # SNAPSHOT_INTERVAL_S later, instead of leaving an older file.
                    self._timer.daemon = False
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
            key = tuple(label_values(snap.get("labels", {})))
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
    if os.environ.get(MULTIPROC_ENV):
        return None
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return None
    with LOCK:
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
