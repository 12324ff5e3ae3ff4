"""The example plugin package (examples/vitbatch-embedding-store), installed with pip.

These tests go through the entry point, never through direct registration:
the plugin must be found because it is installed.
"""

from __future__ import annotations

import importlib.metadata as metadata

import pytest
import torch

from tests.core.fakes import encode_one, make_item
from vitbatch.core import Budget, RequestChunk, VitBatcher, Window
from vitbatch.core.errors import PluginCallError
from vitbatch.info import collect_info
from vitbatch.plugin import make_plugin_manager

plugin_module = pytest.importorskip(
    "vitbatch_embedding_store.plugin",
    reason="pip install examples/vitbatch-embedding-store (ci/install-core.sh does)",
)
from vitbatch_embedding_store import STORE_ENV, EmbeddingStore  # noqa: E402


def engine_encoder_recording(calls):
    def engine(items):
        calls.append([item.hash for item in items])
        return [encode_one(item.features) for item in items]

    return engine


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    monkeypatch.delenv("VITBATCH_PLUGINS", raising=False)
    for key in plugin_module.STATS:
        plugin_module.STATS[key] = 0
    return EmbeddingStore(tmp_path)


def three_requests():
    return [
        RequestChunk([make_item(1, 4, [(0, 4)]), make_item(2, 3, [(6, 3)])], Window(0, 9), "a"),
        RequestChunk([make_item(3, 5, [(1, 5)])], Window(0, 6), "b"),
        RequestChunk([make_item(4, 2, [(0, 2)])], Window(0, 2), "c"),
    ]


def test_entry_point_is_declared_and_loaded() -> None:
    names = {ep.name: ep.value for ep in metadata.entry_points(group="vitbatch")}
    assert names.get("embedding-store") == "vitbatch_embedding_store.plugin"
    pm = make_plugin_manager()
    assert pm.get_plugin("embedding-store") is plugin_module
    info = collect_info()
    listed = {p["name"]: p for p in info["plugins"]}
    assert listed["embedding-store"]["hooks"] == ["vitbatch_encode_batch"]
    assert info["hooks"]["vitbatch_encode_batch"][0] == "embedding-store"


def test_stored_items_skip_the_engine_and_one_call_serves_all_requests(store) -> None:
    stored_value = torch.full((4, 6), 7.0, dtype=torch.float64)
    store.put(1, stored_value)
    store.put(3, torch.full((5, 6), 9.0, dtype=torch.float64))
    calls = []
    result = VitBatcher(Budget()).run_step(three_requests(), engine_encoder_recording(calls))
    assert result.stats.encoder_calls == 1  # batching wraps the plugin: one call for three requests
    assert calls == [[2, 4]]  # only the items missing from the store reach the engine
    assert plugin_module.STATS == {"served": 2, "delegated": 2, "declined": 0}
    torch.testing.assert_close(result.embeddings[0][:4], stored_value)
    torch.testing.assert_close(
        result.embeddings[0][4:], encode_one(three_requests()[0].items[1].features)
    )


def test_declining_falls_through_to_the_default(store) -> None:
    calls = []
    result = VitBatcher(Budget()).run_step(three_requests(), engine_encoder_recording(calls))
    assert calls == [[1, 2, 3, 4]]
    assert plugin_module.STATS["declined"] == 4 and plugin_module.STATS["served"] == 0
    torch.testing.assert_close(
        result.embeddings[2], encode_one(three_requests()[2].items[0].features)
    )


def test_allowlist_excludes_the_plugin(store, monkeypatch) -> None:
    store.put(1, torch.zeros(4, 6, dtype=torch.float64))
    monkeypatch.setenv("VITBATCH_PLUGINS", "")
    pm = make_plugin_manager()
    assert pm.get_plugin("embedding-store") is None
    calls = []
    VitBatcher(Budget(), plugin_manager=pm).run_step(
        three_requests(), engine_encoder_recording(calls)
    )
    assert calls == [[1, 2, 3, 4]]


def test_plugin_error_is_reported_with_plugin_and_items(store) -> None:
    store.path(1, 4).parent.mkdir(parents=True, exist_ok=True)
    store.path(1, 4).write_bytes(b"not a tensor")
    with pytest.raises(PluginCallError) as info:
        VitBatcher(Budget()).run_step(three_requests(), engine_encoder_recording([]))
    message = str(info.value)
    assert "'embedding-store'" in message and "vitbatch_encode_batch" in message
    assert "modality 'image'" in message and "[1, 2, 3, 4]" in message


def test_wrong_stored_shape_is_a_clear_output_error(store) -> None:
    from vitbatch.core import EncoderOutputError

    store.put(1, torch.zeros(4, 6, dtype=torch.float64))
    torch.save(torch.zeros(4, 6), store.path(3, 5))  # claims 5 tokens, holds 4 rows
    with pytest.raises(EncoderOutputError, match=r"'embedding-store'.*item 3: expected 5"):
        VitBatcher(Budget()).run_step(three_requests(), engine_encoder_recording([]))
