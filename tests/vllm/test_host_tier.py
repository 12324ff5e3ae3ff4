"""The vLLM worker's host tier on a :class:`~vitbatch.core.host_arena.HostArena`, and
vitbatch beside vLLM's own EC connectors.

On CPU a host tensor is kept as it is; ``block_arena`` makes the workers copy
into blocks instead (what a CUDA demotion does), so the block path runs here
too. tests/gpu/test_cuda.py checks the side stream and the absence of
synchronisation on a GPU.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("vllm")

from vllm.config import ECTransferConfig  # noqa: E402 - after the importorskip

from tests.vllm.test_manager import (  # noqa: E402
    SCHEDULER_RUNS,
    SIZES,
    assert_accounting,
    drive_steps,
    end_step,
    fake_runner,
    fake_scheduler,
    fake_vllm_config,
    make_request,
    process,
    schedule,
)
from vitbatch.adapters import vllm as adapter  # noqa: E402
from vitbatch.adapters.vllm import (  # noqa: E402
    VitBatchStepMetadata,
    scheduler_patch,
    surface,
    worker_state,
)
from vitbatch.core.host_arena import HostArena  # noqa: E402

Manager = adapter.VitBatchEncoderCacheManager
ROW_BYTES = 2 * 4  # the content below: two float32 columns per row


@pytest.fixture
def block_arena(monkeypatch):
    """Workers copy demoted host tensors into arena blocks of one row each."""

    def new(capacity_bytes: int) -> HostArena:
        return HostArena(capacity_bytes, block_bytes=ROW_BYTES, copy_host_tensors=True)

    monkeypatch.setattr(worker_state, "new_host_arena", new)


@settings(max_examples=40, deadline=None)
@given(**SCHEDULER_RUNS)
def test_block_arena_restores_equal_rows(steps, cache_size, host_capacity) -> None:
    """Scheduler manager + worker moves through arena blocks: the arena holds exactly
    what the index lists, and everything the scheduler counts as cached is on the
    'device' with its content (restored rows equal the demoted ones)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            worker_state,
            "new_host_arena",
            functools.partial(HostArena, block_bytes=ROW_BYTES, copy_host_tensors=True),
        )
        manager = Manager(cache_size=cache_size, host_capacity_embeds=host_capacity)
        runner = fake_runner()
        content = {h: torch.full((n, 2), float(i) + 0.5) for i, (h, n) in enumerate(SIZES.items())}
        for metadata in drive_steps(manager, runner, steps, content):
            assert metadata.host_capacity_embeds == host_capacity
            assert_accounting(manager)
            state = runner._vitbatch_state
            assert state.missing == set() and state.stats.demotions_not_kept == 0
            for mm_hash in manager.cached:
                assert torch.equal(runner.encoder_cache[mm_hash], content[mm_hash])
            assert set(state.host.keys()) == set(manager.host.entries)
            for mm_hash in state.host.keys():  # copied into blocks, not kept as is
                assert state.host.entry(mm_hash).tensor is None
                assert torch.equal(state.host.peek(mm_hash), content[mm_hash])


def test_restored_entry_demoted_again_is_copied_again(block_arena) -> None:
    """No host twin is kept for a restored entry: the index forgets a restored hash,
    so the arena forgets it too, and a second demotion copies the rows again."""
    runner = fake_runner()
    a = torch.randn(3, 2)
    runner.encoder_cache["a"] = a
    bound = {"host_capacity_embeds": 8}
    process(runner, ["a"], VitBatchStepMetadata(demote=("a",), **bound))
    state = runner._vitbatch_state
    assert state.host.used == 3 * ROW_BYTES
    process(runner, [], VitBatchStepMetadata(restore=("a",), **bound))
    restored = runner.encoder_cache["a"]
    assert restored is not a and torch.equal(restored, a) and state.host.used == 0
    process(runner, ["a"], VitBatchStepMetadata(demote=("a",), **bound))
    assert state.stats.demotions == 2 and torch.equal(state.host.peek("a"), a)


def test_a_lost_or_refused_copy_is_encoded_again(block_arena) -> None:
    """The arena cannot keep an entry (here: larger than the bound): not stored, and
    the scheduler's later restore is a miss, encoded again - never other rows."""
    runner = fake_runner()
    runner.encoder_cache.update(big=torch.randn(5, 2), small=torch.randn(1, 2))
    bound = {"host_capacity_embeds": 2}  # arena: 2 rows + 1/8 -> 2 one-row blocks
    process(runner, ["big", "small"], VitBatchStepMetadata(demote=("big", "small"), **bound))
    state = runner._vitbatch_state
    assert state.host.keys() == ["small"]
    assert state.stats.demotions == 1 and state.stats.demotions_not_kept == 1
    process(runner, [], VitBatchStepMetadata(restore=("big", "small"), **bound))
    assert state.missing == {"big"} and state.stats.restore_misses == 1
    assert "big" not in runner.encoder_cache and state.stats.host_restores == 1


def test_no_bound_means_no_host_tier() -> None:
    runner = fake_runner()
    runner.encoder_cache["a"] = torch.randn(3, 2)
    process(runner, ["a"], VitBatchStepMetadata(demote=("a",)))  # host_capacity_embeds=0
    state = runner._vitbatch_state
    assert len(state.host) == 0 and state.stats.demotions_not_kept == 1


def test_arena_is_the_schedulers_bound_in_bytes_plus_block_rounding() -> None:
    config = fake_vllm_config()  # hidden 16, bfloat16: 32 bytes a row
    runner = SimpleNamespace(
        encoder_cache={}, device=torch.device("cpu"), model_config=config.model_config
    )
    a = runner.encoder_cache["a"] = torch.randn(4, 16, dtype=torch.bfloat16)
    rows = 100_000
    process(runner, ["a"], VitBatchStepMetadata(demote=("a",), host_capacity_embeds=rows))
    arena = runner._vitbatch_state.host
    assert arena.capacity == rows * 32 + rows * 32 // 8 == worker_state.arena_bytes(rows, 32)
    assert arena.block_bytes % 4096 == 0 and 4096 <= arena.block_bytes <= 256 << 10
    # Host tensors are kept as they are on CPU: no pinned buffer, no copy.
    assert arena.entry("a").tensor is a
    # Another bound from the scheduler: a fresh arena at the next demotion.
    process(runner, [], VitBatchStepMetadata(host_capacity_embeds=10))
    assert len(runner._vitbatch_state.host) == 0


# -- vLLM's EC connectors -----------------------------------------------------------


def ec_config(connector: str = "ECCPUConnector") -> ECTransferConfig:
    """vLLM's own config object, as ``--ec-transfer-config`` builds it."""
    return ECTransferConfig(
        ec_connector=connector,
        ec_role="ec_both",
        ec_connector_extra_config={"ec_cpu_bytes": 1 << 30},
    )


def test_surface_reads_the_configured_ec_connector() -> None:
    config = fake_vllm_config()
    assert surface.ec_connector_name(config) is None  # a config without the field
    config.ec_transfer_config = None
    assert surface.ec_connector_name(config) is None
    config.ec_transfer_config = ECTransferConfig()  # the object, no connector named
    assert surface.ec_connector_name(config) is None
    config.ec_transfer_config = ec_config()
    assert surface.ec_connector_name(config) == "ECCPUConnector"


@pytest.mark.parametrize("connector", ["ECCPUConnector", "ECExampleConnector"])
def test_host_tier_steps_aside_for_an_ec_connector(monkeypatch, caplog, connector) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    on = fake_scheduler({"vitbatch": {"host_cache_embeds": 64}})
    on.vllm_config.ec_transfer_config = ec_config(connector)
    with caplog.at_level("INFO", logger="vllm.vitbatch"):
        assert scheduler_patch.enable_on(on)
    manager = on.encoder_cache_manager
    assert isinstance(manager, Manager) and manager.host.capacity == 0
    lines = [r.getMessage() for r in caplog.records if "steps aside" in r.getMessage()]
    assert lines == [
        f"vitbatch: vLLM's EC connector {connector} is configured (--ec-transfer-config); "
        "vitbatch's host tier steps aside (vitbatch still batches encoder calls)"
    ]
    # Nothing is demoted: an evicted entry is vLLM's (and its connector's) to handle.
    for name in ("a", "b", "c"):
        request = make_request(name, [(name, 20)])
        schedule(manager, request)
        manager.free(request)
        _, metadata = end_step(manager)
        assert metadata.demote == () and metadata.host_capacity_embeds == 0
    assert manager.stats.demotions == 0


def test_without_ec_connector_the_host_tier_stays(monkeypatch, caplog) -> None:
    monkeypatch.delenv(adapter.ENV_VAR, raising=False)
    on = fake_scheduler({"vitbatch": {"host_cache_embeds": 64}})
    on.vllm_config.ec_transfer_config = None
    with caplog.at_level("INFO", logger="vllm.vitbatch"):
        assert scheduler_patch.enable_on(on)
    assert on.encoder_cache_manager.host.capacity == 64
    assert on.encoder_cache_manager.get_manager_metadata().host_capacity_embeds == 64
    assert "steps aside" not in caplog.text


def test_vllm_parses_an_ec_cpu_connector_config() -> None:
    """The documented flag parses on this vLLM into the object vitbatch reads."""
    import json

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    flag = {
        "ec_connector": "ECCPUConnector",
        "ec_role": "ec_both",
        "ec_connector_extra_config": {"ec_cpu_bytes": 1 << 30},
    }
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--ec-transfer-config", json.dumps(flag)])
    # The parsed flag itself (EngineArgs.from_cli_args would resolve the model "m" on the hub).
    config = SimpleNamespace(ec_transfer_config=args.ec_transfer_config)
    assert surface.ec_connector_name(config) == "ECCPUConnector"
