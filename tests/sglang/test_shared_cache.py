"""One embedding cache: vitbatch's device tier is SGLang's ``mm_schedule.embedding_cache``.

What a new user would try with vitbatch on: SGLang's own unit-test scenarios that pre-fill
its cache (cached items are not re-encoded; a whole ``embed_mm_inputs`` pass leaves the cache
filled), steps SGLang serves itself filling the cache vitbatch reads and back, SGLang
re-creating its cache between steps, the state failing to build, tensor-parallel ranks whose
caches disagree, and a property-based differential run against SGLang's own path that also
checks the memory bound: one cache, never more than SGLang reserved.
"""

from __future__ import annotations

import gc
import logging
import os
import weakref
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.multimodal_cache import EmbeddingResult  # noqa: E402

from tests.sglang.conftest import (
    HIDDEN,
    FakeEncoder,
    ItemSpec,
    Modality,
    RequestSpec,
    build_step,
    mm_schedule,
    run_get_embedding_and_mask,
)
from tests.sglang.test_differential import CACHE_BYTES, assert_same
from vitbatch import hookimpl
from vitbatch.adapters import sglang as adapter
from vitbatch.adapters.sglang import state as adapter_state
from vitbatch.adapters.sglang import surface
from vitbatch.core.agreement import GroupAgreement, start_flags
from vitbatch.plugin import make_plugin_manager
from vitbatch.plugin.manager import DEFAULTS_NAME

ROW_BYTES = HIDDEN * 8  # float64 rows of the fake encoder


@contextmanager
def active(fn, cache_bytes: int | None = CACHE_BYTES):
    """``fn`` as SGLang's ``_get_chunked_prefill_embedding``; a fresh SGLang cache unless None."""
    if cache_bytes is not None:
        mm_schedule.init_mm_embedding_cache(cache_bytes)
    previous = mm_schedule._get_chunked_prefill_embedding
    mm_schedule._get_chunked_prefill_embedding = fn
    try:
        yield
    finally:
        mm_schedule._get_chunked_prefill_embedding = previous


def prefill(spec: ItemSpec, value: float) -> torch.Tensor:
    """What SGLang's tests do: put an item's embedding into SGLang's cache by hand."""
    tensor = torch.full((spec.tokens, HIDDEN), value, dtype=torch.float64)
    assert mm_schedule.embedding_cache.set(spec.hash, EmbeddingResult(embedding=tensor))
    return tensor


def one_request(*specs: ItemSpec, length: int = 40) -> list[RequestSpec]:
    return [RequestSpec(list(specs), length, 0, length)]


def image(hash_: int, start: int, tokens: int = 4) -> ItemSpec:
    return ItemSpec(hash_, Modality.IMAGE, [(start, start + tokens - 1)])


# ---------------------------------------------------------------------------
# SGLang's pre-fill scenarios, with vitbatch on
# ---------------------------------------------------------------------------


def test_prefilled_audio_items_are_not_re_encoded(native_and_plugin) -> None:
    _, patched = native_and_plugin
    adapter.reset_state(adapter.Settings(enabled=True))
    first = ItemSpec(101, Modality.AUDIO, [(2, 6)])
    second = ItemSpec(102, Modality.AUDIO, [(10, 12)])
    encoder = FakeEncoder()
    with active(patched):
        cached = [prefill(first, 1.5), prefill(second, -2.0)]
        embedding, mask, _ = run_get_embedding_and_mask(
            build_step(one_request(first, second, length=16)), encoder
        )
    assert encoder.calls == []
    torch.testing.assert_close(embedding, torch.cat(cached), rtol=0, atol=0)
    assert int(mask.sum()) == first.tokens + second.tokens
    assert adapter.get_state().fallbacks == 0


def test_prefilled_multi_run_audio_is_not_re_encoded(native_and_plugin) -> None:
    """An audio item whose placeholder runs are interleaved with transcript text."""
    if not surface.audio_runs_per_image():
        pytest.skip("this SGLang sends multi-run audio down its per-request full path")
    _, patched = native_and_plugin
    adapter.reset_state(adapter.Settings(enabled=True))
    audio = ItemSpec(111, Modality.AUDIO, [(1, 3), (6, 7), (10, 12)])
    encoder = FakeEncoder()
    with active(patched):
        cached = prefill(audio, 0.25)
        embedding, _, _ = run_get_embedding_and_mask(
            build_step(one_request(audio, length=14)), encoder
        )
    assert encoder.calls == []
    torch.testing.assert_close(embedding, cached, rtol=0, atol=0)


def test_only_the_item_not_prefilled_is_encoded(native_and_plugin) -> None:
    original, patched = native_and_plugin
    adapter.reset_state(adapter.Settings(enabled=True))
    hit, miss = image(121, 2), image(122, 10)
    step = one_request(hit, miss, length=16)
    with active(original):
        prefill(hit, 3.0)
        native = run_get_embedding_and_mask(build_step(step), FakeEncoder())
    encoder = FakeEncoder()
    with active(patched):
        prefill(hit, 3.0)
        plugin = run_get_embedding_and_mask(build_step(step), encoder)
    assert_same([native], [plugin])
    assert [[item.hash for item in call] for call in encoder.calls] == [[miss.hash]]


def test_whole_sequence_embed_mm_inputs_fills_sglangs_cache(native_and_plugin) -> None:
    """``embed_mm_inputs`` over two requests: the output equals SGLang's, and SGLang's cache
    holds every item's embedding afterwards (vitbatch keeps none of its own)."""
    from sglang.srt.managers.mm_utils import embed_mm_inputs

    original, patched = native_and_plugin
    adapter.reset_state(adapter.Settings(enabled=True))
    requests = [
        RequestSpec([image(131, 1, 6), image(132, 9, 3)], 14, 0, 14),
        RequestSpec([image(133, 2, 5)], 10, 0, 10),
    ]
    table = torch.nn.Embedding(64, HIDDEN, dtype=torch.float64)

    def run(fn):
        encoder = FakeEncoder()
        step = build_step(requests)
        mm_inputs = [
            SimpleNamespace(mm_items=step.items[step.items_size[i] : step.items_size[i + 1]])
            for i in range(len(requests))
        ]
        with active(fn):
            embeds, _ = embed_mm_inputs(
                mm_inputs,
                step.prefix_length,
                step.extend_length,
                step.input_ids,
                table,
                data_embedding_func_mapping={Modality.IMAGE: encoder},
            )
            entries = {
                hash_: mm_schedule.embedding_cache.get_single(hash_) for hash_ in (131, 132, 133)
            }
        return embeds, entries, encoder, step

    native, native_entries, _, _ = run(original)
    plugin, plugin_entries, encoder, step = run(patched)
    torch.testing.assert_close(plugin, native, rtol=0, atol=0)
    for hash_, entry in plugin_entries.items():
        assert entry is not None, f"item {hash_} not in SGLang's cache"
        torch.testing.assert_close(entry.embedding, native_entries[hash_].embedding)
    expected = FakeEncoder()(step.items)
    assert torch.equal(torch.cat([plugin_entries[h].embedding for h in (131, 132, 133)]), expected)
    assert len(encoder.calls) == 1  # one batched call across both requests
    assert adapter.get_state().batcher.cache.used_bytes == mm_schedule.embedding_cache.current_size


# ---------------------------------------------------------------------------
# Steps SGLang serves itself and steps vitbatch serves share one cache
# ---------------------------------------------------------------------------


def test_what_sglang_encoded_is_a_hit_for_vitbatch_and_back(native_and_plugin) -> None:
    original, patched = native_and_plugin
    adapter.reset_state(adapter.Settings(enabled=True))
    step_a = one_request(image(141, 2), image(142, 8))
    step_b = one_request(image(143, 3, 6))
    native_encoder, plugin_encoder = FakeEncoder(), FakeEncoder()
    mm_schedule.init_mm_embedding_cache(CACHE_BYTES)
    with active(original, cache_bytes=None):
        run_get_embedding_and_mask(build_step(step_a), native_encoder)
    with active(patched, cache_bytes=None):
        run_get_embedding_and_mask(build_step(step_a), plugin_encoder)  # all hits
        run_get_embedding_and_mask(build_step(step_b), plugin_encoder)  # encoded by vitbatch
    with active(original, cache_bytes=None):
        run_get_embedding_and_mask(build_step(step_b), native_encoder)  # hit for SGLang
    assert len(native_encoder.calls) == 1 and len(plugin_encoder.calls) == 1
    stats = adapter.get_state().batcher.cache.stats
    assert stats.hits == 2 and stats.stored == 1


def fail_encoding_while_on(state: adapter.AdapterState, message: str, on: bool) -> dict[str, bool]:
    """Install a plugin that fails vitbatch's encoding (so SGLang's own path serves the
    step) while the returned switch's ``"on"`` is true."""
    switch = {"on": on}

    class FailsWhileOn:
        @hookimpl(tryfirst=True)
        def vitbatch_encode_batch(self, items):
            if switch["on"]:
                raise RuntimeError(message)
            return None

    state.batcher.plugin_manager = make_plugin_manager(
        load_entry_points=False, plugins=[FailsWhileOn()]
    )
    return switch


def test_items_encoded_in_a_fallback_step_are_hits_afterwards(native_and_plugin) -> None:
    _, patched = native_and_plugin
    state = adapter.reset_state(adapter.Settings(enabled=True))
    broken = fail_encoding_while_on(state, "plugin down for this step", on=True)
    assert state.batcher.plugin_manager.get_plugin(DEFAULTS_NAME) is not None
    step = one_request(image(151, 2), image(152, 9, 5))
    encoder = FakeEncoder()
    with active(patched):
        first = run_get_embedding_and_mask(build_step(step), encoder)
        broken["on"] = False
        second = run_get_embedding_and_mask(build_step(step), encoder)
    assert state.fallbacks == 1
    assert len(encoder.calls) == 1  # SGLang's own path encoded; vitbatch then hit
    assert state.batcher.last_stats.hits == 2 and state.batcher.last_stats.encoder_calls == 0
    assert_same([first], [second])


def test_full_path_entries_share_the_one_bound(native_and_plugin) -> None:
    """A multi-run video (SGLang's per-request full path) beside images vitbatch batches:
    both land in SGLang's cache, under SGLang's one bound."""
    original, patched = native_and_plugin
    bound = 20 * ROW_BYTES
    steps = [
        [
            RequestSpec([ItemSpec(162, Modality.VIDEO, [(1, 4), (7, 9)])], 12, 0, 12),
            RequestSpec([image(161, 2, 6)], 10, 0, 10),
        ],
        one_request(image(163, 1, 8), image(161, 12, 6), length=20),
    ]
    native = []
    with active(original, cache_bytes=bound):
        for step in steps:
            native.append(run_get_embedding_and_mask(build_step(step), FakeEncoder()))
    adapter.reset_state(adapter.Settings(enabled=True))
    plugin = []
    with active(patched, cache_bytes=bound):
        for step in steps:
            plugin.append(run_get_embedding_and_mask(build_step(step), FakeEncoder()))
            assert mm_schedule.embedding_cache.current_size <= bound
            assert adapter.get_state().batcher.cache.used_bytes == (
                mm_schedule.embedding_cache.current_size
            )
    assert_same(native, plugin)


# ---------------------------------------------------------------------------
# SGLang's lifecycle
# ---------------------------------------------------------------------------


def test_init_mm_embedding_cache_between_steps_is_followed(native_and_plugin) -> None:
    """After ``init_mm_embedding_cache`` vitbatch sees the new, empty cache: nothing it held
    before (device or host tier) serves the next step, and the old cache is not kept alive."""
    _, patched = native_and_plugin
    state = adapter.reset_state(adapter.Settings(enabled=True, host_cache_mb=1))
    two_images = 2 * 4 * ROW_BYTES
    steps = [one_request(image(171, 2), image(172, 8)), one_request(image(173, 2))]
    encoder = FakeEncoder()
    with active(patched, cache_bytes=two_images):
        for step in steps:
            run_get_embedding_and_mask(build_step(step), encoder)
        cache = state.batcher.cache
        assert len(cache) == 3 and cache.host_used_bytes > 0  # 171 demoted to the host tier
        old = weakref.ref(mm_schedule.embedding_cache)
        mm_schedule.init_mm_embedding_cache(CACHE_BYTES)
        gc.collect()
        assert old() is None, "vitbatch kept SGLang's old cache alive"
        assert len(cache) == 0 and cache.used_bytes == 0 and cache.host_used_bytes == 0
        assert cache.capacity_bytes == CACHE_BYTES
        calls = len(encoder.calls)
        run_get_embedding_and_mask(build_step(steps[0]), encoder)
        assert len(encoder.calls) == calls + 1 and state.batcher.last_stats.hits == 0
        assert mm_schedule.embedding_cache.get_single(171) is not None
        assert cache.used_bytes == mm_schedule.embedding_cache.current_size == 2 * 4 * ROW_BYTES


def test_state_that_cannot_be_built_falls_back_to_sglang(native_and_plugin, caplog) -> None:
    """A bad value that reached a scheduler process anyway (an exported variable, no launch
    check): every step is SGLang's own, logged once, never an exception out of the step."""
    original, patched = native_and_plugin
    step = one_request(image(181, 2), image(182, 9))
    with active(original):
        native = [run_get_embedding_and_mask(build_step(step), FakeEncoder()) for _ in range(2)]
    saved = os.environ.get("VITBATCH_MAX_ITEMS")
    os.environ["VITBATCH_MAX_ITEMS"] = "-3"
    adapter_state._state = None
    adapter_state._state_error_logged = False
    try:
        with caplog.at_level(logging.ERROR, logger="vitbatch.sglang"), active(patched):
            plugin = [run_get_embedding_and_mask(build_step(step), FakeEncoder()) for _ in range(2)]
    finally:
        if saved is None:
            os.environ.pop("VITBATCH_MAX_ITEMS", None)
        else:
            os.environ["VITBATCH_MAX_ITEMS"] = saved
        adapter.reset_state(adapter.Settings(enabled=True))
    assert_same(native, plugin)
    lines = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
    assert len(lines) == 1 and "VITBATCH_MAX_ITEMS" in lines[0]


# ---------------------------------------------------------------------------
# Tensor parallelism: each rank's copy of SGLang's cache may differ; the plan may not
# ---------------------------------------------------------------------------


def peer_agree(peer_cached: set[int], peer_failed: bool = False):
    """An agreement whose other rank holds ``peer_cached`` item hashes (a MAX all-reduce)."""

    def agree(flags):
        if len(flags) == 1:
            return [max(flags[0], int(peer_failed))]
        keys = agree.keys
        peer = start_flags(keys, {key for key in keys if key.hash in peer_cached}, None)
        return [max(mine, theirs) for mine, theirs in zip(flags, peer, strict=True)]

    return agree


@pytest.mark.parametrize(
    ("local", "peer", "encoded"),
    [
        ({191, 192}, {192}, [191]),  # local hit, peer miss: every rank encodes it
        ({192}, {191, 192}, [191]),  # local miss, peer hit: the same call
        ({191, 192}, {191, 192}, []),  # hit everywhere: no call on any rank
        ({191}, {192}, [191, 192]),  # each misses what the other has: one call, both items
    ],
)
def test_ranks_encode_the_union_of_their_misses(native_and_plugin, local, peer, encoded) -> None:
    """SGLang after 0.5.23 encodes an item missed on any attention-TP rank on every rank;
    vitbatch's agreement does the same over SGLang's shared cache (here the other rank's
    all-reduce contribution is simulated from what its cache holds)."""
    _, patched = native_and_plugin
    items = [image(191, 2), image(192, 9)]
    state = adapter.reset_state(adapter.Settings(enabled=True))
    agree = peer_agree(peer)
    state.batcher.agreement = GroupAgreement(agree)
    encoder = FakeEncoder()
    with active(patched):
        cached = {spec.hash: prefill(spec, 0.5 + spec.hash) for spec in items if spec.hash in local}
        step = build_step(one_request(*items, length=16))
        agree.keys = [adapter.core_item(item).key for item in step.items]
        embedding, _, _ = run_get_embedding_and_mask(step, encoder)
    assert [item.hash for call in encoder.calls for item in call] == encoded
    assert len(encoder.calls) == (1 if encoded else 0)
    assert state.batcher.last_stats.agreements == 2 and state.fallbacks == 0
    fresh = FakeEncoder()(step.items)
    for hash_, rows in ((191, slice(0, 4)), (192, slice(4, 8))):
        want = fresh[rows] if hash_ in encoded else cached[hash_]
        torch.testing.assert_close(embedding[rows], want, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Property: vitbatch on equals SGLang alone, step by step, within one bound
# ---------------------------------------------------------------------------

POOL = {hash_: tokens for hash_, tokens in zip(range(201, 209), (2, 3, 4, 6, 9, 12, 3, 5))}


@st.composite
def workloads(draw):
    """Steps of requests over a small pool of images (each hash one size, repeated across
    steps and requests), some with a multi-run video (SGLang's full path), some steps
    forced onto SGLang's own path; random chunk windows; a bound that forces evictions."""
    steps = []
    for _ in range(draw(st.integers(2, 6))):
        requests = []
        for _ in range(draw(st.integers(1, 3))):
            position, specs = draw(st.integers(0, 3)), []
            if draw(st.integers(0, 4)) == 0:
                # A fresh hash each time: a full-path cache *hit* calls SGLang 0.5.19's
                # CUDA-IPC acknowledgement, which needs distributed state (none on CPU).
                video = 3000 + 10 * len(steps) + len(requests)
                runs = [(position, position + 2), (position + 5, position + 7)]
                specs.append(ItemSpec(video, Modality.VIDEO, runs))
            else:
                for hash_ in draw(st.lists(st.sampled_from(sorted(POOL)), max_size=3)):
                    specs.append(image(hash_, position, POOL[hash_]))
                    position += POOL[hash_] + draw(st.integers(1, 3))
            length = (specs[-1].runs[-1][1] if specs else position) + draw(st.integers(1, 4))
            prefix = draw(st.integers(0, length - 1))
            extend = draw(st.integers(1, length - prefix))
            requests.append(RequestSpec(specs, length, prefix, extend))
        steps.append((requests, draw(st.booleans()) and draw(st.booleans())))
    bound = draw(st.sampled_from([0, 8, 20, 40, 1000])) * ROW_BYTES
    budget = draw(st.sampled_from([(0, 0), (8, 2), (16, 64)]))
    return steps, bound, budget


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workload=workloads())
def test_vitbatch_equals_sglang_within_one_bound(native_and_plugin, workload) -> None:
    original, patched = native_and_plugin
    steps, bound, (max_patches, max_items) = workload
    native = []
    with active(original, cache_bytes=bound):
        for requests, _ in steps:
            native.append(run_get_embedding_and_mask(build_step(requests), FakeEncoder()))

    state = adapter.reset_state(
        adapter.Settings(enabled=True, max_patches=max_patches, max_items=max_items)
    )
    forced = fail_encoding_while_on(state, "forced onto SGLang's path", on=False)
    plugin = []
    with active(patched, cache_bytes=bound):
        for requests, fallback in steps:
            forced["on"] = fallback
            plugin.append(run_get_embedding_and_mask(build_step(requests), FakeEncoder()))
            sglang_cache = mm_schedule.embedding_cache
            assert sglang_cache.current_size <= bound  # never beyond what SGLang reserved
            # One cache: every byte vitbatch holds across steps is in SGLang's cache.
            assert state.batcher.cache.used_bytes == sglang_cache.current_size
            assert state.batcher.cache.host_used_bytes == 0
    assert_same(native, plugin)
