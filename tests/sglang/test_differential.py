"""vitbatch inside SGLang returns exactly what SGLang's own path returns.

Each case is a sequence of random steps (so both sides build up cache state
and later steps see partial hits), run twice on freshly built items: once with
SGLang's native ``_get_chunked_prefill_embedding`` and once with vitbatch's hook
installed through SGLang's own ``HookRegistry``. We compare the embedding, the
mask and the input ids of ``get_embedding_and_mask``, and count encoder calls.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.sglang.conftest import (
    FakeEncoder,
    ItemSpec,
    Modality,
    RequestSpec,
    build_step,
    mm_schedule,
    random_requests,
    run_get_embedding_and_mask,
)
from vitbatch.adapters import sglang as adapter
from vitbatch.adapters.sglang import surface

STEPS = {"count": 0, "vitbatch_requests": 0}
CACHE_BYTES = 1 << 20


def run_sequence(sequence, encoder, patched_fn, settings=None, cache_bytes=CACHE_BYTES):
    """Run every step of ``sequence`` through get_embedding_and_mask with ``patched_fn`` active,
    on a fresh SGLang embedding cache of ``cache_bytes``."""
    mm_schedule.init_mm_embedding_cache(cache_bytes)
    if settings is not None:
        adapter.reset_state(settings)
    outputs = []
    previous = mm_schedule._get_chunked_prefill_embedding
    mm_schedule._get_chunked_prefill_embedding = patched_fn
    try:
        for requests in sequence:
            outputs.append(run_get_embedding_and_mask(build_step(requests), encoder))
    finally:
        mm_schedule._get_chunked_prefill_embedding = previous
    return outputs


def assert_same(native_outputs, plugin_outputs):
    for (n_emb, n_mask, n_ids), (p_emb, p_mask, p_ids) in zip(
        native_outputs, plugin_outputs, strict=True
    ):
        assert (n_emb is None) == (p_emb is None)
        if n_emb is not None:
            assert n_emb.shape == p_emb.shape
            torch.testing.assert_close(p_emb, n_emb, rtol=0, atol=1e-12)
        assert (n_mask is None) == (p_mask is None)
        if n_mask is not None:
            assert torch.equal(n_mask, p_mask)
        assert torch.equal(n_ids, p_ids)


def per_image_calls(encoder):
    """Calls vitbatch made (SGLang's full path for multi-run video stays native)."""
    return [call for call in encoder.calls if surface.per_image_request(call)]


@pytest.mark.parametrize("seed", range(150))
def test_plugin_equals_sglang_with_unbounded_budget(native_and_plugin, seed) -> None:
    original, patched = native_and_plugin
    rng = random.Random(seed)
    sequence = [random_requests(rng) for _ in range(rng.randint(2, 4))]
    per_item_list = bool(seed % 2)

    native_encoder = FakeEncoder(per_item_list)
    native = run_sequence(sequence, native_encoder, original)
    plugin_encoder = FakeEncoder(per_item_list)
    settings = adapter.Settings(enabled=True, max_patches=0, max_items=0)
    plugin = run_sequence(sequence, plugin_encoder, patched, settings)
    STEPS["count"] += len(sequence)

    state = adapter.get_state()
    STEPS["vitbatch_requests"] += state.batcher.totals.requests
    assert state.fallbacks == 0, "vitbatch fell back to the native path"
    assert_same(native, plugin)
    assert len(plugin_encoder.calls) <= len(native_encoder.calls)


@pytest.mark.parametrize("seed", range(150, 300))
def test_plugin_equals_sglang_and_respects_budget(native_and_plugin, seed) -> None:
    original, patched = native_and_plugin
    rng = random.Random(seed)
    sequence = [random_requests(rng) for _ in range(rng.randint(2, 4))]
    max_patches, max_items = rng.choice([4, 8, 16, 30]), rng.choice([1, 2, 3, 64])

    native = run_sequence(sequence, FakeEncoder(), original)
    plugin_encoder = FakeEncoder(per_item_list=bool(seed % 2))
    settings = adapter.Settings(enabled=True, max_patches=max_patches, max_items=max_items)
    plugin = run_sequence(sequence, plugin_encoder, patched, settings)
    STEPS["count"] += len(sequence)

    assert adapter.get_state().fallbacks == 0
    assert_same(native, plugin)
    for call in per_image_calls(plugin_encoder):
        assert len(call) <= max_items
        if len(call) > 1:
            assert sum(sum(e - s + 1 for s, e in item.offsets) for item in call) <= max_patches


def test_enough_differential_steps_ran() -> None:
    if STEPS["count"] == 0:
        pytest.skip("run with the differential tests above")
    assert STEPS["count"] >= 500, STEPS["count"]
    # The steps really went through vitbatch (not only SGLang's full path or empty windows).
    assert STEPS["vitbatch_requests"] >= 300, STEPS["vitbatch_requests"]


def test_tiny_host_tier_still_equal(native_and_plugin) -> None:
    """SGLang's cache (vitbatch's device tier) too small for one step: evictions to the
    host tier and back."""
    original, patched = native_and_plugin
    rng = random.Random(12345)
    sequence = [random_requests(rng, pool=3) for _ in range(12)]
    tiny = 40 * 8 * 8  # 40 rows of 8 float64: a few items at most
    native = run_sequence(sequence, FakeEncoder(), original, cache_bytes=tiny)
    settings = adapter.Settings(enabled=True, host_cache_mb=1)
    plugin = run_sequence(sequence, FakeEncoder(), patched, settings, cache_bytes=tiny)
    assert_same(native, plugin)
    assert adapter.get_state().fallbacks == 0


def test_sglang_cache_evictions_demote_to_the_host_tier(native_and_plugin) -> None:
    """Room for two images in SGLang's cache: the third evicts the first into vitbatch's host
    tier, and the first comes back from there (no encoder call), equal to SGLang's output."""
    original, patched = native_and_plugin

    def image(hash_: int, position: int = 2) -> RequestSpec:
        return RequestSpec(
            [ItemSpec(hash_, Modality.IMAGE, [(position, position + 15)])], 20, 0, 20
        )

    sequence = [[image(1), image(2, 3)], [image(3)], [image(1)]]
    two_images = 2 * 16 * 8 * 8  # 16 rows of 8 float64 each
    native = run_sequence(sequence, FakeEncoder(), original, cache_bytes=two_images)
    encoder = FakeEncoder()
    settings = adapter.Settings(enabled=True, host_cache_mb=1)
    plugin = run_sequence(sequence, encoder, patched, settings, cache_bytes=two_images)
    assert_same(native, plugin)
    stats = adapter.get_state().batcher.cache.stats
    assert stats.evictions == 2 and stats.host_hits == 1  # 3 evicts 1; 1, back, evicts 2
    assert [item.hash for call in encoder.calls for item in call] == [1, 2, 3]
    assert mm_schedule.embedding_cache.current_size <= two_images


def test_plugin_error_falls_back_to_native_once_logged(native_and_plugin, caplog) -> None:
    """A broken encoder plugin costs speed, never a request."""
    import pluggy

    from vitbatch import hookimpl
    from vitbatch.plugin import make_plugin_manager

    original, patched = native_and_plugin

    class Broken:
        @hookimpl(tryfirst=True)
        def vitbatch_encode_batch(self, items):
            return torch.zeros(1, 1)

    rng = random.Random(7)
    sequence = [random_requests(rng) for _ in range(4)]
    native = run_sequence(sequence, FakeEncoder(), original)
    state = adapter.reset_state(adapter.Settings(enabled=True))
    state.batcher.plugin_manager = make_plugin_manager(load_entry_points=False, plugins=[Broken()])
    assert isinstance(state.batcher.plugin_manager, pluggy.PluginManager)
    with caplog.at_level("WARNING", logger="vitbatch.sglang"):
        plugin = run_sequence(sequence, FakeEncoder(), patched)
    assert_same(native, plugin)
    assert state.fallbacks >= 1
    messages = [r.getMessage() for r in caplog.records if "native path serves it" in r.getMessage()]
    assert len(messages) == 1 and "EncoderOutputError" in messages[0]
