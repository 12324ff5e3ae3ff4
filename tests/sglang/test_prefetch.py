"""Encoder prefetch on CPU with the real SGLang: waiting ``Req``s, SGLang's own step.

A small loop plays the order of ``Scheduler.event_loop_normal`` (admit from
``waiting_queue`` → ``run_batch``: the forward, whose multimodal step is SGLang's
``get_embedding_and_mask`` with vitbatch's hook → the AFTER hook on ``run_batch``);
``test_prefetch_loop.py`` checks that order on SGLang's real event loops. On CPU the
prefetch runs inline (no side stream), through the same code.
"""

from __future__ import annotations

import logging
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
from sglang.srt.sampling.sampling_params import SamplingParams

from tests.sglang.conftest import (
    KEYS_BY_TOKEN_COUNT,
    FakeEncoder,
    ItemSpec,
    Modality,
    mm_schedule,
    padding,
    padding_values,
)
from tests.sglang.test_shared_cache import active
from vitbatch.adapters import sglang as adapter
from vitbatch.adapters.sglang.items import item_key
from vitbatch.adapters.sglang.loop import after_iteration
from vitbatch.core.items import ItemKey
from vitbatch.core.prefetch import PrefetchLimits

CACHE = 1 << 20


@dataclass
class TowerEncoder(FakeEncoder):
    """A model whose vision tower says its dtype: the signature is trusted from the start."""

    visual: torch.nn.Module = field(
        default_factory=lambda: torch.nn.Linear(1, 1, dtype=torch.float64)
    )
    fail: Callable[[list], BaseException | None] = lambda items: None

    def __call__(self, items):
        error = self.fail(items)
        if error is not None:
            self.calls.append(["raised", *items])
            raise error
        return super().__call__(items)


def hashes(encoder: FakeEncoder) -> list[list[int]]:
    return [[i.hash for i in call if i != "raised"] for call in encoder.calls]


def request(rid: str, *specs: ItemSpec, length: int = 30) -> Req:
    """A waiting ``Req`` as the scheduler holds it: items hashed, laid out, features on the host."""
    req = Req(rid, "", array("i", [1] * length), SamplingParams())
    req.multimodal_inputs = MultimodalInputs(mm_items=[spec.build() for spec in specs])
    req.test_length = length
    return req


def image(hash_: int, start: int, tokens: int = 4) -> ItemSpec:
    if not KEYS_BY_TOKEN_COUNT:  # one layout per hash where SGLang keys by hash alone
        tokens = 2 + hash_ % 5
    return ItemSpec(hash_, Modality.IMAGE, [(start, start + tokens - 1)])


def forward(reqs: Sequence[Req], windows: Sequence[tuple[int, int]], encoder) -> list:
    """The multimodal step of one batch: SGLang's ``get_embedding_and_mask`` per modality,
    over each request's own items, as ``embed_mm_inputs`` calls it."""
    outputs = []
    for modality in (Modality.IMAGE, Modality.AUDIO):
        items, sizes, offsets, ids = [], [0], [], []
        for req, (start, extend) in zip(reqs, windows):
            own = [i for i in req.multimodal_inputs.mm_items if i.modality == modality]
            tokens = [5 + p % 50 for p in range(req.test_length)]
            for item in req.multimodal_inputs.mm_items:
                for a, b in item.offsets:
                    tokens[a : b + 1] = padding(item, b - a + 1)
            ids.extend(tokens[start : start + extend])
            items.extend(own)
            sizes.append(len(items))
            offsets.append([run for item in own for run in item.offsets])
        if not items:
            continue
        pads = sorted({v for item in items for v in padding_values(item)})
        embedding, mask, _ = mm_schedule.get_embedding_and_mask(
            encoder,
            items,
            torch.tensor(pads, dtype=torch.int64),
            torch.tensor(ids, dtype=torch.int64),
            sizes,
            [w[0] for w in windows],
            [w[1] for w in windows],
            offsets,
        )
        outputs.append((modality, embedding, mask))
    return outputs


def serve(queue: list[Req], encoder, admit: int = 1, chunk: int | None = None, between=None):
    """Play the scheduler: admit ``admit`` requests when none is running, prefill them in
    chunks of ``chunk`` tokens, one forward per iteration, then the AFTER hook."""
    scheduler = SimpleNamespace(waiting_queue=list(queue))
    running: list[Req] = []
    done: dict[str, int] = {}
    steps = []
    while scheduler.waiting_queue or running:
        if not running:
            running = scheduler.waiting_queue[:admit]
            del scheduler.waiting_queue[:admit]
        windows = []
        for req in running:
            start = done.get(req.rid, 0)
            windows.append((start, min(chunk or req.test_length, req.test_length - start)))
        steps.append(forward(running, windows, encoder))
        for req, (start, extend) in zip(running, windows):
            done[req.rid] = start + extend
        running = [r for r in running if done[r.rid] < r.test_length]
        after_iteration(None, scheduler, running)  # run_batch's AFTER hook
        if between is not None:
            between(scheduler)
    after_iteration(None, scheduler)  # the next iteration has no batch: on_idle's
    return steps


def assert_same_steps(expected, got) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert [m for m, _, _ in a] == [m for m, _, _ in b]
        for (_, ea, ma), (_, eb, mb) in zip(a, b):
            assert (ea is None, ma is None) == (eb is None, mb is None)
            if ea is not None:
                torch.testing.assert_close(eb, ea, rtol=0, atol=0)
            if ma is not None:
                assert torch.equal(ma, mb)


def prefetching(**limits) -> adapter.AdapterState:
    state = adapter.reset_state(adapter.Settings(enabled=True, prefetch=True))
    assert state.prefetcher is not None
    if limits:
        state.prefetcher.limits = PrefetchLimits(**limits)
    return state


def native(queue_factory, **kwargs):
    return serve(queue_factory(), FakeEncoder(), **kwargs)


def queue_a() -> list[Req]:
    return [
        request("r0", image(11, 2), image(12, 10)),
        request("r1", image(21, 1), image(22, 12)),
        request("r2", image(31, 3), image(11, 15)),
        request("r3", image(41, 5)),
    ]


# ---------------------------------------------------------------------------


def test_waiting_items_are_prefetched_and_the_step_encodes_nothing_else(native_and_plugin):
    original, patched = native_and_plugin
    with active(original, CACHE):
        expected = native(queue_a)
    state = prefetching()
    encoder = TowerEncoder()
    with active(patched, CACHE):
        got = serve(queue_a(), encoder)
    assert_same_steps(expected, got)
    # r0's step encodes its own items; the tick after it encodes every other waiting item
    # (11 is cached already); r1, r2 and r3 then find all theirs in the cache.
    assert hashes(encoder) == [[11, 12], [21, 22, 31, 41]]
    stats = state.prefetcher.ledger.stats
    assert (stats.prefetched, stats.consumed, stats.wasted, stats.cancelled) == (4, 4, 0, 0)
    assert (
        stats.bytes_held == 0 and not state.prefetcher.pending and len(state.prefetcher.ledger) == 0
    )
    assert state.batcher.totals.encoder_calls == 1  # the step's own calls: r0's only


def test_look_ahead_and_pool_bounds(native_and_plugin):
    _, patched = native_and_plugin
    prefetching(max_requests=1)
    encoder = TowerEncoder()
    with active(patched, CACHE):
        serve(queue_a(), encoder)
    assert hashes(encoder) == [[11, 12], [21, 22], [31], [41]]  # one request ahead at a time
    row = 8 * 8  # HIDDEN float64
    prefetching(max_pool_bytes=image(21, 1).tokens * row)
    encoder = TowerEncoder()
    with active(patched, CACHE):
        serve(queue_a(), encoder)
    assert hashes(encoder)[1] == [21]  # 22 does not fit beside it


@pytest.mark.parametrize("seed", range(4))
def test_differential_with_and_without_prefetch(native_and_plugin, seed):
    """Random queues (shared images, audio beside images, chunked prefill, several admitted
    at once): every step's embeddings equal SGLang's own, with and without prefetch."""
    original, patched = native_and_plugin
    rng = random.Random(seed)
    layout = []
    for r in range(rng.randint(4, 8)):
        position, specs = 0, []
        for _ in range(rng.randint(0, 4)):
            modality = rng.choice([Modality.IMAGE, Modality.IMAGE, Modality.AUDIO])
            hash_ = rng.randint(1, 12) * 10 + (modality == Modality.AUDIO)
            tokens = 2 + hash_ % 2 if not KEYS_BY_TOKEN_COUNT else rng.choice([2, 3])
            position += rng.randint(0, 3)
            specs.append(ItemSpec(hash_, modality, [(position, position + tokens - 1)]))
            position += tokens
        layout.append((f"r{r}", specs, position + rng.randint(1, 4)))
    admit, chunk = rng.choice([1, 2]), rng.choice([None, 5])

    def queue():
        return [request(rid, *specs, length=length) for rid, specs, length in layout]

    with active(original, CACHE):
        expected = serve(queue(), FakeEncoder(), admit=admit, chunk=chunk)
    adapter.reset_state(adapter.Settings(enabled=True))
    with active(patched, CACHE):
        plain = serve(queue(), TowerEncoder(), admit=admit, chunk=chunk)
    state = prefetching()
    with active(patched, CACHE):
        ahead = serve(queue(), TowerEncoder(), admit=admit, chunk=chunk)
    assert_same_steps(expected, plain)
    assert_same_steps(expected, ahead)
    stats = state.prefetcher.ledger.stats
    assert state.fallbacks == 0 and stats.bytes_held == 0 and stats.consumed > 0


def test_aborted_requests_leave_nothing_behind(native_and_plugin):
    _, patched = native_and_plugin
    state = prefetching()
    prefetcher = state.prefetcher
    aborted: list[str] = []

    def abort(scheduler):  # after the first tick: r1 aborted, then r2 (which shares 11 with r0)
        if not aborted:
            scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if r.rid != "r1"]
            aborted.append("r1")
        elif len(aborted) == 1:
            assert ItemKey(21, image(21, 1).tokens) not in prefetcher.pending
            scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if r.rid != "r3"]
            aborted.append("r3")

    encoder = TowerEncoder()
    queue = queue_a()
    with active(patched, CACHE):
        serve(queue, encoder, between=abort)
        cached = {key for key, _ in state.batcher.cache.peek_all()}
    stats = prefetcher.ledger.stats
    for req in (queue[1], queue[3]):  # nothing of theirs is held, in the pool or the cache
        for item in req.multimodal_inputs.mm_items:
            assert item_key(item) not in prefetcher.pending and item_key(item) not in cached
    assert (stats.prefetched, stats.consumed, stats.wasted) == (4, 1, 3)
    assert stats.bytes_held == 0 and not prefetcher.pending and len(prefetcher.ledger) == 0


def test_a_failing_prefetch_encoder_call_changes_no_output(native_and_plugin, caplog):
    original, patched = native_and_plugin
    with active(original, CACHE):
        expected = native(queue_a)
    state = prefetching()
    seen: set[int] = set()

    def fail_once(items):  # the prefetch call (items of r1..r3) fails with a device OOM
        if any(i.hash == 21 for i in items) and 21 not in seen:
            seen.add(21)
            return torch.OutOfMemoryError("CUDA out of memory (test)")
        return None

    encoder = TowerEncoder(fail=fail_once)
    with caplog.at_level(logging.WARNING, logger="vitbatch.sglang"), active(patched, CACHE):
        got = serve(queue_a(), encoder)
    assert_same_steps(expected, got)
    stats = state.prefetcher.ledger.stats
    # cancelled, r1's step encodes its own; the next tick prefetches r2's and r3's again
    assert (stats.prefetched, stats.cancelled, stats.consumed) == (6, 4, 2)
    assert hashes(encoder) == [[11, 12], [21, 22, 31, 41], [21, 22], [31, 41]]
    assert encoder.calls[1][0] == "raised" and state.fallbacks == 0
    assert sum("prefetch encoder call failed" in r.getMessage() for r in caplog.records) == 1


def test_unexpected_faults_turn_prefetch_off_for_the_iteration(native_and_plugin, caplog):
    original, patched = native_and_plugin
    with active(original, CACHE):
        expected = native(queue_a)
    state = prefetching()

    class BrokenPool(dict):
        def pop(self, *args):
            raise RuntimeError("pool broke")

    state.prefetcher.pending = BrokenPool()  # every claim at a step fails
    with caplog.at_level(logging.WARNING, logger="vitbatch.sglang"), active(patched, CACHE):
        after_iteration(None, SimpleNamespace(), None)  # a scheduler without a waiting_queue
        got = serve(queue_a(), TowerEncoder())
    assert_same_steps(expected, got)
    messages = [r.getMessage() for r in caplog.records if "prefetch failed" in r.getMessage()]
    assert len(messages) == len(set(messages)) == 3  # once per place and error type
    assert "in its tick (AttributeError" in messages[0] and "in its step" in messages[1]
    assert state.fallbacks == 0  # vitbatch's step served every step, without the prefetch


def test_prefetch_is_off_by_default_and_needs_vitbatch_on():
    assert adapter.reset_state(adapter.Settings(enabled=True)).prefetcher is None
    with pytest.raises(ValueError, match="--vit-batch-prefetch / VITBATCH_PREFETCH=1 needs"):
        adapter.Settings.from_env({"VITBATCH_PREFETCH": "1"})
    with pytest.raises(
        ValueError, match="--vit-batch-prefetch-pool-mb / VITBATCH_PREFETCH_POOL_MB"
    ):
        adapter.Settings.from_env(
            {"VITBATCH_ENABLE": "1", "VITBATCH_PREFETCH": "1", "VITBATCH_PREFETCH_POOL_MB": "0"}
        )
    settings = adapter.Settings.from_env(
        {"VITBATCH_ENABLE": "1", "VITBATCH_PREFETCH": "on", "VITBATCH_PREFETCH_REQUESTS": "2"}
    )
    assert settings.prefetch_limits() == PrefetchLimits(max_requests=2)
    assert adapter.Settings.from_env(settings.to_env()) == settings


def test_prefetch_counters_are_exported():
    from vitbatch import metrics

    state = prefetching()
    state.prefetcher.ledger.stats.prefetched = 3
    state.prefetcher.ledger.stats.bytes_held = 64
    counters, gauges = metrics.values_of(state.batcher, None, lambda: state.prefetcher.ledger.stats)
    assert counters["vitbatch_prefetched"] == 3 and gauges["vitbatch_prefetch_bytes"] == 64
    assert {"vitbatch_prefetch_consumed", "vitbatch_prefetch_wasted"} <= set(counters)


def test_off_at_attention_tp_above_one(monkeypatch, caplog):
    """Encoder calls are collectives there: a side-stream call could order them differently."""
    from vitbatch.adapters.sglang import state as adapter_state

    monkeypatch.setattr(adapter_state, "_agree_group", lambda: object())
    monkeypatch.setattr(adapter_state, "group_agree", lambda group: lambda tensor: tensor)
    with caplog.at_level(logging.WARNING, logger="vitbatch.sglang"):
        state = adapter.reset_state(adapter.Settings(enabled=True, prefetch=True))
    assert state.prefetcher is None
    assert any("prefetch is off at attention-TP" in r.getMessage() for r in caplog.records)


def test_items_the_step_would_not_look_up_by_key_are_not_prefetched():
    from vitbatch.adapters.sglang import surface

    plain = image(51, 2).build()
    assert surface.prefetchable(plain)
    precomputed = image(52, 2).build()
    precomputed.precomputed_embeddings = torch.zeros(4, 8)
    unhashed = image(53, 2).build()
    unhashed.hash = None
    no_tensor = image(54, 2).build()
    no_tensor.feature = [1, 2, 3]
    assert not any(map(surface.prefetchable, (precomputed, unhashed, no_tensor)))


def test_a_shared_image_outlives_the_abort_of_one_of_its_requests(native_and_plugin):
    _, patched = native_and_plugin
    state = prefetching()
    queue = [
        request("r0", image(11, 2), image(12, 10)),
        request("r1", image(21, 1), image(61, 12)),
        request("r3", image(41, 5)),
        request("r2", image(61, 3), image(31, 15)),  # 61 too: it shares r1's prefetch
    ]

    def abort_r1(scheduler):
        scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if r.rid != "r1"]

    encoder = TowerEncoder()
    with active(patched, CACHE):
        serve(queue, encoder, between=abort_r1)
    assert hashes(encoder) == [[11, 12], [21, 61, 41, 31]]  # 61 was never encoded again
    stats = state.prefetcher.ledger.stats
    assert (stats.prefetched, stats.consumed, stats.wasted, stats.bytes_held) == (4, 3, 1, 0)
