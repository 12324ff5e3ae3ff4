"""The example plugin (examples/vitbatch-embedding-store), pip-installed, used by SGLang.

Precomputed embeddings for some images sit in the store; SGLang with vitbatch
serves those from disk, encodes the rest with its own encoder in one call for
all requests, and the result equals SGLang's own path.
"""

from __future__ import annotations

import pytest

from tests.sglang.conftest import FakeEncoder, ItemSpec, Modality, RequestSpec
from tests.sglang.test_differential import assert_same, run_sequence
from vitbatch.adapters import sglang as adapter

store_plugin = pytest.importorskip(
    "vitbatch_embedding_store.plugin", reason="ci/install-sglang.sh installs the example"
)
from vitbatch_embedding_store import STORE_ENV, EmbeddingStore  # noqa: E402


def test_stored_images_skip_sglangs_encoder(native_and_plugin, tmp_path, monkeypatch) -> None:
    original, patched = native_and_plugin
    image = Modality.IMAGE
    requests = [
        RequestSpec(
            [ItemSpec(21, image, [(1, 6)]), ItemSpec(22, image, [(9, 12)])],
            length=16,
            prefix=0,
            extend=16,
        ),
        RequestSpec([ItemSpec(23, image, [(0, 8)])], length=12, prefix=0, extend=12),
        RequestSpec([ItemSpec(21, image, [(3, 8)])], length=10, prefix=2, extend=8),
    ]
    # The store holds what SGLang's encoder would produce for images 21 and 23.
    reference = FakeEncoder()
    store = EmbeddingStore(tmp_path)
    for spec in (requests[0].items[0], requests[1].items[0]):
        item = spec.build()
        store.put(item.hash, reference([item])[0 : spec.tokens])
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    monkeypatch.delenv("VITBATCH_PLUGINS", raising=False)
    for key in store_plugin.STATS:
        store_plugin.STATS[key] = 0

    native = run_sequence([requests], FakeEncoder(), original)
    sglang_encoder = FakeEncoder()
    plugin = run_sequence([requests], sglang_encoder, patched, adapter.Settings(enabled=True))

    state = adapter.get_state()
    assert (
        state.batcher.plugin_manager.get_plugin("embedding-store") is store_plugin
    )  # via the entry point
    assert state.fallbacks == 0
    assert_same(native, plugin)
    assert [[item.hash for item in call] for call in sglang_encoder.calls] == [
        [22]
    ]  # one call, only the miss
    assert store_plugin.STATS == {"served": 2, "delegated": 1, "declined": 0}
