"""Model Runner V2's real ``EncoderRunner`` (installed vllm) routed through vitbatch, on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
encoder_runner = pytest.importorskip("vllm.v1.worker.gpu.mm.encoder_runner")

from vllm.multimodal.inputs import (  # noqa: E402 - after the importorskip
    MultiModalBatchedField,
    MultiModalFieldElem,
    MultiModalKwargsItem,
)

from vitbatch.adapters import vllm_v2  # noqa: E402
from vitbatch.core import Budget  # noqa: E402

HIDDEN = 8


class TinyTower(torch.nn.Module):
    """A seeded linear 'encoder': one output row per input patch row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, HIDDEN)
        self.calls: list[int] = []

    def embed_multimodal(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append(pixel_values.shape[0])
        return list(self.proj(pixel_values))


def _item(seed: int) -> MultiModalKwargsItem:
    data = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    return MultiModalKwargsItem(
        {"pixel_values": MultiModalFieldElem(data=data, field=MultiModalBatchedField())}
    )


def _runner(features: dict[str, list]) -> object:
    runner = object.__new__(encoder_runner.EncoderRunner)
    runner.model = TinyTower()
    runner.device = torch.device("cpu")
    runner.cudagraph_manager = None
    runner.encoder_cache = SimpleNamespace(mm_features=features, encoder_outputs={})
    return runner


def _feature(identifier: str, item: MultiModalKwargsItem) -> SimpleNamespace:
    return SimpleNamespace(
        identifier=identifier,
        modality="image",
        data=item,
        mm_position=SimpleNamespace(get_num_embeds=lambda: 3),
    )


@pytest.fixture
def patched():
    assert vllm_v2.install_v2_patch()
    yield
    vllm_v2.uninstall_v2_patch()


def _features(n_requests: int, per_request: int) -> dict[str, list]:
    return {
        f"r{r}": [_feature(f"h{r}-{i}", _item(10 * r + i)) for i in range(per_request)]
        for r in range(n_requests)
    }


def test_v2_outputs_equal_vllm_and_are_micro_batched(patched, monkeypatch) -> None:
    features = _features(3, 2)
    scheduled = {req: list(range(2)) for req in features}
    runner = _runner(features)
    monkeypatch.setattr(vllm_v2, "DEFAULT_BUDGET", Budget(6, 2))  # 2 items (3 rows each) per call
    _, kwargs = runner.prepare_mm_inputs(scheduled)
    got = runner.execute_mm_encoder(kwargs)
    original = encoder_runner.EncoderRunner.execute_mm_encoder.__vitbatch_original__
    want = original(_runner(features), kwargs)
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert runner.model.calls == [2, 2, 2]  # budgeted micro-batches across requests
    stats = runner._vitbatch_v2.stats
    assert (stats.steps, stats.items, stats.encoder_calls, stats.fallbacks) == (1, 6, 3, 0)


def test_v2_falls_back_to_vllm_on_error(patched) -> None:
    features = _features(2, 1)
    runner = _runner(features)
    _, kwargs = runner.prepare_mm_inputs({req: [0] for req in features})
    # A wrong embedding count: vitbatch's validation fails, vLLM's own path serves the step.
    runner._vitbatch_v2.pending = [(h, 5, k) for h, _, k in runner._vitbatch_v2.pending]
    got = runner.execute_mm_encoder(kwargs)
    assert [tuple(t.shape) for t in got] == [(3, HIDDEN), (3, HIDDEN)]
    assert runner._vitbatch_v2.stats.fallbacks == 1
    assert runner._vitbatch_v2.stats.reasons == {"error": 1}


def test_v2_hands_graph_steps_to_vllm(patched) -> None:
    features = _features(1, 2)
    runner = _runner(features)
    runner.cudagraph_manager = SimpleNamespace(is_captured=lambda: False)
    _, kwargs = runner.prepare_mm_inputs({"r0": [0, 1]})
    assert len(runner.execute_mm_encoder(kwargs)) == 2
    assert runner._vitbatch_v2.stats.graph_steps == 1
    assert runner._vitbatch_v2.stats.steps == 0


def test_unrecorded_call_runs_vllm(patched) -> None:
    runner = _runner({})
    kwargs = [("image", _item(1))]
    assert len(runner.execute_mm_encoder(kwargs)) == 1
    assert runner._vitbatch_v2.stats.unmatched == 1
