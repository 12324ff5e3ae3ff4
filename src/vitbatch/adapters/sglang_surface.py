"""Every private SGLang name the SGLang adapter touches, in one place, checked at enable time.

Why: these names are not SGLang's public API and move between releases. Checking them once,
before the hook is registered, turns a rename into one clear log line ("vitbatch is off:
SGLang X lacks Y") instead of a failure inside the first multimodal step.

Supported: SGLang 0.5.19 to 0.5.23 (docs/sglang.md, "Supported versions"). ``SURFACE`` is what
every supported release has; the feature probes below cover what differs inside that range, one
probe per difference, each named after what SGLang does rather than after a version.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

MM_SCHEDULE = "sglang.srt.managers.mm_schedule"

# (module, attribute) pairs; a dotted attribute is looked up step by step; None means "the
# module must import". Required by every supported release.
SURFACE: tuple[tuple[str, str | None], ...] = (
    ("sglang.srt.plugins.hook_registry", "HookRegistry"),
    ("sglang.srt.plugins.hook_registry", "HookType.AROUND"),
    ("sglang.srt.server_args", "ServerArgs.add_cli_args"),
    ("sglang.srt.server_args", "ServerArgs.from_cli_args"),
    ("sglang.srt.managers.schedule_batch", "MultimodalDataItem.is_audio"),
    (
        "sglang.srt.managers.schedule_batch",
        "MultimodalDataItem.can_defer_cuda_ipc_feature_reconstruction",
    ),
    (MM_SCHEDULE, "_get_chunked_prefill_embedding"),
    (MM_SCHEDULE, "_get_chunked_embedding_full"),
    (MM_SCHEDULE, "_get_chunked_embedding_by_item"),
    (MM_SCHEDULE, "_can_skip_pre_embed_feature_move"),
    ("sglang.srt.environ", "envs.SGLANG_VLM_CACHE_SIZE_MB"),
    # The one embedding cache (sglang_cache.SGLangDeviceTier). Its instance attributes
    # mm_cache (an OrderedDict in LRU order), max_size and current_size are checked on a
    # live cache by embedding_cache_problem(); the same in 0.5.19 and 0.5.23.
    (MM_SCHEDULE, "embedding_cache"),
    (MM_SCHEDULE, "init_mm_embedding_cache"),
    ("sglang.srt.mem_cache.multimodal_cache", "EmbeddingResult"),
    ("sglang.srt.mem_cache.multimodal_cache", "_get_tensor_size"),
    ("sglang.srt.mem_cache.multimodal_cache", "MultiModalStaticCache.get_single"),
    ("sglang.srt.mem_cache.multimodal_cache", "MultiModalStaticCache.set"),
    ("sglang.srt.mem_cache.multimodal_cache", "MultiModalStaticCache.free"),
    ("sglang.srt.mem_cache.multimodal_cache", "MultiModalStaticCache.clear"),
)

CACHE_ATTRIBUTES = ("mm_cache", "max_size", "current_size")


def sglang_version() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "unknown"


def missing_piece(surface: tuple[tuple[str, str | None], ...] = SURFACE) -> str | None:
    """The first missing name as ``module.attribute``, or None when the whole surface is there."""
    for module_name, attribute in surface:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - any import failure means the piece is unusable
            return module_name
        for part in attribute.split(".") if attribute else ():
            if not hasattr(target, part):
                return f"{module_name}.{attribute}"
            target = getattr(target, part)
    return None


def embedding_cache_problem() -> str | None:
    """The first instance attribute the adapter reads that a ``MultiModalStaticCache``
    lacks (checked on a throwaway instance), or None."""
    from sglang.srt.mem_cache.multimodal_cache import MultiModalStaticCache

    cache = MultiModalStaticCache(0)
    for attribute in CACHE_ATTRIBUTES:
        if not hasattr(cache, attribute):
            return f"sglang.srt.mem_cache.multimodal_cache.MultiModalStaticCache().{attribute}"
    return None


def surface_problem(surface: tuple[tuple[str, str | None], ...] = SURFACE) -> str | None:
    """One log line naming the missing piece and the SGLang version, or None when all is there."""
    missing = missing_piece(surface)
    if missing is None and surface is SURFACE:
        try:
            missing = embedding_cache_problem()
        except Exception as error:  # noqa: BLE001 - an unusable cache class is a missing piece
            missing = f"a usable MultiModalStaticCache ({error})"
    if missing is None:
        return None
    return (
        f"vitbatch is off: SGLang {sglang_version()} lacks {missing}, which the adapter needs "
        "(supported: SGLang 0.5.19 to 0.5.23); SGLang's native multimodal path serves every step"
    )


# ---------------------------------------------------------------------------
# Feature probes: where supported releases differ
# ---------------------------------------------------------------------------


def borrow_cuda_ipc_key() -> str | None:
    """The ``model_specific_data`` key that lets a CUDA-IPC feature be borrowed rather than
    rebuilt (SGLang 0.5.20+); None where SGLang has no such transport (nothing to borrow)."""
    try:
        from sglang.srt.multimodal.transport.cuda_ipc import BORROW_CUDA_IPC_FEATURE_KEY
    except ImportError:
        return None
    return BORROW_CUDA_IPC_FEATURE_KEY


def host_offload_event() -> Any:
    """SGLang's pending post-forward feature copy-back (``mm_schedule.host_offload_event``,
    0.5.21+; reassigned by SGLang every step, so read it each time); None where SGLang has no
    asynchronous copy-back."""
    return getattr(importlib.import_module(MM_SCHEDULE), "host_offload_event", None)


@cache
def audio_runs_per_image() -> bool:
    """Whether SGLang's per-image path takes audio items with several runs (0.5.22+).

    Before, every item with several runs sent its request down the per-request "full" path.
    The same change made ``_get_chunked_embedding_by_item`` slice items by their own runs
    instead of by the request's ``items_offset``, which is what this probe reads.
    """
    from sglang.srt.managers import mm_schedule

    parameters = inspect.signature(mm_schedule._get_chunked_embedding_by_item).parameters
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
