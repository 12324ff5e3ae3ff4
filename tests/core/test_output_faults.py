"""Faulty encoder outputs never reach the cache, never lock a modality out (issue 23 A-C, E).

Each test is the issue's minimal reproduction against the public API; each
failed on the code before the fix (noted per test).
"""

from __future__ import annotations

import pytest
import torch

from tests.core.fakes import HIDDEN, EngineOwnedTier, encode_one, internal_sizes, make_item
from vitbatch import hookimpl
from vitbatch.core import (
    Budget,
    EmbeddingCache,
    EncoderOutputError,
    ItemKey,
    RequestChunk,
    VitBatcher,
    Window,
)
from vitbatch.core.errors import OutOfMemoryError
from vitbatch.plugin import make_plugin_manager


class Scripted:
    """Per call, the width (and dtype) of every output; multi-item calls may OOM."""

    def __init__(self, widths, *, oom_multi: bool = False, dtypes=None) -> None:
        self.widths = list(widths)
        self.dtypes = list(dtypes) if dtypes else None
        self.oom_multi = oom_multi
        self.calls = 0

    @hookimpl
    def vitbatch_encode_batch(self, items):
        if self.oom_multi and len(items) > 1:
            raise OutOfMemoryError("injected: CUDA out of memory")
        self.calls += 1
        width = self.widths.pop(0) if len(self.widths) > 1 else self.widths[0]
        dtype = torch.float32
        if self.dtypes:
            dtype = self.dtypes.pop(0) if len(self.dtypes) > 1 else self.dtypes[0]
        return [torch.full((item.num_tokens, width), float(width), dtype=dtype) for item in items]


def step_of(*hashes: int) -> list[RequestChunk]:
    return [RequestChunk([make_item(h, 3, [(0, 3)])], Window(0, 3), h) for h in hashes]


def batcher(*plugins, cache=None, **kwargs) -> VitBatcher:
    pm = make_plugin_manager(load_entry_points=False, plugins=plugins)
    return VitBatcher(Budget(), cache or EmbeddingCache(1 << 20), pm, **kwargs)


def test_a_wrong_width_from_an_oom_split_is_never_cached() -> None:
    """A: the split's first sub-call answers width 5, the next two confirm 4. Before the
    fix the whole batch was cached, the width-5 entry too, and a later step hit it."""
    b = batcher(Scripted([5, 4, 4], oom_multi=True))
    with pytest.raises(EncoderOutputError, match=r"hidden size 5, torch.float32 for item 1"):
        b.run_step(step_of(1, 2, 3))
    assert b.expected_hidden_size("image") == 4
    assert all(t.shape[-1] == 4 for _, t in b.cache.peek_all())
    again = b.run_step(step_of(1))  # encoded afresh, never the width-5 rows
    assert again.embeddings[0].shape == (3, 4)


def test_b_two_consistent_bad_calls_do_not_lock_the_modality_out() -> None:
    """B: widths 5, 5, then 4 forever. Before the fix 5 was learned and every later
    correct output was rejected for good."""
    b = batcher(Scripted([5, 5, 4]))
    for h in (1, 2):
        assert b.run_step(step_of(h)).embeddings[0].shape == (3, 5)
    assert b.expected_hidden_size("image") == 5
    rejected = 0
    for h in range(3, 40):
        try:
            result = b.run_step(step_of(h))
        except EncoderOutputError:
            rejected += 1
            continue
        assert result.embeddings[0].shape == (3, 4)
    assert 1 <= rejected <= 3  # more calls in a row than agreed on 5 replace it
    assert b.expected_hidden_size("image") == 4
    assert b.cache.peek_all() and all(t.shape[-1] == 4 for _, t in b.cache.peek_all())


def test_c_dtype_is_checked_against_the_engine() -> None:
    """C: the engine's dtype, when the adapter gives it, is checked strictly."""
    strict = batcher(Scripted([4], dtypes=[torch.float64]), hidden_size=4, dtype=torch.float32)
    with pytest.raises(EncoderOutputError, match="dtype torch.float64 for item 1: expected"):
        strict.run_step(step_of(1))
    assert len(strict.cache) == 0
    with pytest.raises(ValueError, match="dtype must be a torch.dtype"):
        batcher(dtype="bfloat16")


def test_c_dtype_is_checked_against_the_one_adopted() -> None:
    """C: before the fix the dtype was never checked: a float64 answer after float32
    ones was served and cached."""
    encoder = Scripted([4], dtypes=[torch.float32, torch.float64, torch.float32])
    adopted = batcher(encoder, hidden_size=4)
    adopted.run_step(step_of(1))  # the engine's width: its dtype is adopted
    with pytest.raises(EncoderOutputError, match="torch.float64 for items \\[2\\]"):
        adopted.run_step(step_of(2))
    adopted.run_step(step_of(3))
    assert {t.dtype for _, t in adopted.cache.peek_all()} == {torch.float32}


def test_e_no_internal_map_outlives_the_entries_the_engine_evicts() -> None:
    """E: before the fix ``EmbeddingCache._home`` kept every key ever put (20,000
    entries while the tiers held one)."""
    tier = EngineOwnedTier(4 * 3 * HIDDEN * 8)
    cache = EmbeddingCache(device_tier=tier, host_capacity_bytes=3 * HIDDEN * 8)
    for n in range(20_000):
        cache.put(ItemKey(n, 3), encode_one(torch.ones(3, 3, dtype=torch.float64)))
        tier.engine_set(ItemKey(("engine", n), 3), torch.zeros(3 * 4, HIDDEN, dtype=torch.float64))
    held = len(tier) + len(cache.host_keys())
    for name, size in {**internal_sizes(cache), **internal_sizes(cache._host)}.items():
        assert size <= held + 256, (name, size)  # 256: the arena's free-block list
