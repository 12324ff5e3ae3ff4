"""Batched path == naive oracle, over thousands of random steps.

The oracle encodes every overlapping item of every request *alone* with the
reference encoder and picks rows position by position (a different algorithm
from the core's span arithmetic). Steps run in sequences on one batcher so the
cache produces partial hits, with random budgets and cache sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core.fakes import HIDDEN, ConcatEncoder, ListEncoder, encode_one, features_for, make_item
from vitbatch import hookimpl
from vitbatch.core import (
    Budget,
    EmbeddingCache,
    EncoderOutputError,
    Item,
    RequestChunk,
    VitBatcher,
    Window,
)
from vitbatch.core.errors import OutOfMemoryError
from vitbatch.core.signature import MAX_SUPPORT, Signature
from vitbatch.plugin import make_plugin_manager

STEPS_RUN = {"count": 0}


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[Item], int]:
    """One request: 0-4 items laid out with text gaps; some items split in spans."""
    position = draw(st.integers(0, 3))
    items = []
    for _ in range(draw(st.integers(0, 4))):
        hash_ = draw(st.integers(0, 5))  # small pool: duplicates across requests
        num_tokens = draw(st.sampled_from([1, 2, 3, 5, 8, 13]))
        n_spans = draw(st.integers(1, min(3, num_tokens)))
        cuts = (
            sorted(
                draw(
                    st.sets(
                        st.integers(1, num_tokens - 1), min_size=n_spans - 1, max_size=n_spans - 1
                    )
                )
            )
            if n_spans > 1
            else []
        )
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens])]
        spans = []
        for length in lengths:
            spans.append((position, length))
            position += length + draw(st.integers(0, 3))
        items.append(make_item(hash_, num_tokens, spans, cacheable=draw(st.integers(0, 5)) > 0))
        position += draw(st.integers(0, 2))
    return items, position


@st.composite
def steps(draw: st.DrawFn) -> list[RequestChunk]:
    chunks = []
    for index in range(draw(st.integers(1, 5))):
        items, length = draw(requests())
        start = draw(st.integers(0, length))
        end = draw(st.integers(start, length + 2))
        chunks.append(RequestChunk(items, Window(start, end), request_id=index))
    return chunks


def oracle(chunk: RequestChunk) -> torch.Tensor | None:
    rows = []
    for position in range(chunk.window.start, chunk.window.end):
        for item in chunk.items:
            row = 0
            for span in item.spans:
                if span.offset <= position < span.end:
                    rows.append(encode_one(item.features)[row + position - span.offset])
                row += span.length
    return torch.stack(rows) if rows else None


def check_step(batcher: VitBatcher, encoder: ConcatEncoder, chunks: list[RequestChunk]) -> None:
    encoder.calls.clear()
    result = batcher.run_step(chunks)
    STEPS_RUN["count"] += 1
    for chunk, got in zip(chunks, result.embeddings):
        expected = oracle(chunk)
        if expected is None:
            assert got is None
        else:
            assert got is not None and got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    expected_all = [e for e in (oracle(c) for c in chunks) if e is not None]
    if expected_all:
        got_all = [e for e in result.embeddings if e is not None]
        torch.testing.assert_close(torch.cat(got_all), torch.cat(expected_all))
    # Budget respected by every call; an item over budget goes alone.
    budget = batcher.budget
    for call in encoder.calls:
        if budget.max_items is not None:
            assert len(call) <= budget.max_items
        if budget.max_cost is not None and len(call) > 1:
            assert sum(item.cost for item in call) <= budget.max_cost
    # Nothing encoded twice in a step; every call is one modality.
    keys = [item.key for call in encoder.calls for item in call]
    assert len(keys) == len(set(keys))
    assert result.stats.encoder_calls == len(encoder.calls)
    assert result.stats.misses == len(keys)
    assert batcher.cache.used_bytes <= batcher.cache.capacity_bytes
    assert batcher.cache.host_used_bytes <= batcher.cache.host_capacity_bytes


budgets = st.builds(
    Budget,
    max_cost=st.one_of(st.none(), st.integers(1, 40)),
    max_items=st.one_of(st.none(), st.integers(1, 5)),
)
row_bytes = 6 * 8  # HIDDEN float64


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequence=st.lists(steps(), min_size=2, max_size=4),
    budget=budgets,
    capacity_rows=st.integers(0, 60),
    host_rows=st.sampled_from([0, 10, 200]),
    encoder_cls=st.sampled_from([ConcatEncoder, ListEncoder]),
)
def test_batched_equals_oracle(sequence, budget, capacity_rows, host_rows, encoder_cls) -> None:
    encoder = encoder_cls()
    cache = EmbeddingCache(capacity_rows * row_bytes, host_capacity_bytes=host_rows * row_bytes)
    pm = make_plugin_manager(load_entry_points=False, plugins=[encoder])
    batcher = VitBatcher(budget, cache, pm, hidden_size=HIDDEN)
    for chunks in sequence:
        check_step(batcher, encoder, chunks)


@settings(max_examples=250, deadline=None)
@given(sequence=st.lists(steps(), min_size=2, max_size=4))
def test_cache_hits_never_reencode(sequence) -> None:
    """With a roomy cache, a key encoded once for a cacheable item is never encoded again."""
    encoder = ConcatEncoder()
    pm = make_plugin_manager(False, [encoder])
    batcher = VitBatcher(Budget(), EmbeddingCache(1 << 20), pm, hidden_size=HIDDEN)
    seen = set()
    for chunks in sequence:
        check_step(batcher, encoder, chunks)
        for call in encoder.calls:
            for item in call:
                assert not item.cacheable or item.key not in seen
                if item.cacheable:
                    seen.add(item.key)


def test_enough_random_steps_ran() -> None:
    """The brief asks for >= 2,000 random steps per CI run; count them."""
    if STEPS_RUN["count"] == 0:
        import pytest

        pytest.skip("run together with the property tests above")
    assert STEPS_RUN["count"] >= 2000, STEPS_RUN["count"]


# ---------------------------------------------------------------------------
# Faulty encoders (issue 23): faults inside OOM-split sub-calls, several consistent
# bad calls in a row, dtype faults. The engine's signature is known ("both") or not.
# ---------------------------------------------------------------------------
TRUE_SIGNATURE = Signature(HIDDEN, torch.float64)
FAULT = st.sampled_from([None, None, None, "oom", "width", "width", "dtype", "rows"])


class ScriptedFaults:
    """Correct (the reference encoder) unless its script names a fault for the call."""

    def __init__(self, script: list[str | None]) -> None:
        self.script = list(script)

    @hookimpl
    def vitbatch_encode_batch(self, items: Sequence[Item]) -> list[torch.Tensor]:
        fault = self.script.pop(0) if self.script else None
        if fault == "oom" and len(items) > 1:
            raise OutOfMemoryError("injected: CUDA out of memory")
        out = [encode_one(item.features) for item in items]
        if fault == "width":  # consistently the same wrong width
            out = [torch.zeros(o.shape[0], HIDDEN + 1, dtype=o.dtype) for o in out]
        elif fault == "dtype":
            out = [o.float() for o in out]
        elif fault == "rows":
            out[-1] = out[-1][:-1]
        return out


def fresh_step(index: int) -> list[RequestChunk]:
    """One request with one item never seen before: its step makes one encoder call."""
    return [RequestChunk([make_item(1000 + index, 3, [(0, 3)])], Window(0, 3), 0)]


def check_cache_entries(batcher: VitBatcher) -> None:
    """Every entry has the trusted signature; entries of the true one hold the oracle."""
    trusted = batcher.signatures.trusted("image")
    for key, tensor in batcher.cache.peek_all():
        assert trusted is not None and Signature.of(tensor) == trusted, (key, tensor.shape)
        if trusted == TRUE_SIGNATURE:
            torch.testing.assert_close(
                tensor, encode_one(features_for(key.hash, key.num_tokens)), rtol=0, atol=0
            )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequence=st.lists(steps(), min_size=2, max_size=5),
    script=st.lists(FAULT, max_size=24),
    engine_knows=st.booleans(),
    budget=budgets,
    capacity_rows=st.integers(0, 60),
)
def test_faults_never_serve_or_cache_wrong_rows(
    sequence, script, engine_knows, budget, capacity_rows
) -> None:
    encoder = ScriptedFaults(script)
    cache = EmbeddingCache(capacity_rows * row_bytes, host_capacity_bytes=20 * row_bytes)
    pm = make_plugin_manager(load_entry_points=False, plugins=[encoder])
    signature = {"hidden_size": HIDDEN, "dtype": torch.float64} if engine_knows else {}
    batcher = VitBatcher(budget, cache, pm, **signature)
    for chunks in sequence:
        STEPS_RUN["count"] += 1
        try:
            result = batcher.run_step(chunks)
        except (EncoderOutputError, OutOfMemoryError):
            check_cache_entries(batcher)
            continue
        check_cache_entries(batcher)
        if batcher.signatures.trusted("image") == TRUE_SIGNATURE:
            for chunk, got in zip(chunks, result.embeddings):
                expected = oracle(chunk)
                assert (got is None) == (expected is None)
                if expected is not None:
                    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Never locked out: once the faults stop, steps are served with the right rows.
    encoder.script.clear()
    for index in range(MAX_SUPPORT + 2):
        try:
            batcher.run_step(fresh_step(index))
        except EncoderOutputError:
            continue
    last = batcher.run_step(fresh_step(99))
    torch.testing.assert_close(last.embeddings[0], oracle(fresh_step(99)[0]), rtol=0, atol=0)
    assert batcher.signatures.trusted("image") == TRUE_SIGNATURE
    check_cache_entries(batcher)
