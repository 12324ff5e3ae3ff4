"""SGLang's ``MultimodalDataItem`` as the core sees it: one translation, shared.

Why a module of its own: the step (:mod:`.step`) and the encoder prefetch
(:mod:`.prefetch`) must agree to the byte on an item's key and on the rows an
encoder answer yields, or a prefetched embedding would be stored under a key
the step never looks up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vitbatch.core import Item, Span
from vitbatch.core.items import ItemKey

if TYPE_CHECKING:
    from vitbatch.adapters.sglang.surface import MultimodalDataItem


def core_item(item: MultimodalDataItem) -> Item:
    """A ``MultimodalDataItem`` as a core item (SGLang offsets are inclusive ``(start, end)``)."""
    spans = tuple(Span(start, end - start + 1) for start, end in item.offsets)
    feature = item.feature if isinstance(item.feature, torch.Tensor) else None
    num_tokens = sum(span.length for span in spans)
    return Item(
        hash=item.hash,
        modality=modality_name(item),
        num_tokens=num_tokens,
        spans=spans,
        features=feature,
        cost=_patches(feature, num_tokens),
        payload=item,
    )


def modality_name(item: MultimodalDataItem) -> str:
    """``"image"``, ``"video"``, ``"audio"``: the core's name of the item's modality."""
    return str(getattr(item.modality, "name", item.modality)).lower()


def item_key(item: MultimodalDataItem) -> ItemKey:
    """The key the step looks the item up by: its hash and its embedding rows."""
    return ItemKey(item.hash, sum(end - start + 1 for start, end in item.offsets))


def _patches(feature: torch.Tensor | None, num_tokens: int) -> int:
    """Encoder input units of an item: the rows of a flattened-patch feature
    (Qwen-VL family: one row per patch before merging); embedding rows where the
    feature has another layout (e.g. ``[images, C, H, W]`` pixel tensors)."""
    if feature is not None and feature.dim() == 2 and feature.shape[0] >= num_tokens:
        return int(feature.shape[0])
    return num_tokens


def flat_rows(output: Any) -> Any:
    """A ``data_embedding_func`` answer as ``[rows, hidden]`` tensors (one, or one per item);
    anything else as it is, for the core to report as a clear error."""
    if isinstance(output, list):
        return [embedding.reshape(-1, embedding.shape[-1]) for embedding in output]
    if isinstance(output, torch.Tensor):
        return output.reshape(-1, output.shape[-1])
    return output
