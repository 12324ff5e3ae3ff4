"""vitbatch's Prometheus metrics on SGLang's own /metrics endpoint (multiprocess mode).

The scheduler-side process runs real SGLang steps with vitbatch on and
``PROMETHEUS_MULTIPROC_DIR`` set, as SGLang's launcher sets it; this process
then serves ``/metrics`` with SGLang's ``add_prometheus_middleware`` and reads it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.utils.common")

ROOT = Path(__file__).resolve().parents[2]

SCHEDULER_SIDE = r"""
import os, random
os.environ["VITBATCH_ENABLE"] = "1"
from sglang.srt.managers import mm_schedule
from sglang.srt.plugins.hook_registry import HookRegistry
from tests.sglang.conftest import (
    FakeEncoder, build_step, random_requests, run_get_embedding_and_mask,
)
from vitbatch.adapters import sglang as adapter

adapter.register()
HookRegistry.apply_hooks()  # vitbatch's AROUND hook on SGLang's function, as in a scheduler
adapter.reset_state(adapter.Settings(enabled=True, max_patches=8, max_items=2))
mm_schedule.init_mm_embedding_cache(1 << 20)
rng = random.Random(7)
for _ in range(6):
    run_get_embedding_and_mask(build_step(random_requests(rng)), FakeEncoder())
state = adapter.get_state()
state.batcher.note_fallback("error")
print("CALLS", state.batcher.totals.encoder_calls, "ITEMS", state.batcher.totals.items)
"""


def test_metrics_appear_on_sglangs_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCHEDULER_SIDE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    words = next(line for line in done.stdout.splitlines() if line.startswith("CALLS")).split()
    calls, items = int(words[1]), int(words[3])
    assert calls > 0

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    from sglang.srt.utils.common import add_prometheus_middleware
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    app = Starlette()
    add_prometheus_middleware(app)  # SGLang's own /metrics, multiprocess collector
    text = TestClient(app).get("/metrics").text
    print("\n".join(line for line in text.splitlines() if line.startswith("vitbatch_"))[:4000])
    assert (
        f'vitbatch_encoder_calls_total{{engine="",model_name="",tp_rank=""}} {float(calls)}' in text
    )
    assert f'vitbatch_items_total{{engine="",model_name="",tp_rank=""}} {float(items)}' in text
    assert 'vitbatch_fallbacks_total{engine="",model_name="",reason="error",tp_rank=""} 1.0' in text
    assert (
        f'vitbatch_cost_per_call_count{{engine="",model_name="",tp_rank=""}} {float(calls)}' in text
    )
    assert 'vitbatch_cost_per_call_bucket{engine="",le="16.0",model_name="",tp_rank=""}' in text
    assert "vitbatch_cache_bytes" in text
