"""Push: ordinary ``prometheus_client`` metrics in the encoder's process.

With ``PROMETHEUS_MULTIPROC_DIR`` set before the engine started (SGLang's
launcher, vLLM's ``--api-server-count > 1``) they land in that directory and
appear on the engine's own endpoint next to its metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vitbatch.core.stats import StepStats
from vitbatch.metrics.definitions import (
    COUNTERS,
    FALLBACKS,
    FALLBACKS_HELP,
    GAUGES,
    HISTOGRAMS,
    LABELS,
    HostTier,
    Prefetch,
    label_values,
    values_of,
)

if TYPE_CHECKING:
    from vitbatch.core.batcher import VitBatcher


def make_families() -> dict[str, Any]:
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
        self._labels = label_values(labels)
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


def client_is_multiprocess() -> bool:
    """Whether this process's prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR``
    (it decides once, when first imported)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue
