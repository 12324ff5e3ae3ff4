"""Prometheus metrics of a :class:`~vitbatch.core.batcher.VitBatcher`, for operators.

The process that runs the vision encoder (SGLang's scheduler, vLLM's engine
core or worker) is not the one that answers ``/metrics``, so the values travel
one of two ways, decided in the encoder's process by :func:`export_batcher`
(:mod:`.export`):

* **push** (``PROMETHEUS_MULTIPROC_DIR`` set before the engine started, as
  SGLang's launcher and vLLM's ``--api-server-count > 1`` set it): ordinary
  ``prometheus_client`` counters, which in multiprocess mode land in that
  directory and appear on the engine's own endpoint next to its metrics
  (:mod:`.push`).
* **snapshot** (:data:`DIR_ENV` set, by :func:`serve_engine_metrics` in the
  process that answers ``/metrics``, when it serves a single-process registry,
  vLLM's default): each encoder process writes its cumulative values to a small
  JSON file in that directory after each step; a collector registered in the
  serving process's default registry reads them at scrape time
  (:mod:`.snapshot`).

One definition per fact (:func:`values_of`, :mod:`.definitions`) feeds both.
Host-tier counters come from the tier that holds the rows
(:class:`HostTierCounts`): the core cache's host tier (SGLang) or the adapter's
own (vLLM's workers).

Nothing here is required: without ``prometheus_client`` :func:`export_batcher`
returns ``False`` and vitbatch runs as before (``vitbatch bench --json`` too).
"""

from __future__ import annotations

from vitbatch.metrics.definitions import (
    COUNTERS,
    DIR_ENV,
    FALLBACKS,
    FALLBACKS_HELP,
    GAUGES,
    HISTOGRAMS,
    LABELS,
    HostTier,
    HostTierCounts,
    Prefetch,
    core_host_tier,
    logger,
    values_of,
)
from vitbatch.metrics.export import export_batcher, sync
from vitbatch.metrics.push import PrometheusObserver
from vitbatch.metrics.snapshot import (
    SNAPSHOT_INTERVAL_S,
    SnapshotCollector,
    SnapshotWriter,
    _served,  # noqa: F401 - the serving process's collectors by directory (tests look)
    read_snapshots,
    serve_engine_metrics,
)

__all__ = [
    "COUNTERS",
    "DIR_ENV",
    "FALLBACKS",
    "FALLBACKS_HELP",
    "GAUGES",
    "HISTOGRAMS",
    "LABELS",
    "HostTier",
    "HostTierCounts",
    "Prefetch",
    "PrometheusObserver",
    "SnapshotCollector",
    "SNAPSHOT_INTERVAL_S",
    "SnapshotWriter",
    "core_host_tier",
    "export_batcher",
    "logger",
    "read_snapshots",
    "serve_engine_metrics",
    "sync",
    "values_of",
]
