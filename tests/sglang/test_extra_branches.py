"""SGLang branches beyond the default CUDA path: the per-request platforms
(HIP/XPU, switched on here on a CPU machine), SGLang's cache turned off, items
listed out of position order, and how flags and environment combine."""

from __future__ import annotations

import random

import pytest

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
from tests.sglang.test_differential import CACHE_BYTES, assert_same, run_sequence
from vitbatch.adapters import sglang as adapter


@pytest.mark.parametrize(
    "platform", ["_is_hip", "_is_xpu"]
)  # _is_npu: same branch, but get_embedding_and_mask then calls torch.npu
@pytest.mark.parametrize("seed", range(20))
def test_plugin_equals_sglang_per_request_platform_branch(
    native_and_plugin, monkeypatch, platform, seed
) -> None:
    """On HIP/NPU/XPU SGLang encodes per request (_get_chunked_embedding_by_item); the plugin
    intercepts on every platform and must still return the same tensors, in no more calls."""
    original, patched = native_and_plugin
    rng = random.Random(1000 + seed)
    sequence = [random_requests(rng) for _ in range(rng.randint(2, 4))]
    monkeypatch.setattr(mm_schedule, platform, True)
    native_encoder = FakeEncoder()
    native = run_sequence(sequence, native_encoder, original)
    plugin_encoder = FakeEncoder()
    plugin = run_sequence(
        sequence,
        plugin_encoder,
        patched,
        adapter.Settings(enabled=True, max_patches=0, max_items=0),
    )
    assert adapter.get_state().fallbacks == 0
    assert_same(native, plugin)
    assert len(plugin_encoder.calls) <= len(native_encoder.calls)


@pytest.mark.parametrize("seed", range(20))
def test_plugin_equals_sglang_with_sglang_cache_disabled(native_and_plugin, seed) -> None:
    """SGLANG_VLM_CACHE_SIZE_MB=0 (deterministic inference, rl_on_policy_target, Qwen3-VL on
    Hopper)."""
    original, patched = native_and_plugin
    rng = random.Random(2000 + seed)
    sequence = [random_requests(rng) for _ in range(rng.randint(2, 4))]
    mm_schedule.init_mm_embedding_cache(0)
    native_encoder = FakeEncoder()
    previous = mm_schedule._get_chunked_prefill_embedding
    try:
        mm_schedule._get_chunked_prefill_embedding = original
        native = [run_get_embedding_and_mask(build_step(r), native_encoder) for r in sequence]
        adapter.reset_state(adapter.Settings(enabled=True, max_patches=0, max_items=0))
        mm_schedule.init_mm_embedding_cache(0)
        mm_schedule._get_chunked_prefill_embedding = patched
        plugin = [run_get_embedding_and_mask(build_step(r), FakeEncoder()) for r in sequence]
    finally:
        mm_schedule._get_chunked_prefill_embedding = previous
        mm_schedule.init_mm_embedding_cache(CACHE_BYTES)
    assert adapter.get_state().fallbacks == 0
    assert_same(native, plugin)


def test_vitbatch_cache_is_sglangs_cache(native_and_plugin, caplog) -> None:
    """vitbatch keeps no device cache of its own: where SGLang turns caching off (a cache of
    0 bytes) vitbatch stores nothing across steps either, and the deprecated
    --vit-batch-cache-mb changes nothing but earns a warning."""
    _, patched = native_and_plugin
    requests = [
        RequestSpec([ItemSpec(11, Modality.IMAGE, [(2, 9)])], length=12, prefix=0, extend=12)
    ]
    with caplog.at_level("WARNING", logger="vitbatch.sglang"):
        state = adapter.reset_state(adapter.Settings(enabled=True, cache_mb=7))
    assert any("--vit-batch-cache-mb" in r.getMessage() for r in caplog.records)
    previous = mm_schedule._get_chunked_prefill_embedding
    encoder = FakeEncoder()
    try:
        mm_schedule._get_chunked_prefill_embedding = patched
        mm_schedule.init_mm_embedding_cache(0)
        run_get_embedding_and_mask(build_step(requests), encoder)
        run_get_embedding_and_mask(build_step(requests), encoder)
        assert state.batcher.cache.capacity_bytes == 0 and len(mm_schedule.embedding_cache) == 0
        assert state.batcher.cache.stats.stored == 0 and len(encoder.calls) == 2
        mm_schedule.init_mm_embedding_cache(CACHE_BYTES)
        assert state.batcher.cache.capacity_bytes == CACHE_BYTES
        run_get_embedding_and_mask(build_step(requests), encoder)
        run_get_embedding_and_mask(build_step(requests), encoder)
    finally:
        mm_schedule._get_chunked_prefill_embedding = previous
        mm_schedule.init_mm_embedding_cache(CACHE_BYTES)
    assert len(encoder.calls) == 3 and state.batcher.cache.stats.stored == 1
    assert state.fallbacks == 0


def test_items_listed_out_of_position_order(native_and_plugin) -> None:
    """SGLang assembles in item-list order; if the list is not in position order the core's
    positional assembly would differ, so the adapter must defer to SGLang (and stay equal)."""
    original, patched = native_and_plugin
    image = Modality.IMAGE
    requests = [
        RequestSpec(
            [ItemSpec(21, image, [(10, 13)]), ItemSpec(22, image, [(2, 5)])],
            length=16,
            prefix=0,
            extend=16,
        )
    ]
    native = run_sequence([requests], FakeEncoder(), original)
    plugin = run_sequence([requests], FakeEncoder(), patched, adapter.Settings(enabled=True))
    assert_same(native, plugin)
    assert adapter.get_state().unsupported == 1


def test_options_not_given_keep_the_users_environment() -> None:
    """VITBATCH_MAX_PATCHES=8192 exported plus a bare `--enable-vit-batching` keeps 8192;
    an option given on the command line wins."""
    import argparse

    parser = argparse.ArgumentParser()
    adapter.add_cli_args(parser)
    environ = {"VITBATCH_MAX_PATCHES": "8192", "VITBATCH_HOST_CACHE_MB": "32"}
    env = adapter.settings_from_args(parser.parse_args(["--enable-vit-batching"]), environ).to_env()
    assert env["VITBATCH_MAX_PATCHES"] == "8192" and env["VITBATCH_HOST_CACHE_MB"] == "32"
    assert env["VITBATCH_ENABLE"] == "1" and "VITBATCH_CACHE_MB" not in env
    args = parser.parse_args(["--enable-vit-batching", "--vit-batch-max-patches", "1024"])
    assert adapter.settings_from_args(args, environ).to_env()["VITBATCH_MAX_PATCHES"] == "1024"
