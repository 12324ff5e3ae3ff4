"""The scheduler-side manager against vLLM's own Request objects, and the worker-side tier moves.

The scheduling loop below follows vLLM's ``Scheduler._try_schedule_encoder_inputs``
+ ``_allocate_encoder_inputs`` call protocol (check_and_update_cache, then
can_allocate, allocate after the request is scheduled, get_freed_mm_hashes and
get_manager_metadata once per step); the end-to-end test runs the real scheduler.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from vllm import SamplingParams
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.request import Request
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vitbatch.adapters import vllm as adapter
from vitbatch.adapters.vllm import (
    VitBatchStepMetadata,
    VllmOptions,
    scheduler_patch,
    surface,
    worker,
    worker_v1,
)

Manager = adapter.VitBatchEncoderCacheManager
BIG_BUDGET = 10**9


def _has_ec_manager_config() -> bool:
    from vllm.config import VllmConfig

    return "ec_manager_config" in getattr(VllmConfig, "__dataclass_fields__", {})


#: ``--ec-manager-config`` (the original switch) exists from vLLM 0.27 on.
needs_ec_manager_config = pytest.mark.skipif(
    not _has_ec_manager_config(), reason="this vLLM has no --ec-manager-config (0.27+)"
)


def make_request(
    request_id: str,
    items: list[tuple[str, int]],
    data: Callable[[str, int], Any] | None = None,
) -> Request:
    """A vLLM Request whose images are ``(mm_hash, rows)``, laid out one after another;
    ``data(mm_hash, rows)`` gives each image's inputs (none by default)."""
    features, offset = [], 5
    for mm_hash, rows in items:
        features.append(
            MultiModalFeatureSpec(
                data=data(mm_hash, rows) if data is not None else None,
                modality="image",
                identifier=mm_hash,
                mm_position=PlaceholderRange(offset=offset, length=rows),
            )
        )
        offset += rows + 3
    return Request(
        request_id=request_id,
        prompt_token_ids=[0] * (offset + 2),
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        mm_features=features,
    )


def schedule(manager, request: Request, budget: int = BIG_BUDGET) -> list[int]:
    """vLLM's per-request protocol; returns the input ids scheduled for encoding."""
    to_encode, duplicates, seen, rows = [], [], {}, 0
    for i, feature in enumerate(request.mm_features):
        if feature.identifier in seen:
            duplicates.append(i)
            continue
        if manager.check_and_update_cache(request, i):
            continue
        if not manager.can_allocate(request, i, budget, rows):
            break
        rows += request.get_num_encoder_embeds(i)
        budget -= request.get_num_encoder_embeds(i)
        seen[feature.identifier] = i
        to_encode.append(i)
    for i in to_encode:
        manager.allocate(request, i)
    for i in duplicates:
        manager.check_and_update_cache(request, i)
    return to_encode


def end_step(manager) -> tuple[list[str], VitBatchStepMetadata]:
    freed = manager.get_freed_mm_hashes()
    return freed, manager.get_manager_metadata()


def assert_accounting(manager) -> None:
    """vLLM's invariants still hold with the vitbatch additions."""
    used = sum(manager.num_embeds_by_hash[h] for h in manager.cached)
    assert manager.num_free_slots == manager.cache_size - used
    assert manager.num_freeable_slots == manager.num_free_slots + sum(manager.freeable.values())
    assert set(manager.freeable) <= set(manager.cached)
    assert not set(manager.host.entries) & set(manager.cached)
    assert manager.host.used == sum(manager.host.entries.values()) <= manager.host.capacity


def test_manager_is_vllms_encoder_cache_manager() -> None:
    assert issubclass(Manager, EncoderCacheManager)
    assert Manager.__module__ == "vitbatch.adapters.vllm.scheduler"
    # vLLM resolves it by qualified name.
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(adapter.MANAGER_QUALNAME) is Manager


@needs_ec_manager_config
def test_vllm_serve_flag_names_the_manager() -> None:
    """The documented ``--ec-manager-config`` JSON parses and resolves to the manager."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    config = {
        "encoder_cache_manager_cls": adapter.MANAGER_QUALNAME,
        "manager_config": {"max_batch_patches": 4096, "host_cache_bytes": 1 << 30},
    }
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--ec-manager-config", json.dumps(config)])
    ec_config = args.ec_manager_config  # the parser builds vLLM's EncoderCacheManagerConfig
    assert ec_config.get_encoder_cache_manager_obj() is Manager
    assert VllmOptions.parse(ec_config.manager_config, "x").max_batch_patches == 4096


def test_evicted_entry_is_demoted_then_restored_as_cached() -> None:
    manager = Manager(cache_size=10, host_capacity_embeds=100)
    first = make_request("r1", [("h1", 6)])
    assert schedule(manager, first) == [0]
    manager.free(first)
    end_step(manager)

    second = make_request("r2", [("h2", 8)])
    assert schedule(manager, second) == [0]  # evicts h1
    freed, metadata = end_step(manager)
    assert freed == ["h1"] and metadata.demote == ("h1",) and metadata.restore == ()
    assert "h1" in manager.host

    third = make_request("r3", [("h1", 6)])
    # h2 is still referenced: no room, so no restore (vLLM would wait as well).
    assert manager.check_and_update_cache(third, 0) is False
    assert manager.stats.restores_refused == 1
    manager.free(second)
    # Now the host-tier hit counts as cached: no encoder budget used, nothing to encode.
    assert schedule(manager, third, budget=0) == []
    freed, metadata = end_step(manager)
    assert metadata.restore == ("h1",) and freed == ["h2"] and metadata.demote == ("h2",)
    assert manager.stats.host_restores == 1 and manager.get_cached_input_ids(third) == {0}
    assert_accounting(manager)


@pytest.mark.parametrize("admission", ["all", "repeated"])
def test_repeated_admission_demotes_only_images_a_second_request_asked_for(admission) -> None:
    """host_admission="repeated": an image one request asked for is dropped at eviction
    (as vLLM drops it: no copy, no host memory); one asked for by two is demoted."""
    options = VllmOptions.parse({"host_admission": admission}, "t")
    manager = Manager(cache_size=12, options=options, host_capacity_embeds=100)
    first = make_request("r1", [("once", 4), ("twice", 4)])
    assert schedule(manager, first) == [0, 1]
    again = make_request("r2", [("twice", 4)])
    assert schedule(manager, again) == []  # a device-cache hit, asked by a second request
    for request in (first, again):
        manager.free(request)
    end_step(manager)
    # Retries of one request (same id) do not count as a second request.
    assert schedule(manager, make_request("r3", [("big", 12)]), budget=0) == []
    assert manager.check_and_update_cache(make_request("r3", [("big", 12)]), 0) is False
    assert schedule(manager, make_request("r3", [("big", 12)])) == [0]  # evicts both
    freed, metadata = end_step(manager)
    assert sorted(freed) == ["once", "twice"]
    if admission == "all":
        assert sorted(metadata.demote) == ["once", "twice"]
        assert manager.stats.not_admitted == 0
    else:
        assert metadata.demote == ("twice",) and "once" not in manager.host
        assert manager.stats.not_admitted == 1 and manager.stats.demotions == 1
        assert not manager._seen.repeated("big")  # one request, asked three times
        manager.free(make_request("r3", [("big", 12)]))
        manager.reset()  # forgets who asked
        assert not manager._seen.repeated("twice")


def test_native_manager_would_re_encode() -> None:
    """The same sequence with vLLM's own manager: the evicted image must be encoded again."""
    manager = EncoderCacheManager(cache_size=10)
    first = make_request("r1", [("h1", 6)])
    schedule(manager, first)
    manager.free(first)
    second = make_request("r2", [("h2", 8)])
    schedule(manager, second)
    manager.free(second)
    assert schedule(manager, make_request("r3", [("h1", 6)])) == [0]


def test_host_tier_is_a_bounded_lru() -> None:
    manager = Manager(cache_size=6, host_capacity_embeds=10)
    for step, mm_hash in enumerate(["a", "b", "c"]):
        request = make_request(f"r{step}", [(mm_hash, 6)])
        schedule(manager, request)
        manager.free(request)
        _, metadata = end_step(manager)
        if step == 1:
            assert metadata.demote == ("a",)
        if step == 2:
            # b is demoted, which pushes a out of the 10-row host tier.
            assert metadata.demote == ("b",) and metadata.drop == ("a",)
    assert list(manager.host.entries) == ["b"] and manager.stats.host_drops == 1
    assert_accounting(manager)


def test_demoted_and_dropped_in_one_step_is_never_shipped() -> None:
    manager = Manager(cache_size=12, host_capacity_embeds=6)
    for name in ("a", "b"):
        request = make_request(name, [(name, 6)])
        schedule(manager, request)
        manager.free(request)
    end_step(manager)
    big = make_request("big", [("c", 12)])
    schedule(manager, big)  # evicts a and b in one pass; the host tier holds one of them
    freed, metadata = end_step(manager)
    assert sorted(freed) == ["a", "b"]
    assert metadata.demote == ("b",) and metadata.drop == ()
    assert list(manager.host.entries) == ["b"]


def test_entry_evicted_earlier_in_the_same_pass_is_revived() -> None:
    manager = Manager(cache_size=10, host_capacity_embeds=100)
    first = make_request("r1", [("h1", 4)])
    schedule(manager, first)
    manager.free(first)
    end_step(manager)
    schedule(manager, make_request("r2", [("h2", 8)]))  # evicts h1 (worker still has it)
    assert manager.freed == ["h1"]
    manager.free(make_request("r2", [("h2", 8)]))
    assert schedule(manager, make_request("r3", [("h1", 4)])) == []  # evicts h2, takes h1 back
    freed, metadata = end_step(manager)
    assert "h1" not in freed and metadata.restore == () and manager.stats.revived == 1
    assert "h1" not in metadata.demote
    assert_accounting(manager)


def test_rows_promised_to_earlier_inputs_stay_reserved() -> None:
    manager = Manager(cache_size=10, host_capacity_embeds=100)
    old = make_request("old", [("h1", 6)])
    schedule(manager, old)
    manager.free(old)
    schedule(manager, make_request("tmp", [("h9", 10)]))  # evicts h1 into the host tier
    manager.free(make_request("tmp", [("h9", 10)]))
    end_step(manager)
    # h-new (6 rows) gets can_allocate's promise first; the host hit h1 would need 6 more.
    request = make_request("r", [("hnew", 6), ("h1", 6)])
    scheduled = schedule(manager, request)  # allocate() must not trip vLLM's assertions
    assert scheduled == [0] and manager.stats.restores_refused == 1
    assert_accounting(manager)


def test_different_row_count_is_not_restored() -> None:
    manager = Manager(cache_size=6, host_capacity_embeds=100)
    first = make_request("r1", [("h1", 6)])
    schedule(manager, first)
    manager.free(first)
    other = make_request("r2", [("h2", 6)])
    schedule(manager, other)
    manager.free(other)
    end_step(manager)
    assert "h1" in manager.host
    assert schedule(manager, make_request("r3", [("h1", 4)])) == [0]  # encoded, not restored
    assert manager.stats.host_restores == 0
    _, metadata = end_step(manager)
    assert "h1" not in manager.host and metadata.drop == ("h1",)  # the stale copy is forgotten
    assert_accounting(manager)


def test_reset_clears_the_host_tier_everywhere() -> None:
    manager = Manager(cache_size=6, host_capacity_embeds=100)
    for name in ("a", "b"):
        request = make_request(name, [(name, 6)])
        schedule(manager, request)
        manager.free(request)
    end_step(manager)
    assert len(manager.host) == 1
    manager.reset()
    _, metadata = end_step(manager)
    assert metadata.reset and len(manager.host) == 0
    assert end_step(manager)[1].reset is False


def test_options() -> None:
    options = VllmOptions.parse({"max_batch_patches": 64, "host_cache_bytes": 1000}, "t")
    assert options.budget.max_cost == 64 and options.host_capacity_embeds(10) == 100
    assert VllmOptions.parse({"host_cache_embeds": 7}, "t").host_capacity_embeds(10) == 7
    assert VllmOptions.parse({"max_batch_patches": None}, "t").budget.max_cost is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_tokens": 1}, r"in SRC: unknown key\(s\) \['max_tokens'\]; expected some of"),
        ({"max_batch_patches": 0}, "max_batch_patches in SRC: got 0; expected an integer >= 1"),
        ({"max_batch_items": -2}, "max_batch_items in SRC: got -2; expected an integer >= 1"),
        ({"max_batch_patches": "4k"}, "max_batch_patches in SRC: got '4k'"),
        ({"host_cache_bytes": -1}, "host_cache_bytes in SRC: got -1; expected an integer >= 0"),
        ({"host_cache_bytes": None}, "host_cache_bytes in SRC: got None"),
        ({"check_finite": "yes"}, "check_finite in SRC: got 'yes'; expected true or false"),
        ({"host_admission": "twice"}, r"host_admission in SRC: got 'twice'; expected one of"),
        ([1, 2], "in SRC: expected a JSON object"),
    ],
)
def test_bad_option_names_option_source_and_what_is_allowed(config, message) -> None:
    with pytest.raises(ValueError, match=message):
        VllmOptions.parse(config, "SRC")


def _patched() -> bool:
    return hasattr(GPUModelRunner._execute_mm_encoder, "__vitbatch_original__")


def test_register_is_idempotent_and_wraps_only_the_scheduler_and_config() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.scheduler import Scheduler

    worker.uninstall_worker_patches()
    adapter.register()
    adapter.register()
    assert not _patched()
    for method in (Scheduler.__init__, EngineArgs.create_engine_config):
        assert hasattr(method, "__vitbatch_original__")
        assert not hasattr(method.__vitbatch_original__, "__vitbatch_original__")


def test_metadata_arriving_in_a_worker_installs_the_patch_once() -> None:
    worker.uninstall_worker_patches()
    metadata = pickle.loads(pickle.dumps(VitBatchStepMetadata(restore=("x",))))
    assert metadata.restore == ("x",) and _patched()
    original = GPUModelRunner._execute_mm_encoder.__vitbatch_original__
    worker.install_worker_patches()
    assert GPUModelRunner._execute_mm_encoder.__vitbatch_original__ is original


def test_metadata_travels_on_versions_without_ec_manager_metadata() -> None:
    """vLLM 0.26's SchedulerOutput has no field for it: an attribute, pickled along."""
    from vitbatch.adapters.vllm import metadata as transport

    output = SimpleNamespace(free_encoder_mm_hashes=[])
    transport.attach(output, VitBatchStepMetadata(demote=("d",)))
    assert pickle.loads(pickle.dumps(output)).vitbatch_metadata.demote == ("d",)
    carried = SimpleNamespace(ec_manager_metadata=VitBatchStepMetadata(drop=("x",)))
    transport.attach(carried, VitBatchStepMetadata(drop=("y",)))  # vLLM's own route wins
    assert transport.read(carried).drop == ("x",) and not hasattr(carried, "vitbatch_metadata")
    assert transport.read(SimpleNamespace(ec_manager_metadata=None)) is None


# -- worker side -------------------------------------------------------------


def fake_runner() -> SimpleNamespace:
    return SimpleNamespace(encoder_cache={}, device=torch.device("cpu"))


def _vllm_frees(runner, scheduler_output) -> None:
    """What vLLM's ``_update_states`` does with the encoder cache (the rest needs a model)."""
    for mm_hash in scheduler_output.free_encoder_mm_hashes:
        runner.encoder_cache.pop(mm_hash, None)


def process(runner, freed, metadata) -> None:
    """vitbatch's V1 ``_update_states`` wrapper around vLLM's freeing."""
    worker_v1.update_states(_vllm_frees)(
        runner, SimpleNamespace(free_encoder_mm_hashes=list(freed), ec_manager_metadata=metadata)
    )


def test_worker_without_vitbatch_metadata_frees_like_vllm() -> None:
    worker.install_worker_patches()
    runner = fake_runner()
    runner.encoder_cache.update(a=torch.ones(2, 2), b=torch.ones(2, 2))
    process(runner, ["a"], None)
    assert list(runner.encoder_cache) == ["b"] and not hasattr(runner, "_vitbatch_state")


def step_metadata(**kwargs) -> VitBatchStepMetadata:
    """A step's metadata with a host tier (the scheduler ships its bound in rows)."""
    return VitBatchStepMetadata(host_capacity_embeds=64, **kwargs)


def test_worker_mirrors_demote_restore_drop() -> None:
    runner = fake_runner()
    a = torch.randn(3, 4)
    runner.encoder_cache.update(a=a, b=torch.randn(2, 4))
    process(runner, ["a", "b"], step_metadata(demote=("a",)))
    assert runner.encoder_cache == {} and runner._vitbatch_state.host.keys() == ["a"]
    process(runner, [], step_metadata(restore=("a",)))
    assert torch.equal(runner.encoder_cache["a"], a) and len(runner._vitbatch_state.host) == 0
    process(runner, ["a"], step_metadata(demote=("a",)))
    process(runner, [], step_metadata(drop=("a",)))
    assert len(runner._vitbatch_state.host) == 0
    assert runner._vitbatch_state.stats.host_drops == 1
    process(runner, [], step_metadata(restore=("a",)))
    assert runner._vitbatch_state.missing == {"a"}  # re-encoded by _execute_mm_encoder


SIZES = {f"h{i}": size for i, size in enumerate([3, 5, 8, 2, 6, 4, 7])}
SCHEDULER_RUNS = {
    "steps": st.lists(
        st.tuples(
            st.lists(st.lists(st.sampled_from(sorted(SIZES)), min_size=1, max_size=3), max_size=3),
            st.lists(st.integers(0, 7), max_size=3),
        ),
        min_size=1,
        max_size=12,
    ),
    "cache_size": st.integers(8, 20),
    "host_capacity": st.integers(0, 20),
}
"""Steps of (requests' item sizes, finished requests) against a cache and host bound."""


@settings(max_examples=60, deadline=None)
@given(**SCHEDULER_RUNS)
def test_worker_always_holds_what_the_scheduler_counts_as_cached(
    steps, cache_size, host_capacity
) -> None:
    """Model-based: scheduler manager + the worker's tier moves; every cached hash is on the
    'device' with its content."""
    manager = Manager(cache_size=cache_size, host_capacity_embeds=host_capacity)
    runner = fake_runner()
    content = {h: torch.full((n, 2), float(i)) for i, (h, n) in enumerate(SIZES.items())}
    for _metadata in drive_steps(manager, runner, steps, content):
        assert_accounting(manager)
        assert runner._vitbatch_state.missing == set()
        for mm_hash in manager.cached:
            assert torch.equal(runner.encoder_cache[mm_hash], content[mm_hash])
        assert set(runner._vitbatch_state.host.keys()) == set(manager.host.entries)


def drive_steps(
    manager: Manager,
    runner: Any,
    steps: list[tuple[list[list[str]], list[int]]],
    content: dict[str, torch.Tensor],
) -> Iterator[Any]:
    """Run SCHEDULER_RUNS ``steps`` through the scheduler manager and the worker's moves,
    yielding each step's metadata once the encoder ran (after the frees, as in vLLM);
    requests finish after the caller's checks of that step."""
    live: list[Request] = []
    counter = 0
    for new, finish in steps:
        scheduled = []
        for hashes in new:
            counter += 1
            request = make_request(f"r{counter}", [(h, SIZES[h]) for h in hashes])
            scheduled.append((request, schedule(manager, request)))
            live.append(request)
        freed, metadata = end_step(manager)
        process(runner, freed, metadata)
        for request, input_ids in scheduled:  # the encoder runs after the frees
            for i in input_ids:
                mm_hash = request.mm_features[i].identifier
                runner.encoder_cache[mm_hash] = content[mm_hash].clone()
        yield metadata
        for index in sorted(set(finish), reverse=True):
            if index < len(live):
                manager.free(live.pop(index))


def fake_vllm_config(manager_config=None, *, v2=False, encoder_decoder=False) -> SimpleNamespace:
    return SimpleNamespace(
        ec_manager_config=SimpleNamespace(
            encoder_cache_manager_cls=adapter.MANAGER_QUALNAME, manager_config=manager_config or {}
        ),
        model_config=SimpleNamespace(
            is_encoder_decoder=encoder_decoder, get_hidden_size=lambda: 16, dtype=torch.bfloat16
        ),
        use_v2_model_runner=v2,
    )


def test_create_manager_sizes_the_host_tier_from_bytes() -> None:
    manager = Manager.create_manager(
        cache_size=100, vllm_config=fake_vllm_config({"host_cache_bytes": 3200})
    )
    assert isinstance(manager, Manager) and manager.cache_size == 100
    assert manager.host.capacity == 100  # 3200 bytes / (16 hidden * 2 bytes)
    assert _patched()


def test_create_manager_leaves_encoder_decoder_models_to_vllm() -> None:
    from vllm.v1.core.encoder_cache_manager import EncoderDecoderCacheManager

    v2 = Manager.create_manager(cache_size=10, vllm_config=fake_vllm_config(v2=True))
    assert isinstance(v2, Manager)  # Model Runner V2 is driven too
    encdec = Manager.create_manager(
        cache_size=10, vllm_config=fake_vllm_config(encoder_decoder=True)
    )
    assert type(encdec) is EncoderDecoderCacheManager
    with pytest.raises(ValueError, match="unknown key"):
        Manager.create_manager(cache_size=10, vllm_config=fake_vllm_config({"nope": 1}))


def test_old_option_name_is_an_alias_with_a_warning(caplog) -> None:
    with caplog.at_level("WARNING", logger="vllm.vitbatch"):
        options = VllmOptions.parse({"max_batch_tokens": 512}, "t")
    assert options.max_batch_patches == 512
    assert "max_batch_tokens is now max_batch_patches" in caplog.text
    with pytest.raises(ValueError, match="give max_batch_patches only"):
        VllmOptions.parse({"max_batch_tokens": 512, "max_batch_patches": 256}, "t")


# -- the switch ----------------------------------------------------------------


def fake_scheduler(additional_config=None) -> SimpleNamespace:
    config = fake_vllm_config()
    config.ec_manager_config = None
    config.additional_config = additional_config or {}
    return SimpleNamespace(vllm_config=config, encoder_cache_manager=EncoderCacheManager(32))


def test_additional_config_switches_vitbatch_on(monkeypatch) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    off = fake_scheduler()
    assert (
        not scheduler_patch.enable_on(off)
        and type(off.encoder_cache_manager) is EncoderCacheManager
    )
    on = fake_scheduler({"vitbatch": {"max_batch_patches": 2048, "host_cache_embeds": 9}})
    assert scheduler_patch.enable_on(on)
    manager = on.encoder_cache_manager
    assert isinstance(manager, Manager) and manager.cache_size == 32 and manager.host.capacity == 9
    assert manager.get_manager_metadata().max_batch_patches == 2048
    assert scheduler_patch.enable_on(on) and on.encoder_cache_manager is manager  # idempotent
    assert not scheduler_patch.enable_on(fake_scheduler({"vitbatch": False}))


def test_environment_switch(monkeypatch) -> None:
    monkeypatch.setenv(adapter.ENV_VAR, '{"max_batch_items": 3}')
    on = fake_scheduler()
    assert scheduler_patch.enable_on(on)
    assert on.encoder_cache_manager.options.max_batch_items == 3
    monkeypatch.setenv(adapter.ENV_VAR, "1")
    assert scheduler_patch.enable_on(fake_scheduler())
    monkeypatch.setenv(adapter.ENV_VAR, "{oops")
    with pytest.raises(ValueError, match="VITBATCH_VLLM='{oops' is not JSON"):
        scheduler_patch.enable_on(fake_scheduler())


def test_bad_option_stops_start_up_naming_the_option(monkeypatch) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match='max_batch_patches in --additional-config "vitbatch"'):
        scheduler_patch.enable_on(fake_scheduler({"vitbatch": {"max_batch_patches": -5}}))


def test_missing_engine_surface_leaves_vllm_alone_with_one_line(monkeypatch, caplog) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    report = surface.SurfaceReport(
        "9.9", {"scheduler": ("EncoderCacheManager().freeable",), "runner_v1": (), "runner_v2": ()}
    )
    monkeypatch.setattr(surface, "check", lambda: report)
    on = fake_scheduler({"vitbatch": {}})
    with caplog.at_level("WARNING", logger="vllm.vitbatch"):
        assert not scheduler_patch.enable_on(on)
    assert type(on.encoder_cache_manager) is EncoderCacheManager
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "vitbatch: off, vLLM runs unchanged: vLLM 9.9 lacks EncoderCacheManager().freeable "
        "(needed for vitbatch's scheduler)"
    ]


def test_installed_vllm_has_the_whole_surface() -> None:
    report = surface.check()
    assert report.missing == {"config": (), "scheduler": (), "runner_v1": (), "runner_v2": ()}, (
        report
    )
