"""Deterministic fake encoders and item builders shared by the core tests.

The fake encoders mix rows *within* an item (each row gets the item's mean
added), so a batcher that mixed items, misaligned boundaries or swapped rows
would produce different numbers than encoding each item alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from vitbatch import hookimpl
from vitbatch.core import Item, ItemKey, RequestChunk, Span
from vitbatch.core.host_tier import LruTier, tensor_bytes

HIDDEN = 6
IN_DIM = 3
_WEIGHT = torch.linspace(-1.0, 1.0, IN_DIM * HIDDEN, dtype=torch.float64).reshape(IN_DIM, HIDDEN)


def features_for(hash_: int, num_tokens: int) -> torch.Tensor:
    """The features an engine would produce for content ``hash_`` at ``num_tokens``."""
    generator = torch.Generator().manual_seed(hash_ * 1000 + num_tokens)
    return torch.randn(num_tokens, IN_DIM, generator=generator, dtype=torch.float64)


def encode_one(features: torch.Tensor) -> torch.Tensor:
    """The reference encoder for one item: linear map plus the item's mean row."""
    projected = torch.tanh(features @ _WEIGHT)
    return projected + projected.mean(dim=0, keepdim=True)


def make_item(hash_: int, num_tokens: int, spans: Sequence[tuple[int, int]], **kwargs) -> Item:
    return Item(
        hash=hash_,
        modality=kwargs.pop("modality", "image"),
        num_tokens=num_tokens,
        spans=tuple(Span(o, n) for o, n in spans),
        features=features_for(hash_, num_tokens),
        **kwargs,
    )


class ConcatEncoder:
    """Encodes the whole batch in one pass (segment means by index), one tensor out.

    A different computation from :func:`encode_one`, like a real varlen encoder
    differs from its per-image loop; records every call.
    """

    def __init__(self) -> None:
        self.calls: list[list[Item]] = []

    @hookimpl
    def vitbatch_encode_batch(self, items: Sequence[Item]) -> torch.Tensor:
        self.calls.append(list(items))
        features = torch.cat([item.features for item in items], dim=0)
        lengths = torch.tensor([item.num_tokens for item in items])
        segment = torch.repeat_interleave(torch.arange(len(items)), lengths)
        projected = torch.tanh(features @ _WEIGHT)
        sums = torch.zeros(len(items), HIDDEN, dtype=projected.dtype).index_add_(
            0, segment, projected
        )
        means = sums / lengths.unsqueeze(1).to(projected.dtype)
        return projected + means[segment]


class ListEncoder(ConcatEncoder):
    """Answers with one tensor per item."""

    @hookimpl
    def vitbatch_encode_batch(self, items: Sequence[Item]) -> list[torch.Tensor]:
        self.calls.append(list(items))
        return [encode_one(item.features) for item in items]


def oracle_rows(
    chunk: RequestChunk, embedding_of: Callable[[Hashable, int], torch.Tensor]
) -> torch.Tensor | None:
    """The naive oracle: walk every placeholder position, keep those in the window, in
    position order, each taken from its item's whole embedding (``embedding_of(hash, n)``)."""
    picked = []  # (position, key, row)
    for item in chunk.items:
        row = 0
        for span in item.spans:
            for position in range(span.offset, span.end):
                if chunk.window.start <= position < chunk.window.end:
                    picked.append((position, (item.hash, item.num_tokens), row))
                row += 1
    if not picked:
        return None
    picked.sort()
    keys = {key for _, key, _ in picked}
    if len(keys) == 1:
        return embedding_of(*picked[0][1])[[row for _, _, row in picked]]
    return torch.stack([embedding_of(*key)[row] for _, key, row in picked])


class EngineOwnedTier(LruTier):
    """An engine's own cache seen as a device tier, which the engine also fills itself
    (SGLang's ``embedding_cache`` when SGLang's path serves a step)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, tensor_bytes)

    def engine_set(self, key: ItemKey, tensor: torch.Tensor) -> None:
        """The engine stores an entry of its own, evicting what it must (not demoted)."""
        self.put(key, tensor)


def internal_sizes(obj: object) -> dict[str, int]:
    """Sizes of every dict, set and list an object keeps directly."""
    return {
        name: len(value)
        for name, value in vars(obj).items()
        if isinstance(value, (dict, set, list)) and not name.startswith("__")
    }
