"""vitbatch's metrics: one definition per fact, pushed or carried by snapshot files."""

from __future__ import annotations

import os

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from vitbatch import metrics  # noqa: E402
from vitbatch.core import EmbeddingCache, VitBatcher  # noqa: E402
from vitbatch.core.stats import StepStats  # noqa: E402


def batcher() -> VitBatcher:
    return VitBatcher(cache=EmbeddingCache(0))


def step(b: VitBatcher, calls: int = 2, items: int = 3) -> None:
    stats = StepStats(items=items, misses=items, encoder_calls=calls)
    stats.cost_per_call = [16] * calls
    stats.items_per_call = [1] * calls
    stats.seconds_per_call = [0.001] * calls
    b.totals.add(stats)
    for observer in b.observers:
        observer.on_step(b, stats)


def test_adapter_host_tier_counts_come_from_the_tier() -> None:
    b = batcher()
    b.totals.hits = 1
    tier = metrics.HostTierCounts(hits=4, demotions=5, drops=2, entries=3, bytes=300)
    counters, gauges = metrics.values_of(b, lambda: tier)
    assert counters["vitbatch_host_cache_hits"] == 4
    assert counters["vitbatch_cache_hits"] == 5  # the batcher's own hits plus the tier's
    assert counters["vitbatch_host_cache_demotions"] == 5
    assert counters["vitbatch_host_cache_drops"] == 2
    assert gauges == {
        "vitbatch_cache_bytes": 0,
        "vitbatch_host_cache_bytes": 300,
        "vitbatch_host_cache_entries": 3,
        "vitbatch_prefetch_bytes": 0,  # no prefetch given
    }


def test_core_host_tier_is_the_cache_s() -> None:
    counters, gauges = metrics.values_of(batcher(), None)
    assert counters["vitbatch_host_cache_hits"] == 0
    assert gauges["vitbatch_host_cache_entries"] == 0


def test_snapshot_reaches_the_collector(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(metrics.DIR_ENV, str(tmp_path))
    b = batcher()
    tier = {"counts": metrics.HostTierCounts()}
    labels = {"engine": "0", "model_name": "m", "tp_rank": "0"}
    assert metrics.export_batcher(b, labels, lambda: tier["counts"])
    step(b)
    tier["counts"] = metrics.HostTierCounts(hits=2, demotions=3, entries=1, bytes=64)
    metrics.sync(b)  # tier moved between encoder calls
    b.totals.note_fallback("error")
    b.observers[-1].on_fallback(b, "error")
    registry = prometheus_client.CollectorRegistry()
    registry.register(metrics.SnapshotCollector(str(tmp_path)))
    text = prometheus_client.generate_latest(registry).decode()
    lab = 'engine="0",model_name="m",tp_rank="0"'
    assert f"vitbatch_encoder_calls_total{{{lab}}} 2.0" in text
    assert f"vitbatch_host_cache_hits_total{{{lab}}} 2.0" in text
    assert f"vitbatch_cache_hits_total{{{lab}}} 2.0" in text
    assert f"vitbatch_host_cache_demotions_total{{{lab}}} 3.0" in text
    assert f"vitbatch_host_cache_bytes{{{lab}}} 64.0" in text
    fallback = 'engine="0",model_name="m",reason="error",tp_rank="0"'
    assert f"vitbatch_fallbacks_total{{{fallback}}} 1.0" in text
    for le in ("16.0", "+Inf"):  # cumulative buckets; labels sorted on the wire
        bucket = f'engine="0",le="{le}",model_name="m",tp_rank="0"'
        assert f"vitbatch_cost_per_call_bucket{{{bucket}}} 2.0" in text
    assert f"vitbatch_cost_per_call_count{{{lab}}} 2.0" in text


def test_snapshots_are_written_at_most_every_interval_and_the_last_values_follow(
    tmp_path,
) -> None:
    """Many steps in a burst write one file at once and one at the interval's end (with the
    latest values), not one per step: each write cost the step loop about 2 ms."""
    import json
    import time

    writer = metrics.SnapshotWriter(str(tmp_path), {"model_name": "m"}, None)
    b = batcher()
    b.observers.append(writer)
    writes = []
    original = writer._write
    writer._write = lambda data: (writes.append(data), original(data))
    for _ in range(50):
        step(b, calls=1)
    assert len(writes) == 1
    time.sleep(3 * metrics.SNAPSHOT_INTERVAL_S)
    assert len(writes) == 2
    (path,) = tmp_path.glob("vitbatch-*.json")
    assert json.loads(path.read_text())["counters"]["vitbatch_encoder_calls"] == 50
    b.observers[-1].on_fallback(b, "error")  # a fallback is written at once
    assert len(writes) == 3


def test_a_process_that_exits_within_the_interval_leaves_its_last_values(tmp_path) -> None:
    """A vLLM worker stops right after its last step: its snapshot must hold that step's
    values, not the burst's first (the pending write may not die with the process)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
sys.path[:0] = {[str(Path(__file__).parents[2]), str(Path(metrics.__file__).parents[2])]!r}
from tests.core.test_metrics import batcher, step
from vitbatch import metrics
writer = metrics.SnapshotWriter({str(tmp_path)!r}, {{"model_name": "m"}}, None)
b = batcher()
b.observers.append(writer)
for _ in range(50):
    step(b, calls=1)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    (path,) = tmp_path.glob("vitbatch-*.json")
    assert json.loads(path.read_text())["counters"]["vitbatch_encoder_calls"] == 50


def test_serve_engine_metrics_makes_a_private_directory(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv(metrics.DIR_ENV, raising=False)
    directory = metrics.serve_engine_metrics()
    assert directory and os.path.isdir(directory) and os.environ[metrics.DIR_ENV] == directory
    assert metrics.serve_engine_metrics() == directory  # idempotent
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", directory)
    assert metrics.serve_engine_metrics() is None  # the engine's collector reads pushed values


def test_push_counters_follow_totals(monkeypatch) -> None:
    monkeypatch.delenv(metrics.DIR_ENV, raising=False)
    b = batcher()
    assert metrics.export_batcher(b, {"model_name": "push", "tp_rank": "1"})
    step(b, calls=3)
    step(b, calls=1)
    value = prometheus_client.REGISTRY.get_sample_value(
        "vitbatch_encoder_calls_total", {"model_name": "push", "engine": "", "tp_rank": "1"}
    )
    assert value == 4.0
