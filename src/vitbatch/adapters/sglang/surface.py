"""The one door to SGLang: every SGLang name vitbatch reads, writes, wraps or imports.

Why: these names are not SGLang's public API and move between releases. Each is
touched by exactly one accessor below, and each accessor is registered with the
names it needs (:func:`needs`); :func:`names`, which the start-up check walks,
is generated from those registrations, so the check cannot drift from the code.
A rename becomes one clear log line ("vitbatch is off: SGLang X lacks Y") at
enable time instead of a failure inside the first multimodal step. No other
module of vitbatch imports ``sglang``.

Supported: SGLang 0.5.17 to 0.5.23 (docs/sglang.md, "Supported versions"). Names
every supported release has are required; ``optional`` ones are feature probes
for what differs inside that range, each named after what SGLang does. Where a
supported release keeps a required name somewhere else (the step's module, the
argument-resolution method), the name is written with a placeholder (``{step}``,
``{resolution}``) that a probe fills in: one accessor, never a copy per release.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

F = TypeVar("F", bound=Callable[..., Any])
Name = tuple[str, "str | None"]  # (module, dotted attribute or None: "the module imports")

MM_SCHEDULE = "sglang.srt.managers.mm_schedule"  # the multimodal step, 0.5.18+
MM_UTILS = "sglang.srt.managers.mm_utils"  # the multimodal step, 0.5.17 (and the embed routine)
STEP = "{step}"  # whichever of the two holds the step: step_module_name()
MM_CACHE = "sglang.srt.mem_cache.multimodal_cache"
HOOKS = "sglang.srt.plugins.hook_registry"
ITEM = "sglang.srt.managers.schedule_batch"
ARGS = "sglang.srt.server_args"
SCHEDULER = "sglang.srt.managers.scheduler"

# part -> accessor -> names: "required" (every supported release; the start-up check),
# "optional" (probes and best-effort reads that cope without), "bench" (vitbatch bench only),
# "prefetch" (the encoder prefetch's own check, made only when it is switched on)
PARTS: dict[str, dict[str, tuple[Name, ...]]] = {
    "required": {},
    "optional": {},
    "bench": {},
    "prefetch": {},
}
CACHE_FIELDS: list[str] = []  # instance attributes of MultiModalStaticCache, checked live


def needs(
    *names: str, part: str = "required", cache_fields: Sequence[str] = ()
) -> Callable[[F], F]:
    """Register an accessor with the SGLang names (``"module:Attr.path"``) it touches; a
    ``{probe}`` placeholder is filled in by that probe when the names are read (:func:`names`)."""

    def record(accessor: F) -> F:
        parsed = tuple((m, a or None) for m, _, a in (name.partition(":") for name in names))
        PARTS[part][accessor.__name__] = parsed
        CACHE_FIELDS.extend(f for f in cache_fields if f not in CACHE_FIELDS)
        return accessor

    return record


def _module(name: str) -> Any:
    return importlib.import_module(name)


def _mm() -> Any:
    """The module that holds SGLang's multimodal step in the installed release."""
    return _module(step_module_name())


@cache
def step_module_name() -> str:
    """Where SGLang keeps its multimodal step (``get_embedding_and_mask``,
    ``_get_chunked_prefill_embedding``, ``embedding_cache``...): ``mm_schedule`` where that
    module exists (0.5.18+), else ``mm_utils`` (0.5.17, before the step was split out; there
    ``mm_utils`` defines the same functions). Only the module's presence is probed: whether
    it has every name is the start-up check's job."""
    try:
        split_out = importlib.util.find_spec(MM_SCHEDULE) is not None
    except ImportError:  # no SGLang at all: the check then names the newer module as missing
        split_out = True
    return MM_SCHEDULE if split_out else MM_UTILS


@cache
def resolution_method() -> str:
    """Where SGLang resolves its arguments before any model or process starts:
    ``ServerArgs.resolve_once`` (0.5.19+, where constructing ``ServerArgs`` leaves them
    unresolved), else the dataclass's ``__post_init__`` (0.5.17, 0.5.18: constructing
    resolves them). Every launch route goes through it."""
    server_args = _module(ARGS).ServerArgs
    return "resolve_once" if hasattr(server_args, "resolve_once") else "__post_init__"


PROBES: dict[str, Callable[[], str]] = {"step": step_module_name, "resolution": resolution_method}


def _filled(text: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: PROBES[match.group(1)](), text)


def names(part: str = "required") -> tuple[Name, ...]:
    """The SGLang names one part touches in the installed release (placeholders filled in),
    each once, in registration order."""
    return tuple(
        dict.fromkeys(
            (_filled(module), _filled(attribute) if attribute else None)
            for registered in PARTS[part].values()
            for module, attribute in registered
        )
    )


# ---------------------------------------------------------------------------
# Hooks: where vitbatch plugs into SGLang
# ---------------------------------------------------------------------------


def _register(target: str, hook: Callable, kind: str) -> None:
    registry = _module(HOOKS)
    registry.HookRegistry.register(target, hook, getattr(registry.HookType, kind))


@needs(
    f"{HOOKS}:HookRegistry.register",
    f"{HOOKS}:HookType.AFTER",
    f"{ARGS}:ServerArgs.add_cli_args",
    f"{ARGS}:ServerArgs.from_cli_args",
)
def hook_cli(after_add_cli_args: Callable, after_from_cli_args: Callable) -> None:
    """AFTER hooks on ``ServerArgs.add_cli_args`` (parser) and ``from_cli_args`` (parsed)."""
    _register(f"{ARGS}.ServerArgs.add_cli_args", after_add_cli_args, "AFTER")
    _register(f"{ARGS}.ServerArgs.from_cli_args", after_from_cli_args, "AFTER")


@needs(f"{HOOKS}:HookType.BEFORE", f"{ARGS}:ServerArgs.{{resolution}}")
def hook_server_args_resolution(before: Callable) -> None:
    """A BEFORE hook on where ``ServerArgs`` resolves (:func:`resolution_method`), which every
    launch route goes through before any model or process starts, outside the plugin loader
    (that swallows what a plugin raises)."""
    _register(f"{ARGS}.ServerArgs.{resolution_method()}", before, "BEFORE")


@needs(f"{HOOKS}:HookType.AROUND", f"{STEP}:_get_chunked_prefill_embedding")
def hook_chunked_prefill(around: Callable) -> None:
    """An AROUND hook on SGLang's step embedding of every request's multimodal items."""
    _register(f"{step_module_name()}._get_chunked_prefill_embedding", around, "AROUND")


@needs(f"{HOOKS}:HookRegistry.apply_hooks")
def apply_hooks() -> None:
    """Patch this process now (its plugins already ran)."""
    _module(HOOKS).HookRegistry.apply_hooks()


@needs(f"{STEP}:_get_chunked_prefill_embedding")
def chunked_prefill_function() -> Callable:
    """What the step module's ``_get_chunked_prefill_embedding`` names now (patched or not)."""
    return _mm()._get_chunked_prefill_embedding


@needs(f"{STEP}:_get_chunked_prefill_embedding", part="bench")
def set_chunked_prefill_function(function: Callable) -> None:
    """Make the step module's ``_get_chunked_prefill_embedding`` name ``function`` (the bench)."""
    _mm()._get_chunked_prefill_embedding = function


# ---------------------------------------------------------------------------
# SGLang's multimodal step
# ---------------------------------------------------------------------------


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
    :func:`borrow_cuda_ipc_key`; nothing to do without one)."""
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
# The scheduler loop, for the encoder prefetch (``.prefetch``)
# ---------------------------------------------------------------------------


@needs(
    f"{HOOKS}:HookType.AFTER",
    f"{SCHEDULER}:Scheduler.run_batch",
    f"{SCHEDULER}:Scheduler.on_idle",
    part="prefetch",
)
def hook_scheduler_loop(after_batch: Callable, after_idle: Callable) -> None:
    """AFTER hooks on ``Scheduler.run_batch`` and ``Scheduler.on_idle``: each iteration of
    both event loops (``event_loop_normal``, ``event_loop_overlap``, 0.5.17 to 0.5.23) calls
    ``run_batch`` when it has a batch — which returns once the forward is launched (the
    overlap loop: on its forward stream, still running), before any result is processed —
    and ``on_idle`` when it has none. The hooks get ``(result, scheduler, ...)``."""
    _register(f"{SCHEDULER}.Scheduler.run_batch", after_batch, "AFTER")
    _register(f"{SCHEDULER}.Scheduler.on_idle", after_idle, "AFTER")


def scheduler_loaded() -> bool:
    """Whether this process has imported SGLang's scheduler module (a scheduler process)."""
    return SCHEDULER in sys.modules


@needs(f"{SCHEDULER}:Scheduler.run_batch", part="prefetch")
def waiting_requests(scheduler: Any) -> Sequence[Any]:
    """The scheduler's ``waiting_queue`` (``Req``s in admission order, the same on every rank)."""
    return scheduler.waiting_queue


@needs(f"{ITEM}:Req.finished", part="prefetch")
def request_state(request: Any) -> tuple[Any, bool, Sequence[MultimodalDataItem]]:
    """``(rid, finished, multimodal items)`` of a waiting ``Req`` (no items: ``[]``)."""
    inputs = getattr(request, "multimodal_inputs", None)
    items = getattr(inputs, "mm_items", None) if inputs is not None else None
    return request.rid, bool(request.finished()), [i for i in items or () if i is not None]


def prefetchable(item: MultimodalDataItem) -> bool:
    """Whether a waiting item can be encoded now exactly as its step would: hashed and laid out
    (the scheduler did both on arrival), its feature a plain tensor (not a CUDA-IPC proxy the
    step reconstructs, not a shared-memory pointer), and no precomputed embedding."""
    return (
        isinstance(getattr(item, "hash", None), int)
        and bool(getattr(item, "offsets", None))
        and isinstance(getattr(item, "feature", None), torch.Tensor)
        and getattr(item, "precomputed_embeddings", None) is None
        and not any(
            type(value).__name__ == "CudaIpcTensorTransportProxy"
            for value in getattr(item, "model_specific_data", {}).values()
        )
    )


def copy_back_pending() -> bool:
    """Whether SGLang's post-forward feature copy-back (0.5.21+) is still in flight: a retracted
    request's host features may still be arriving, so the prefetch waits a step (no sync)."""
    event = host_offload_event()
    return event is not None and not event.query()


# ---------------------------------------------------------------------------
# Process context
# ---------------------------------------------------------------------------


@needs("sglang.srt.distributed.parallel_state:get_attn_tp_group", part="optional")
def attn_tp_cpu_group() -> Any:
    """The CPU group of the attention-TP ranks, or ``None`` (size 1, or no distributed state)."""
    try:
        group = _module("sglang.srt.distributed.parallel_state").get_attn_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return None
    if group is None or group.world_size <= 1:
        return None
    return group.cpu_group


@needs(
    f"{ARGS}:get_global_server_args",
    "sglang.srt.distributed:get_tensor_model_parallel_rank",
    part="optional",
)
def metric_labels() -> dict[str, str]:
    """Prometheus labels of this scheduler process, as far as SGLang tells them."""
    labels: dict[str, str] = {}
    try:
        args = _module(ARGS).get_global_server_args()
        labels["model_name"] = str(args.served_model_name or args.model_path)
    except Exception:
        pass
    try:
        labels["tp_rank"] = str(_module("sglang.srt.distributed").get_tensor_model_parallel_rank())
    except Exception:
        pass
    return labels


def load_multimodal_modules() -> None:
    """Import SGLang's multimodal step modules (fails here when SGLang is missing)."""
    _mm()


def sglang_version() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------
# Feature probes: where supported releases differ
# ---------------------------------------------------------------------------


@needs("sglang.srt.multimodal.transport.cuda_ipc:BORROW_CUDA_IPC_FEATURE_KEY", part="optional")
def borrow_cuda_ipc_key() -> str | None:
    """The ``model_specific_data`` key that lets a CUDA-IPC feature be borrowed rather than
    rebuilt (SGLang 0.5.20+); None where SGLang has no such transport (nothing to borrow)."""
    try:
        module = _module("sglang.srt.multimodal.transport.cuda_ipc")
    except ImportError:
        return None
    return getattr(module, "BORROW_CUDA_IPC_FEATURE_KEY", None)


@needs(f"{STEP}:host_offload_event", part="optional")
def host_offload_event() -> Any:
    """SGLang's pending post-forward feature copy-back (``mm_schedule.host_offload_event``,
    0.5.21+, never in 0.5.17's ``mm_utils``; reassigned by SGLang every step, so read it each
    time); None where SGLang has no asynchronous copy-back."""
    return getattr(_mm(), "host_offload_event", None)


@needs(f"{STEP}:host_offload_event", part="bench")
def set_host_offload_event(event: Any) -> None:
    """Make the step module's ``host_offload_event`` name ``event`` (the bench's copy-back)."""
    _mm().host_offload_event = event


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


# ---------------------------------------------------------------------------
# The start-up check, generated from the registrations above
# ---------------------------------------------------------------------------


def missing_piece(surface: Sequence[Name] | None = None) -> str | None:
    """The first missing name as ``module.attribute``, or None when the whole surface is there
    (default: every required name, :func:`names`)."""
    if surface is None:
        try:
            surface = names("required")
        except Exception:  # noqa: BLE001 - a probe that cannot run: no usable server_args
            return ARGS
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
    instance = new_embedding_cache(0)
    for attribute in CACHE_FIELDS:
        if not hasattr(instance, attribute):
            return f"{MM_CACHE}.MultiModalStaticCache().{attribute}"
    return None


def prefetch_problem() -> str | None:
    """One log line naming what the encoder prefetch lacks in this SGLang, or None."""
    missing = missing_piece(names("prefetch"))
    if missing is None:
        return None
    return (
        f"vitbatch: the encoder prefetch is off: SGLang {sglang_version()} lacks {missing}; "
        "vitbatch's step still serves every multimodal step"
    )


def surface_problem(surface: Sequence[Name] | None = None) -> str | None:
    """One log line naming the missing piece and the SGLang version, or None when all is there
    (default: every required name and the embedding cache's fields)."""
    missing = missing_piece(surface)
    if missing is None and surface is None:
        try:
            missing = embedding_cache_problem()
        except Exception as error:  # noqa: BLE001 - an unusable cache class is a missing piece
            missing = f"a usable MultiModalStaticCache ({error})"
    if missing is None:
        return None
    return (
        f"vitbatch is off: SGLang {sglang_version()} lacks {missing}, which the adapter needs "
        "(supported: SGLang 0.5.17 to 0.5.23); SGLang's native multimodal path serves every step"
    )
