"""The embedding width comes from the engine; NaN/Inf is refused on request."""

from __future__ import annotations

import pytest
import torch

from tests.core.fakes import HIDDEN, ConcatEncoder, make_item
from vitbatch import hookimpl
from vitbatch.core import (
    Budget,
    EmbeddingCache,
    EncoderOutputError,
    RequestChunk,
    StepStats,
    VitBatcher,
    Window,
)
from vitbatch.plugin import make_plugin_manager


class Widths:
    """Answers the width it is told, per call."""

    def __init__(self, widths: list[int]) -> None:
        self.widths = list(widths)

    @hookimpl
    def vitbatch_encode_batch(self, items):
        width = self.widths.pop(0)
        return [torch.ones(item.num_tokens, width) for item in items]


def one_item_step(hash_: int) -> list[RequestChunk]:
    return [RequestChunk([make_item(hash_, 3, [(0, 3)])], Window(0, 3))]


def batcher(*plugins, **kwargs) -> VitBatcher:
    pm = make_plugin_manager(load_entry_points=False, plugins=plugins)
    return VitBatcher(Budget(), EmbeddingCache(1 << 20), pm, **kwargs)


def test_malformed_first_call_does_not_poison_the_modality() -> None:
    """The issue's reproduction: [3, 5] first, then correct [3, 4] outputs."""
    b = batcher(Widths([5, 4, 4, 4]))
    assert b.run_step(one_item_step(1)).embeddings[0].shape == (3, 5)  # nothing to compare with
    assert len(b.cache) == 0 and b.expected_hidden_size("image") is None  # not trusted, not cached
    assert b.run_step(one_item_step(2)).embeddings[0].shape == (3, 4)  # accepted, not rejected
    assert b.run_step(one_item_step(3)).embeddings[0].shape == (3, 4)
    assert b.expected_hidden_size("image") == 4  # two calls agreed
    assert len(b.cache) == 1  # cached from then on
    again = b.run_step(one_item_step(1))  # the malformed item is encoded afresh
    assert again.stats.hits == 0 and again.embeddings[0].shape == (3, 4)


def test_engine_width_rejects_a_wrong_first_call() -> None:
    b = batcher(Widths([5, 4]), hidden_size=4)
    with pytest.raises(EncoderOutputError, match="hidden size 5 for item 1: expected 4"):
        b.run_step(one_item_step(1))
    assert len(b.cache) == 0
    assert b.run_step(one_item_step(1)).embeddings[0].shape == (3, 4)


def test_width_per_modality_and_validation() -> None:
    b = batcher(Widths([4]), hidden_size={"image": 4, "video": 8})
    assert b.expected_hidden_size("video") == 8 and b.expected_hidden_size("audio") is None
    b.run_step(one_item_step(1))
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="must be a positive int"):
            batcher(hidden_size=bad)


class NaNs:
    @hookimpl
    def vitbatch_encode_batch(self, items):
        out = [torch.zeros(item.num_tokens, HIDDEN) for item in items]
        out[-1][1, 2] = float("nan")
        return out


def test_finite_check_is_opt_in_and_names_the_item() -> None:
    chunks = [RequestChunk([make_item(1, 3, [(0, 3)]), make_item(7, 2, [(4, 2)])], Window(0, 6))]
    assert batcher(NaNs(), hidden_size=HIDDEN).run_step(chunks).embeddings[0].isnan().any()
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(NaNs(), name="nan-encoder")
    checked = VitBatcher(None, EmbeddingCache(1 << 20), pm, hidden_size=HIDDEN, check_finite=True)
    with pytest.raises(EncoderOutputError) as info:
        checked.run_step(chunks)
    assert "encoder plugin 'nan-encoder'" in str(info.value)
    assert "non-finite values (NaN/Inf) in 1 of 2 rows for item 7" in str(info.value)
    assert len(checked.cache) == 0


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def on_step(self, batcher: VitBatcher, stats: StepStats) -> None:
        self.events.append(stats.encoder_calls)

    def on_fallback(self, batcher: VitBatcher, reason: str) -> None:
        self.events.append(reason)


def test_observers_see_steps_and_fallbacks() -> None:
    b = batcher(ConcatEncoder(), hidden_size=HIDDEN)
    recorder = Recorder()
    b.observers.append(recorder)
    b.run_step(one_item_step(1))
    b.note_fallback("error")
    assert recorder.events == [1, "error"] and b.totals.fallbacks == {"error": 1}
