"""SGLang's multimodal step: the functions of its module, the embedding cache it keeps, and
the probes of how supported releases choose the step's path.

The step's module is whichever :func:`~.releases.step_module_name` names. The cache is the
step module's ``embedding_cache`` (a ``MultiModalStaticCache``); the policy over it is
vitbatch's (``adapters.sglang.cache``). The two path probes sit last, after the cache's
accessors: that is the order in which the start-up check walks the required names (the
package's docstring says why the order is kept).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters.sglang.surface.registry import ITEM, MM_CACHE, STEP, _module, needs
from vitbatch.adapters.sglang.surface.releases import _mm, sglang_version

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem


@needs(f"{STEP}:_get_chunked_embedding_full")
def chunked_embedding_full(*args: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
    """SGLang's per-request "full" path (multi-run items, EVS), arguments as SGLang passes them."""
    return _mm()._get_chunked_embedding_full(*args)


@needs(f"{STEP}:_can_skip_pre_embed_feature_move")
def can_skip_feature_move(data_embedding_func: Callable) -> bool:
    """Whether the model moves features to the device itself (SGLang then does not)."""
    return bool(_mm()._can_skip_pre_embed_feature_move(data_embedding_func))


@needs(f"{STEP}:get_embedding_and_mask", part="bench")
def get_embedding_and_mask(*args: Any) -> Any:
    """SGLang's whole multimodal embedding of one modality call (the benchmark, the tests)."""
    return _mm().get_embedding_and_mask(*args)


@needs(f"{ITEM}:MultimodalDataItem.set_hash", f"{ITEM}:Modality", part="bench")
def image_item(run: tuple[int, int], feature: torch.Tensor, hash_: int) -> MultimodalDataItem:
    """A one-run image ``MultimodalDataItem`` with SGLang's pad values for ``hash_``."""
    module = _module(ITEM)
    item = module.MultimodalDataItem(modality=module.Modality.IMAGE, offsets=[run], feature=feature)
    item.set_hash(hash_)
    return item


@needs(f"{ITEM}:MultimodalDataItem.is_audio")
def per_image_request(items: Sequence[MultimodalDataItem]) -> bool:
    """Whether SGLang's per-image path takes this request (else its per-request full path)."""
    audio = audio_runs_per_image()
    return all(len(item.offsets) == 1 or (audio and item.is_audio()) for item in items)


def runs_full_path(offsets: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    """Whether SGLang calls its full path for a full-path request with these item runs
    (inclusive ``(first, last)``) in the chunk ``[start, end)``."""
    if full_path_only_on_overlap():
        return any(last >= start and first < end for first, last in offsets)
    return any(last >= start for _, last in offsets)


@needs(f"{ITEM}:MultimodalDataItem.can_defer_cuda_ipc_feature_reconstruction")
def borrow_feature(item: MultimodalDataItem, key: str | None) -> None:
    """Let the model borrow ``item``'s CUDA-IPC feature instead of rebuilding it (``key``:
    :func:`~.transport.borrow_cuda_ipc_key`; nothing to do without one)."""
    if key is not None and item.can_defer_cuda_ipc_feature_reconstruction():
        item.model_specific_data[key] = True


# ---------------------------------------------------------------------------
# SGLang's embedding cache (the policy over it is vitbatch's: ``.cache``)
# ---------------------------------------------------------------------------


@needs(
    f"{STEP}:embedding_cache",
    f"{STEP}:init_mm_embedding_cache",
    "sglang.srt.environ:envs.SGLANG_VLM_CACHE_SIZE_MB",
)
def embedding_cache() -> Any:
    """SGLang's ``embedding_cache`` of the step module (sized by ``SGLANG_VLM_CACHE_SIZE_MB``,
    replaced by ``init_mm_embedding_cache``: read it each time, never keep it), or ``None``."""
    return _mm().embedding_cache


@needs(f"{STEP}:embedding_cache", part="bench")
def set_embedding_cache(cache: Any) -> None:
    """Make the step module's ``embedding_cache`` name ``cache`` (the bench's per-mode cache)."""
    _mm().embedding_cache = cache


@needs(f"{MM_CACHE}:MultiModalStaticCache")
def new_embedding_cache(max_bytes: int) -> Any:
    return _module(MM_CACHE).MultiModalStaticCache(max_bytes)


@needs(cache_fields=("mm_cache",))
def cache_entries(cache: Any) -> Mapping[int, Any]:
    """Hash -> SGLang entry, least recently used first (read only: change it through SGLang)."""
    return cache.mm_cache


@needs(cache_fields=("max_size",))
def cache_capacity(cache: Any) -> int:
    return int(cache.max_size)


@needs(cache_fields=("current_size",))
def cache_used(cache: Any) -> int:
    return int(cache.current_size)


@needs(f"{MM_CACHE}:MultiModalStaticCache.get_single")
def cache_touch(cache: Any, hash_: int) -> None:
    cache.get_single(hash_)  # SGLang's own "used now"


@needs(f"{MM_CACHE}:MultiModalStaticCache.free")
def cache_free(cache: Any, hash_: int) -> None:
    cache.free(hash_, None)


@needs(f"{MM_CACHE}:MultiModalStaticCache.set", f"{MM_CACHE}:EmbeddingResult")
def cache_store(cache: Any, hash_: int, embedding: torch.Tensor) -> bool:
    return bool(cache.set(hash_, _module(MM_CACHE).EmbeddingResult(embedding=embedding)))


@needs(f"{MM_CACHE}:MultiModalStaticCache.clear")
def cache_clear(cache: Any) -> None:
    cache.clear()


@needs(f"{MM_CACHE}:EmbeddingResult")
def plain_embedding(entry: Any) -> torch.Tensor | None:
    """A plain entry's embedding as stored; ``None`` for anything else (absent, or an EVS
    result: another layout)."""
    return entry.embedding if type(entry) is _module(MM_CACHE).EmbeddingResult else None


@needs(f"{MM_CACHE}:_get_tensor_size")
def sglang_bytes(tensor: torch.Tensor) -> int:
    """An embedding's bytes as the installed SGLang counts them (differs between releases)."""
    return int(_module(MM_CACHE)._get_tensor_size(tensor))


def entry_bytes(entry: Any) -> int:
    """A cache entry's bytes as SGLang counts them."""
    return sglang_bytes(entry.embedding)


# ---------------------------------------------------------------------------
# Where supported releases differ in the step's path choice
# ---------------------------------------------------------------------------


@cache
@needs(f"{STEP}:_get_chunked_embedding_by_item")
def audio_runs_per_image() -> bool:
    """Whether SGLang's per-image path takes audio items with several runs (0.5.22+).

    Before, every item with several runs sent its request down the per-request "full" path.
    The same change made ``_get_chunked_embedding_by_item`` slice items by their own runs
    instead of by the request's ``items_offset``, which is what this probe reads.
    """
    parameters = inspect.signature(_mm()._get_chunked_embedding_by_item).parameters
    return "items_offset" not in parameters


@cache
def full_path_only_on_overlap() -> bool:
    """Whether SGLang runs its full path only for requests whose chunk overlaps an item (0.5.23+).

    Before, it ran it for every request with an item not yet wholly prefilled (it encodes and
    caches them, then returns a possibly empty chunk). This change left no name or signature
    behind, so the release number is the only probe; a source or development build of 0.5.23
    or later counts as later.
    """
    return _release(sglang_version()) >= (0, 5, 23)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)
