"""The vLLM adapter's prefetch pool on a real GPU; skipped without CUDA (CI has none).

    PYTHONPATH=src python3 -m pytest tests/gpu/test_prefetch_cuda.py -s

1. A prefetch launched on the side stream, then consumed: no synchronising
   CUDA call on either path (``torch.cuda.set_sync_debug_mode("error")``), the
   encoder's kernels run on the side stream (not the step's), and the step's
   stream, reading the handed-over tensor right away, sees the finished rows
   (the event wait orders it; the side stream's work is long on purpose).
2. An out-of-memory error on the side stream cancels the prefetch; consuming it
   marks the item missing (encoded with the step), nothing raises.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS, HIDDEN = 1024, 3584


def order(mm_hash: str) -> SimpleNamespace:
    return SimpleNamespace(mm_hash=mm_hash, modality="image", num_embeds=ROWS, cost=ROWS, data=None)


def slow_encode(seed: int) -> torch.Tensor:
    """Long device work whose result is known: many matmuls, then a fill by ``seed``."""
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(50):
        x = torch.tanh(x @ x)
    return torch.full((ROWS, HIDDEN), float(seed), device="cuda", dtype=torch.bfloat16) + (
        x[:1, :1].to(torch.bfloat16) * 0
    )


def test_prefetch_overlaps_on_a_side_stream_and_is_handed_over_without_sync() -> None:
    from vitbatch.adapters.vllm.prefetch_pool import PrefetchPool

    pool = PrefetchPool(1 << 30)
    main = torch.cuda.current_stream()
    streams: list[torch.cuda.Stream] = []

    def encode(orders):
        streams.append(torch.cuda.current_stream())
        return [slow_encode(i + 1) for i, _ in enumerate(orders)]

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert pool.launch([order("a"), order("b")], encode, torch.device("cuda")) is None
        cache: dict[str, torch.Tensor] = {}
        missing: set[str] = set()
        pool.consume(["a", "b"], cache, missing)
        sums = [cache[h].float().sum() for h in ("a", "b")]  # on the step's stream, now
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert streams and streams[0] != main  # encoded on the side stream
    assert torch.cuda.current_stream() == main  # and switched back
    assert missing == set() and len(pool) == 0 and pool.stats.consumed == 2
    torch.cuda.synchronize()
    assert [s.item() for s in sums] == [1.0 * ROWS * HIDDEN, 2.0 * ROWS * HIDDEN]


def test_out_of_memory_on_the_side_stream_cancels_the_prefetch() -> None:
    from vitbatch.adapters.vllm.prefetch_pool import PrefetchPool

    pool = PrefetchPool(1 << 30)

    def encode(orders):
        free, _ = torch.cuda.mem_get_info()
        return [torch.empty(free * 4, dtype=torch.uint8, device="cuda")]  # more than the GPU

    error = pool.launch([order("a")], encode, torch.device("cuda"))
    assert isinstance(error, torch.OutOfMemoryError)
    missing: set[str] = set()
    pool.consume(["a"], {}, missing)
    assert missing == {"a"} and pool.stats.cancelled == 1 and len(pool) == 0
