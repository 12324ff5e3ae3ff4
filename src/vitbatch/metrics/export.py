"""The entry point adapters call: :func:`export_batcher` picks push or snapshot
in the encoder's process, :func:`sync` publishes between steps."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitbatch.metrics.definitions import DIR_ENV, LOCK, MULTIPROC_ENV, HostTier, Prefetch, logger
from vitbatch.metrics.push import PrometheusObserver, client_is_multiprocess, make_families
from vitbatch.metrics.snapshot import SnapshotWriter

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher

_families: dict[str, Any] | None = None
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
    multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    if multiprocess and not client_is_multiprocess() and "late" not in _warned:
        _warned.add("late")
        logger.warning(
            "vitbatch: PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported "
            "in this process, so its metrics reach no /metrics; set it before starting the engine"
        )
    observer: PrometheusObserver | SnapshotWriter
    if directory and not multiprocess:
        observer = SnapshotWriter(directory, labels, host_tier, prefetch)
    else:
        with LOCK:
            if _families is None:
                _families = make_families()
        observer = PrometheusObserver(_families, labels, host_tier, prefetch)
    batcher.observers.append(observer)
    return True


def sync(batcher: VitBatcher) -> None:
    """Publish ``batcher``'s current values now (an adapter's host tier moved between steps)."""
    for observer in batcher.observers:
        if isinstance(observer, (PrometheusObserver, SnapshotWriter)):
            observer.sync(batcher)
