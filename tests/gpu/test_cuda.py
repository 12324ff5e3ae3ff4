"""The CUDA-only behaviour of the core, on a real GPU; skipped without CUDA (CI has none).

    PYTHONPATH=src python3 -m pytest tests/gpu -s

1. CPU-reference offload: features pinned once, copied host→device without
   blocking, released with zero device→host copies (the profiler counts DtoH
   memcpys), and the second move of the same features pins nothing.
2. Embedding cache host tier: an evicted CUDA entry lands in pinned host
   memory and comes back to the GPU equal.
3. OOM back-off: an encoder whose activation memory grows with the batch hits a
   real ``torch.OutOfMemoryError``; the batcher halves the micro-batch until it
   fits and the result equals encoding each item alone.
4. vLLM worker's host tier on the host arena: a step that demotes and restores
   (the worker's own tier moves, on a stand-in runner) makes no synchronising
   CUDA call and no pinned allocation once the arena exists (torch profiler
   trace of the step), and every restored entry equals what was demoted.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from vitbatch import hookimpl
from vitbatch.core import (
    Budget,
    EmbeddingCache,
    HostReferenceOffload,
    Item,
    ItemKey,
    RequestChunk,
    Span,
    VitBatcher,
    Window,
)
from vitbatch.plugin import make_plugin_manager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def count_dtoh(fn) -> tuple[object, int]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    dtoh = sum(1 for e in prof.events() if "Memcpy DtoH" in e.name or "Memcpy DtoH" in str(e.name))
    return result, dtoh


def test_offload_releases_without_device_to_host_copies() -> None:
    offload = HostReferenceOffload()
    host = [torch.randn(4096, 1176) for _ in range(8)]
    moved = [offload.to_device(t, "cuda") for t in host]
    released, dtoh = count_dtoh(lambda: [offload.release(t) for t in moved])
    assert dtoh == 0, dtoh
    assert all(r.is_pinned() and torch.equal(r, h) for r, h in zip(released, host))
    pinned_before = offload.stats.pinned_bytes
    again = [offload.to_device(r, "cuda") for r in released]
    assert offload.stats.pinned_bytes == pinned_before  # pinned once, reused
    _, native_dtoh = count_dtoh(lambda: [t.to("cpu", non_blocking=True) for t in again])
    print(
        f"offload: {offload.stats.d2h_copies_avoided} releases, "
        f"{offload.stats.d2h_bytes_avoided / 2**20:.0f} MiB, "
        f"0 DtoH copies (copying back would make {native_dtoh}); second move pinned nothing"
    )


def test_host_tier_restores_evicted_cuda_entries_equal() -> None:
    cache = EmbeddingCache(2 * 1024 * 3584 * 2, host_capacity_bytes=8 * 1024 * 3584 * 2)
    tensors = {h: torch.randn(1024, 3584, device="cuda", dtype=torch.bfloat16) for h in range(4)}
    for h, t in tensors.items():
        cache.put(ItemKey(h, 1024), t)
    assert cache.host_keys() == [ItemKey(0, 1024), ItemKey(1, 1024)]
    back = cache.get(ItemKey(0, 1024))
    assert back.is_cuda and torch.equal(back, tensors[0])
    print(
        "host tier: evicted entries pinned on the host, restored to CUDA equal "
        f"({cache.stats.host_hits} host hit)"
    )


class HungryEncoder:
    """Allocates activation memory proportional to the batch, like a real ViT."""

    def __init__(self, bytes_per_row: int) -> None:
        self.bytes_per_row = bytes_per_row
        self.calls: list[int] = []

    @hookimpl
    def vitbatch_encode_batch(self, items):
        rows = sum(item.num_tokens for item in items)
        scratch = torch.empty(rows * self.bytes_per_row, dtype=torch.uint8, device="cuda")
        self.calls.append(len(items))
        del scratch
        return [item.features.cuda().float().sin() for item in items]


def test_oom_backoff_splits_until_the_batch_fits() -> None:
    free, _ = torch.cuda.mem_get_info()
    rows_per_item = 1024
    per_row = int(free / (3.5 * rows_per_item))  # ~3.5 items fit; 16 do not
    encoder = HungryEncoder(per_row)
    items = [
        Item(
            h,
            "image",
            rows_per_item,
            (Span(0, rows_per_item),),
            features=torch.randn(rows_per_item, 8),
        )
        for h in range(16)
    ]
    chunks = [RequestChunk([item], Window(0, rows_per_item), h) for h, item in enumerate(items)]
    pm = make_plugin_manager(False, [encoder])
    batcher = VitBatcher(Budget.unbounded(), EmbeddingCache(0), pm, hidden_size=8)
    result = batcher.run_step(chunks)
    for item, got in zip(items, result.embeddings):
        assert torch.equal(got, item.features.cuda().float().sin())
    assert result.stats.oom_splits > 0 and max(encoder.calls) <= 3
    print(
        f"OOM back-off: 1 planned call of 16 items -> {result.stats.oom_splits} splits, "
        f"successful calls {encoder.calls}"
    )


#: CUDA runtime calls that make the host wait, or allocate pinned memory.
SYNCHRONISING = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaHostAlloc",
    "cudaMallocHost",
    "cudaHostRegister",
    "cudaMemcpy",  # the synchronous copy (cudaMemcpyAsync is not)
)


def runtime_calls_within(prof, marker: str) -> list[str]:
    """Names of the CUDA runtime calls made while ``record_function(marker)`` was open
    (a version suffix such as ``_v3020`` dropped)."""
    events = list(prof.events())
    spans = [e for e in events if e.name == marker]
    # The CPU span; the profiler may add a GPU annotation of the same name.
    cpu = [e for e in spans if e.device_type == torch.autograd.DeviceType.CPU] or spans
    step = min(cpu, key=lambda e: e.time_range.start)
    start, end = step.time_range.start, step.time_range.end
    return [
        e.name.split("_")[0]
        for e in events
        if e.name.startswith("cuda") and start <= e.time_range.start <= end
    ]


def test_vllm_host_tier_step_makes_no_sync_after_the_arena_exists() -> None:
    from types import SimpleNamespace

    from torch.profiler import record_function

    from vitbatch.adapters.vllm import worker_host_tier, worker_state
    from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata

    rows, hidden = 1024, 3584  # one Qwen2.5-VL image of 1024 embeddings, bfloat16: 7 MiB
    runner = SimpleNamespace(
        encoder_cache={},
        device=torch.device("cuda"),
        model_config=SimpleNamespace(get_hidden_size=lambda: hidden, dtype=torch.bfloat16),
    )
    cache = runner.encoder_cache

    def step(restore=(), demote=(), drop=()) -> None:
        metadata = VitBatchStepMetadata(
            restore=tuple(restore),
            demote=tuple(demote),
            drop=tuple(drop),
            host_capacity_embeds=16 * rows,
        )
        state = worker_state.worker_state(runner, metadata, "V1")
        worker_host_tier.apply_tier_moves(cache, state, list(demote), metadata)

    def encode(name: str) -> torch.Tensor:
        cache[name] = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
        return cache[name].clone()

    want = {name: encode(name) for name in ("w0", "w1")}
    # Warm-up: the first demotion allocates the pinned arena and its stream.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as first:
        with record_function("first demotion"):
            step(demote=["w0", "w1"])
    first_calls = runtime_calls_within(first, "first demotion")
    step(restore=["w0"])
    torch.cuda.synchronize()
    assert torch.equal(cache["w0"], want["w0"])
    want.update({name: encode(name) for name in ("d0", "d1", "d2", "d3")})
    torch.cuda.synchronize()

    # The measured step: one restore (w1) and four demotions (d0-d3, 28 MiB), some
    # of them into the blocks w1 was just read from.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("demoting step"):
            step(restore=["w1"], demote=["d0", "d1", "d2", "d3"])
        torch.cuda.synchronize()  # outside the step: lets the trace show the copies
    calls = runtime_calls_within(prof, "demoting step")
    state = worker_state.state_of(runner)
    assert state.stats.demotions == 6 and state.stats.demotions_not_kept == 0
    assert "cudaMemcpyAsync" in calls, calls  # the trace sees the step's runtime calls...
    assert not [c for c in calls if c in SYNCHRONISING], calls  # ...and none of them waits
    copies = [e for e in prof.events() if "Memcpy DtoH" in e.name]
    assert copies, "the demotions' device-to-host copies ran"

    assert torch.equal(cache["w1"], want["w1"])
    step(restore=["d0", "d1", "d2", "d3"])
    torch.cuda.synchronize()
    for name in ("d0", "d1", "d2", "d3"):
        assert cache[name].is_cuda and torch.equal(cache[name], want[name]), name
    assert state.stats.restore_misses == 0 and state.stats.host_restores == 6
    print(
        f"vLLM host tier: demoting step made {len(calls)} CUDA runtime calls, "
        f"{calls.count('cudaMemcpyAsync')} async copies, none synchronising "
        f"(first demotion: {sorted(set(c for c in first_calls if c in SYNCHRONISING))}); "
        f"{len(copies)} DtoH copies; 6 restores equal"
    )
