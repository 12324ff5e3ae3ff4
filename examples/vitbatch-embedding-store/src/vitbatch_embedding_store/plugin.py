"""The hook implementation vitbatch finds through the ``vitbatch`` entry point."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vitbatch import hookimpl
from vitbatch_embedding_store.store import STORE_ENV, EmbeddingStore

if TYPE_CHECKING:
    from vitbatch.core import EngineEncoder, Item

STATS = {"served": 0, "delegated": 0, "declined": 0}
"""How many items this plugin served from the store, passed to the engine, declined."""


@hookimpl
def vitbatch_encode_batch(
    items: Sequence[Item], engine_encoder: EngineEncoder | None
) -> list[torch.Tensor] | None:
    """Stored items come from disk; the rest go to the engine's encoder in one call.

    Declines (returns ``None``) when no store is configured or no item of the
    batch is stored, so the default path runs exactly as without this plugin.
    """
    root = os.environ.get(STORE_ENV)
    if not root:
        STATS["declined"] += len(items)
        return None
    store = EmbeddingStore(root)
    stored = [store.get(item.hash, item.num_tokens) for item in items]
    if all(embedding is None for embedding in stored):
        STATS["declined"] += len(items)
        return None
    missing = [item for item, embedding in zip(items, stored) if embedding is None]
    if missing and engine_encoder is None:
        STATS["declined"] += len(items)
        return None  # someone else must encode the misses; let them have the whole batch
    encoded: list[torch.Tensor] = []
    if missing:
        output = engine_encoder(missing)
        encoded = (
            list(output)
            if not isinstance(output, torch.Tensor)
            else list(torch.split(output, [item.num_tokens for item in missing]))
        )
    device, dtype = _placement(encoded, items)
    answers = iter(encoded)
    result = []
    for embedding in stored:
        if embedding is None:
            result.append(next(answers))
        else:
            result.append(embedding.to(device=device, dtype=dtype, non_blocking=True))
    STATS["served"] += len(items) - len(missing)
    STATS["delegated"] += len(missing)
    return result


def _placement(
    encoded: list[torch.Tensor], items: Sequence[Item]
) -> tuple[torch.device, torch.dtype | None]:
    """Put stored rows where the engine's own rows are (or where the features are)."""
    if encoded:
        return encoded[0].device, encoded[0].dtype
    features = items[0].features
    if isinstance(features, torch.Tensor):
        return features.device, None
    return torch.device("cpu"), None
