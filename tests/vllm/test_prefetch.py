"""Encoder prefetch in the vLLM adapter: scheduler-side planner, worker pool, both runners.

The scheduler side runs vitbatch's manager on vLLM's own ``Request`` objects
(with their inputs) and a waiting queue like the scheduler's, following the
call protocol of test_manager; the worker side runs V1's wrappers on a stand-in
runner and V2's on vLLM's real ``EncoderRunner`` (as test_v2_encoder_runner
does). test_e2e runs the real scheduler and V1 runner end to end.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from vllm.multimodal.inputs import (  # noqa: E402
    MultiModalFieldElem,
    MultiModalKwargsItem,
)
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from tests.vllm.test_manager import end_step, schedule  # noqa: E402
from tests.vllm.test_manager import make_request as manager_request  # noqa: E402
from vitbatch.adapters.vllm import (  # noqa: E402
    VllmOptions,
    surface,
    worker_v1,
)
from vitbatch.adapters.vllm.prefetch_plan import PrefetchPlanner  # noqa: E402
from vitbatch.adapters.vllm.prefetch_pool import PrefetchPool  # noqa: E402
from vitbatch.adapters.vllm.scheduler import VitBatchEncoderCacheManager as Manager  # noqa: E402
from vitbatch.core.prefetch import PrefetchLimits  # noqa: E402

WIDTH = 2
ROW_BYTES = WIDTH * 4


def content(mm_hash: str, rows: int) -> torch.Tensor:
    """What the stand-in encoder makes of an image: rows filled with a value of its hash."""
    return torch.full((rows, WIDTH), float(sum(map(ord, mm_hash))))


def kwargs_item(mm_hash: str, rows: int) -> MultiModalKwargsItem:
    from vllm.multimodal.inputs import MultiModalBatchedField

    data = content(mm_hash, rows)
    return MultiModalKwargsItem(
        {"pixel_values": MultiModalFieldElem(data=data, field=MultiModalBatchedField())}
    )


def make_request(request_id: str, items: list[tuple[str, int]], with_data: bool = True) -> Request:
    """A vLLM Request whose images (``(mm_hash, rows)``) carry their inputs."""
    return manager_request(request_id, items, kwargs_item if with_data else None)


def prefetching_manager(cache_size: int = 64, host: int = 0, **limits) -> tuple[Manager, Any]:
    limits = {"max_pool_bytes": 1 << 20, **limits}
    planner = PrefetchPlanner(PrefetchLimits(**limits), ROW_BYTES)
    manager = Manager(cache_size=cache_size, host_capacity_embeds=host, prefetch=planner)
    scheduler = SimpleNamespace(waiting=deque())
    manager.bind(scheduler)
    return manager, scheduler


def fake_encode(runner, mm_kwargs):
    """The stand-in model encoder (what ``surface.v1_encode_eagerly`` calls)."""
    runner.calls.append(len(mm_kwargs))
    if runner.fail:
        raise torch.OutOfMemoryError("injected: side stream out of memory")
    return [kwargs["pixel_values"].data.clone() for _, kwargs in mm_kwargs]


@pytest.fixture(autouse=True)
def stand_in_encoder(monkeypatch):
    monkeypatch.setattr(surface, "v1_encode_eagerly", fake_encode)


def fake_runner() -> SimpleNamespace:
    return SimpleNamespace(encoder_cache={}, device=torch.device("cpu"), calls=[], fail=False)


def worker_step(runner, freed, metadata) -> None:
    """V1's wrappers for one step: moves before vLLM frees, then (after the forward) launches."""
    output = SimpleNamespace(free_encoder_mm_hashes=list(freed), ec_manager_metadata=metadata)

    def vllm_frees(self, scheduler_output):
        for mm_hash in scheduler_output.free_encoder_mm_hashes:
            self.encoder_cache.pop(mm_hash, None)

    worker_v1.update_states(vllm_frees)(runner, output)
    worker_v1.execute_model(lambda self, out: None)(runner, output)


def abort(manager, scheduler, request) -> None:
    request.status = RequestStatus.FINISHED_ABORTED
    if request in scheduler.waiting:
        scheduler.waiting.remove(request)
    manager.free(request)


# -- options -------------------------------------------------------------------


def test_prefetch_options_are_off_by_default_and_map_to_the_limits() -> None:
    assert VllmOptions.parse({}, "t").prefetch_limits is None
    options = VllmOptions.parse(
        {"prefetch": True, "prefetch_requests": 2, "prefetch_pool_bytes": 4096}, "t"
    )
    assert options.prefetch_limits == PrefetchLimits(max_requests=2, max_pool_bytes=4096)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"prefetch": "yes"}, "prefetch in SRC: got 'yes'; expected true or false"),
        ({"prefetch_requests": 0}, "prefetch_requests in SRC: got 0; expected an integer >= 1"),
        ({"prefetch_max_cost": -1}, "prefetch_max_cost in SRC: got -1"),
        ({"prefetch_max_items": 1.5}, "prefetch_max_items in SRC: got 1.5"),
        ({"prefetch_pool_bytes": None}, "prefetch_pool_bytes in SRC: got None"),
    ],
)
def test_bad_prefetch_option_names_the_option(config, message) -> None:
    with pytest.raises(ValueError, match=message):
        VllmOptions.parse(config, "SRC")


def test_create_manager_builds_the_planner_only_when_asked(caplog) -> None:
    from tests.vllm.test_manager import fake_vllm_config

    on = Manager.create_manager(
        cache_size=10, vllm_config=fake_vllm_config({"prefetch": True, "prefetch_requests": 3})
    )
    assert on.prefetch is not None and on.prefetch.limits.max_requests == 3
    assert on.prefetch.row_bytes == 16 * 2  # hidden 16, bfloat16
    assert Manager.create_manager(cache_size=10, vllm_config=fake_vllm_config()).prefetch is None
    lora = fake_vllm_config({"prefetch": True})
    lora.lora_config = object()
    with caplog.at_level("WARNING", logger="vllm.vitbatch"):
        assert Manager.create_manager(cache_size=10, vllm_config=lora).prefetch is None
    assert "prefetch stays off: LoRA is on" in caplog.text


# -- scheduler and worker together ------------------------------------------------


def test_waiting_items_are_prefetched_then_cached_at_admission_without_budget() -> None:
    manager, scheduler = prefetching_manager()
    running = make_request("run", [("h0", 4)])
    schedule(manager, running)
    first, second = make_request("r1", [("h1", 3)]), make_request("r2", [("h2", 5), ("h0", 4)])
    scheduler.waiting.extend([first, second])
    runner = fake_runner()
    freed, metadata = end_step(manager)
    # Queue order; h0 is in vLLM's cache already (the running request's), so not prefetched.
    assert [o.mm_hash for o in metadata.prefetch] == ["h1", "h2"]
    assert metadata.prefetch_pool_bytes == 1 << 20
    worker_step(runner, freed, metadata)
    pool = runner._vitbatch_state.prefetch
    assert set(pool.entries) == {"h1", "h2"} and runner.calls == [2]
    held = pool.entries["h1"].tensor

    scheduler.waiting.popleft()
    assert schedule(manager, first, budget=0) == []  # counted as cached: no encoder budget
    assert manager.stats.prefetch_hits == 1 and manager.get_cached_input_ids(first) == {0}
    freed, metadata = end_step(manager)
    assert metadata.prefetch_consume == ("h1",) and metadata.prefetch == ()
    worker_step(runner, freed, metadata)
    assert runner.encoder_cache["h1"] is held  # handed over, no copy
    assert torch.equal(held, content("h1", 3)) and runner.calls == [2]
    assert set(pool.entries) == {"h2"}

    abort(manager, scheduler, second)  # left the queue unserved: its prefetch is released
    freed, metadata = end_step(manager)
    assert metadata.prefetch_release == ("h2",)
    worker_step(runner, freed, metadata)
    assert len(pool) == 0 and pool.stats.bytes_held == 0
    assert len(manager.prefetch.ledger) == 0 and manager.prefetch.ledger.stats.bytes_held == 0
    assert (pool.stats.prefetched, pool.stats.consumed, pool.stats.wasted) == (2, 1, 1)


def test_look_ahead_is_bounded_and_skips_what_needs_no_encoding() -> None:
    manager, scheduler = prefetching_manager(host=64, max_requests=2, max_items=2)
    old = make_request("old", [("hostonly", 4)])
    manager.host.put("hostonly", 4)  # in the host tier: restored, not prefetched
    scheduler.waiting.extend(
        [
            old,
            make_request("a", [("a1", 2), ("a1", 2)]),  # the same image twice: once
            make_request("b", [("b1", 2)]),  # beyond max_requests
        ]
    )
    _, metadata = end_step(manager)
    assert [o.mm_hash for o in metadata.prefetch] == ["a1"]
    _, metadata = end_step(manager)
    assert metadata.prefetch == ()  # held already
    scheduler.waiting.append(make_request("c", [("c1", 2)], with_data=False))
    scheduler.waiting.rotate(1)  # c first: no inputs on the scheduler (shm cache): skipped
    assert end_step(manager)[1].prefetch == ()


def test_a_second_owner_keeps_the_item_when_the_first_aborts() -> None:
    manager, scheduler = prefetching_manager()
    a, b = make_request("a", [("x", 3)]), make_request("b", [("x", 3)])
    scheduler.waiting.append(a)
    assert [o.mm_hash for o in end_step(manager)[1].prefetch] == ["x"]
    scheduler.waiting.append(b)
    end_step(manager)  # b adopts x
    abort(manager, scheduler, a)
    assert end_step(manager)[1].prefetch_release == ()
    scheduler.waiting.remove(b)
    assert schedule(manager, b, budget=0) == []
    assert end_step(manager)[1].prefetch_consume == ("x",)


def test_a_failed_prefetch_is_encoded_at_admission() -> None:
    """Out of memory on the side stream: nothing pooled; the consume becomes a missing
    input, which the step's encoder call encodes from the admitted request's inputs."""
    manager, scheduler = prefetching_manager()
    request = make_request("r", [("h", 3)])
    scheduler.waiting.append(request)
    runner = fake_runner()
    runner.fail = True
    worker_step(runner, *end_step(manager))
    state = runner._vitbatch_state
    assert len(state.prefetch) == 0 and state.prefetch.stats.cancelled == 1
    runner.fail = False
    scheduler.waiting.clear()
    assert schedule(manager, request, budget=0) == []  # the scheduler cannot know; fine
    worker_step(runner, *end_step(manager))
    assert state.missing == {"h"} and "h" not in runner.encoder_cache
    assert state.prefetch.stats.cancelled == 1  # counted once


def test_a_pool_over_its_bound_keeps_nothing_more() -> None:
    pool = PrefetchPool(capacity_bytes=3 * ROW_BYTES)
    orders = [
        SimpleNamespace(mm_hash=h, modality="image", num_embeds=n, cost=n, data=None)
        for h, n in (("a", 2), ("b", 2))
    ]
    error = pool.launch(orders, lambda todo: [content(o.mm_hash, o.num_embeds) for o in todo], None)
    assert error is None and list(pool.entries) == ["a"] and pool.stats.cancelled == 1
    missing: set[str] = set()
    cache: dict[str, torch.Tensor] = {}
    pool.consume(["a", "b"], cache, missing)
    assert set(cache) == {"a"} and missing == {"b"} and pool.stats.cancelled == 1


def test_reset_clears_the_pool_and_the_ledger() -> None:
    manager, scheduler = prefetching_manager()
    scheduler.waiting.append(make_request("r", [("h", 3)]))
    runner = fake_runner()
    worker_step(runner, *end_step(manager))
    pool = runner._vitbatch_state.prefetch
    first = pool.entries["h"].tensor
    manager.reset()
    assert len(manager.prefetch.ledger) == 0
    freed, metadata = end_step(manager)
    # Ordered again in the same step: the workers clear first, then encode it anew.
    assert metadata.reset and [o.mm_hash for o in metadata.prefetch] == ["h"]
    worker_step(runner, freed, metadata)
    assert list(pool.entries) == ["h"] and pool.entries["h"].tensor is not first
    assert pool.stats.wasted == 1 and pool.stats.bytes_held == 3 * ROW_BYTES


SIZES = {f"h{i}": size for i, size in enumerate([3, 5, 8, 2, 6, 4])}


@settings(max_examples=40, deadline=None)
@given(
    arrivals=st.lists(
        st.lists(st.lists(st.sampled_from(sorted(SIZES)), min_size=1, max_size=3), max_size=3),
        min_size=1,
        max_size=10,
    ),
    admit=st.lists(st.integers(0, 2), min_size=10, max_size=10),
    aborts=st.lists(st.integers(0, 5), max_size=4),
    cache_size=st.integers(8, 24),
    pool_rows=st.integers(2, 40),
    fails=st.sets(st.integers(0, 9), max_size=3),
)
def test_pool_mirrors_the_ledger_and_cached_means_on_the_device(
    arrivals, admit, aborts, cache_size, pool_rows, fails
) -> None:
    """Model-based: requests arrive, wait, are admitted (vLLM's protocol), finish or are
    aborted; prefetches sometimes fail. After each step the pool holds exactly what the
    ledger holds, and every input the scheduler counts as cached is on the 'device' with
    its content, or among the step's missing inputs (encoded with the step)."""
    manager, scheduler = prefetching_manager(cache_size, max_pool_bytes=pool_rows * ROW_BYTES)
    runner = fake_runner()
    running: list[Request] = []
    counter = 0
    for step, new in enumerate(arrivals):
        for hashes in new:
            counter += 1
            scheduler.waiting.append(make_request(f"r{counter}", [(h, SIZES[h]) for h in hashes]))
        scheduled = []
        for _ in range(admit[step]):
            if scheduler.waiting:
                request = scheduler.waiting.popleft()
                scheduled.append((request, schedule(manager, request)))
                running.append(request)
        if step in aborts and scheduler.waiting:
            abort(manager, scheduler, scheduler.waiting[-1])
        if running and step % 2:
            done = running.pop(0)
            done.status = RequestStatus.FINISHED_STOPPED
            manager.free(done)
        freed, metadata = end_step(manager)
        runner.fail = step in fails
        worker_step(runner, freed, metadata)
        state = runner._vitbatch_state
        for request, input_ids in scheduled:  # the step's own encoder call
            for i in input_ids:
                feature = request.mm_features[i]
                runner.encoder_cache[feature.identifier] = content(
                    feature.identifier, SIZES[feature.identifier]
                )
        for mm_hash in state.missing:
            runner.encoder_cache[mm_hash] = content(mm_hash, SIZES[mm_hash])
        state.missing.clear()
        ledger = manager.prefetch.ledger
        assert set(state.prefetch.entries) | state.prefetch._failed >= {
            str(k.hash) for k in ledger.keys()
        }
        assert set(state.prefetch.entries) <= {str(k.hash) for k in ledger.keys()}
        assert state.prefetch.stats.bytes_held <= ledger.stats.bytes_held
        for mm_hash in manager.cached:
            assert torch.equal(runner.encoder_cache[mm_hash], content(mm_hash, SIZES[mm_hash]))
    for request in [*scheduler.waiting, *running]:
        abort(manager, scheduler, request)
    worker_step(runner, *end_step(manager))
    assert len(manager.prefetch.ledger) == 0 and manager.prefetch.ledger.stats.bytes_held == 0
    assert len(runner._vitbatch_state.prefetch) == 0
    assert runner._vitbatch_state.prefetch.stats.bytes_held == 0
