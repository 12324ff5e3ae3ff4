"""Worker side, shared by both model runners: vLLM's encoder inputs as core items.

Both of vLLM's model runners find a request's multimodal features in a mapping
request id -> features, each with an mm hash, a modality, its kwargs item and
an ``mm_position``; this module turns those (and the scheduler's prefetch
orders) into core :class:`~vitbatch.core.Item` objects, and says which inputs
vitbatch leaves to vLLM's own path. It holds no state, so the scheduler side
(:mod:`.prefetch_plan`, for an item's cost) can use it without the worker's
state or its host tier.

vLLM's objects are read through :mod:`.surface` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import PrefetchOrder
from vitbatch.core import Item, Span


@dataclass(frozen=True)
class Payload:
    """What the engine encoder needs back from a core item."""

    request_id: str
    modality: str
    kwargs: Any  # vLLM's MultiModalKwargsItem


#: One encoder input found in a runner: ``(mm hash, request id, vLLM feature)``.
Entry = tuple[str, str, Any]


def modality_reason(modalities: Iterable[str]) -> str | None:
    """Inputs whose vLLM branch vitbatch does not reproduce."""
    return "prompt_embeds inputs" if "prompt_embeds" in modalities else None


def native_only_reason(runner: Any, modalities: Sequence[str]) -> str | None:
    """Cases whose vLLM branches vitbatch does not reproduce: leave the step to vLLM."""
    if surface.is_encoder_decoder(runner):
        return "encoder-decoder model"
    return modality_reason(modalities) or surface.unreproduced_branch(runner, modalities)


def item_cost(kwargs: Any, num_embeds: int) -> int:
    """Encoder work of one item: patches before merging when the item has a ``*_grid_thw``."""
    for name in ("image_grid_thw", "video_grid_thw"):
        if name in kwargs:
            grid = kwargs[name].data
            if isinstance(grid, torch.Tensor) and grid.numel() == 3:
                return max(1, math.prod(int(v) for v in grid.tolist()))
    return num_embeds


def make_item(mm_hash: str, request_id: str, modality: str, kwargs: Any, position: Any) -> Item:
    """A core item for one vLLM encoder input (its ``mm_position`` gives rows and offset)."""
    return _item(mm_hash, request_id, modality, kwargs, position.get_num_embeds(), position.offset)


#: The request id of prefetched items (their request is not the worker's yet).
PREFETCH_REQUEST = "<prefetch>"


def order_item(order: PrefetchOrder) -> Item:
    """A core item for one prefetch order (its placeholder offset does not matter)."""
    return _item(order.mm_hash, PREFETCH_REQUEST, order.modality, order.data, order.num_embeds, 0)


def _item(
    mm_hash: str, request_id: str, modality: str, kwargs: Any, num_embeds: int, offset: int
) -> Item:
    return Item(
        hash=mm_hash,
        modality=modality,
        num_tokens=num_embeds,
        spans=(Span(offset, num_embeds),),
        # The item's tensors by field name, for third-party encoder plugins (no copy).
        features={n: e.data for n, e in kwargs.items() if isinstance(e.data, torch.Tensor)},
        cost=item_cost(kwargs, num_embeds),
        group=tuple(sorted(kwargs.keys())),
        cacheable=False,  # vLLM's encoder cache is the cache; don't keep a second copy
        payload=Payload(request_id, modality, kwargs),
    )


def entry_item(entry: Entry) -> Item:
    """:func:`make_item` of a found feature."""
    mm_hash, request_id, feature = entry
    return make_item(mm_hash, request_id, feature.modality, feature.data, feature.mm_position)


def find_feature(
    features_by_request: Iterable[tuple[str, Iterable[Any]]], mm_hash: str
) -> tuple[str, Any] | None:
    """A (request id, feature) of a live request carrying ``mm_hash`` with its data."""
    for request_id, features in features_by_request:
        for feature in features:
            if feature.identifier == mm_hash and feature.data is not None:
                return request_id, feature
    return None
