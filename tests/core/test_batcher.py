"""Errors, OOM back-off and statistics of VitBatcher."""

from __future__ import annotations

import pytest
import torch

from tests.core.fakes import HIDDEN, ConcatEncoder, encode_one, make_item
from vitbatch import hookimpl
from vitbatch.core import (
    Budget,
    EmbeddingCache,
    EncoderOutputError,
    NoEncoderError,
    RequestChunk,
    VitBatcher,
    Window,
)
from vitbatch.core.errors import AssemblyError, VitBatchError
from vitbatch.plugin import make_plugin_manager


def batcher_with(*plugins, budget=None, cache=None, hidden_size=HIDDEN) -> VitBatcher:
    pm = make_plugin_manager(load_entry_points=False, plugins=plugins)
    return VitBatcher(budget, cache, pm, hidden_size=hidden_size)


def two_requests():
    return [
        RequestChunk([make_item(1, 4, [(0, 4)]), make_item(2, 3, [(6, 3)])], Window(0, 9), "a"),
        RequestChunk([make_item(3, 5, [(2, 5)])], Window(0, 7), "b"),
    ]


class BadRows:
    @hookimpl
    def vitbatch_encode_batch(self, items):
        return torch.zeros(sum(i.num_tokens for i in items) + 1, 6)


class BadListLength:
    @hookimpl
    def vitbatch_encode_batch(self, items):
        return [torch.zeros(i.num_tokens, 6) for i in items][:-1]


class BadItemRows:
    @hookimpl
    def vitbatch_encode_batch(self, items):
        return [torch.zeros(i.num_tokens + (i.hash == 2), 6) for i in items]


class BadHidden:
    @hookimpl
    def vitbatch_encode_batch(self, items):
        return [torch.zeros(i.num_tokens, 6 if i.hash != 3 else 7) for i in items]


@pytest.mark.parametrize(
    ("plugin", "fragment"),
    [
        (BadRows(), "returned 13 rows"),
        (BadListLength(), "returned 2 embeddings for 3 items"),
        (BadItemRows(), "returned 4 rows for item 2: expected 3"),
        (BadHidden(), "hidden size 7 for item 3: expected 6"),
    ],
)
def test_wrong_encoder_output_names_plugin_modality_and_item(plugin, fragment) -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(plugin, name=f"bad-{type(plugin).__name__}")
    batcher = VitBatcher(None, None, pm, hidden_size=HIDDEN)
    with pytest.raises(EncoderOutputError) as info:
        batcher.run_step(two_requests())
    message = str(info.value)
    assert fragment in message
    assert "modality 'image'" in message
    assert f"encoder plugin 'bad-{type(plugin).__name__}'" in message


def test_error_names_the_registered_plugin() -> None:
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(BadRows(), name="my-bad-encoder")
    with pytest.raises(EncoderOutputError, match="my-bad-encoder"):
        VitBatcher(plugin_manager=pm).run_step(two_requests())


def test_no_encoder_at_all_is_a_clear_error() -> None:
    with pytest.raises(NoEncoderError, match="no encoder for modality 'image'"):
        batcher_with().run_step(two_requests())


def test_declining_plugin_falls_through_to_engine_encoder() -> None:
    class Declines:
        calls = 0

        @hookimpl
        def vitbatch_encode_batch(self, modality):
            Declines.calls += 1
            return None

    seen = []

    def engine(items):
        seen.append([i.hash for i in items])
        return [encode_one(i.features) for i in items]

    result = batcher_with(Declines()).run_step(two_requests(), engine_encoder=engine)
    assert Declines.calls == 1 and seen == [[1, 2, 3]]
    assert result.embeddings[0].shape == (7, 6)


def test_wrapper_on_encode_hook_is_rejected_clearly() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def vitbatch_encode_batch(self):
            return (yield)

    with pytest.raises(VitBatchError, match="supports no wrappers"):
        batcher_with(Wrapper(), ConcatEncoder()).run_step(two_requests())


def test_bad_assembly_is_reported() -> None:
    class ShortAssembly:
        @hookimpl
        def vitbatch_assemble_chunk(self, embeddings):
            return embeddings[0][:1]

    with pytest.raises(AssemblyError, match="expected 7 rows"):
        batcher_with(ConcatEncoder(), ShortAssembly()).run_step(two_requests())


class OomAboveTwoItems(ConcatEncoder):
    """Raises the device OOM error for calls with more than two items."""

    @hookimpl
    def vitbatch_encode_batch(self, items):
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super().vitbatch_encode_batch(items)


def test_oom_is_split_in_halves_and_retried() -> None:
    encoder = OomAboveTwoItems()
    chunks = [RequestChunk([make_item(h, 2, [(0, 2)])], Window(0, 2)) for h in range(7)]
    result = batcher_with(encoder, budget=Budget.unbounded()).run_step(chunks)
    assert [len(c) for c in encoder.calls] == [1, 2, 2, 2]
    assert result.stats.oom_splits == 3
    for chunk, got in zip(chunks, result.embeddings):
        torch.testing.assert_close(got, encode_one(chunk.items[0].features))


def test_oom_on_a_single_item_is_raised() -> None:
    class AlwaysOom:
        @hookimpl
        def vitbatch_encode_batch(self, items):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(torch.OutOfMemoryError):
        batcher_with(AlwaysOom()).run_step(two_requests())


def test_stats_count_hits_dedup_and_calls() -> None:
    encoder = ConcatEncoder()
    batcher = batcher_with(encoder, budget=Budget(max_cost=8), cache=EmbeddingCache(1 << 20))
    first = batcher.run_step(two_requests())
    assert first.stats.misses == 3 and first.stats.hits == 0
    assert first.stats.encoder_calls == 2 and first.stats.tokens_per_call == [7, 5]
    again = two_requests() + [
        RequestChunk([make_item(1, 4, [(0, 4)]), make_item(9, 2, [(5, 2)])], Window(0, 7))
    ]
    second = batcher.run_step(again)
    assert second.stats.hits == 3 and second.stats.deduplicated == 1 and second.stats.misses == 1
    assert batcher.totals.encoder_calls == 3 and batcher.totals.items == 3 + 5


def test_encode_without_windows_dedups_and_caches() -> None:
    encoder = ConcatEncoder()
    batcher = batcher_with(encoder, cache=EmbeddingCache(1 << 20))
    items = [make_item(1, 4, [(0, 4)]), make_item(1, 4, [(9, 4)]), make_item(2, 3, [(0, 3)])]
    out = batcher.encode(items)
    assert set(out) == {items[0].key, items[2].key}
    assert batcher.last_stats.deduplicated == 1 and len(encoder.calls) == 1
    batcher.encode(items)
    assert len(encoder.calls) == 1 and batcher.last_stats.hits == 2


def test_cached_slices_do_not_pin_the_whole_batch_output() -> None:
    encoder = ConcatEncoder()
    cache = EmbeddingCache(1 << 20)
    batcher = batcher_with(encoder, cache=cache)
    batcher.run_step(two_requests())
    for key in [i.key for c in two_requests() for i in c.items]:
        tensor = cache.get(key)
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
