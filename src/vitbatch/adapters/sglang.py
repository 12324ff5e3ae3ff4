"""SGLang adapter: the only module that imports SGLang.

How it plugs in (SGLang 0.5.19 to 0.5.23; where they differ, ``sglang_surface``
probes the installed one):

- ``register()`` is the ``sglang.srt.plugins`` entry point. SGLang calls it in
  the launcher (before parsing arguments), in ``Engine.__init__`` and in every
  scheduler / DP-controller / detokenizer process. It is idempotent.
- It always adds the ``--enable-vit-batching`` option group to SGLang's parser
  and, when the flag is given, copies the settings into ``VITBATCH_*``
  environment variables: ``ServerArgs`` keeps only its own fields, and the
  scheduler processes inherit the environment and load plugins themselves.
- Only when enabled (flag or ``VITBATCH_ENABLE=1``) does it wrap
  ``mm_schedule._get_chunked_prefill_embedding``; otherwise SGLang's multimodal
  path is untouched.

The wrapper turns the step's ``MultimodalDataItem``s into core items, lets the
core plan, encode (``vitbatch_encode_batch``, default: SGLang's own
``data_embedding_func``), cache and assemble, and returns the tensor SGLang
expects. Requests SGLang sends through its per-request "full" path (multi-run
non-audio items, EVS) keep that native path. Any exception: log once, run
SGLang's own function for that step.

One cache: vitbatch's device tier *is* SGLang's ``mm_schedule.embedding_cache``
(``sglang_cache``), so what either side encodes is a hit for the other, memory
stays within what SGLang reserved, and ``init_mm_embedding_cache()`` resets what
vitbatch sees. ``--vit-batch-host-cache-mb`` adds a pinned host tier below it.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters import sglang_surface as surface
from vitbatch.adapters.sglang_cache import SGLangDeviceTier
from vitbatch.core import Budget, EmbeddingCache, Item, RequestChunk, Span, VitBatcher, Window
from vitbatch.core.agreement import group_agree
from vitbatch.metrics import export_batcher

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem

logger = logging.getLogger("vitbatch.sglang")

TARGET = "sglang.srt.managers.mm_schedule._get_chunked_prefill_embedding"
MB = 1 << 20
BOOLEANS = ("enabled", "check_finite")
RENAMED_ENV = "VITBATCH_MAX_TOKENS"
RENAMED_MESSAGE = (
    "vitbatch: --vit-batch-max-tokens / VITBATCH_MAX_TOKENS (embedding tokens) was replaced by "
    "--vit-batch-max-patches / VITBATCH_MAX_PATCHES: vision patches per encoder call before "
    "spatial merging, the unit of every vitbatch budget (4 patches per token for 2x2-merge "
    "models such as Qwen2.5-VL; default 16384)"
)


# ---------------------------------------------------------------------------
# Settings: flags → environment → every process
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the flags say, in the form that travels through the environment.

    ``cache_mb`` is deprecated and ignored (still validated, so an old launch
    line with a bad value fails as before): vitbatch's device cache is SGLang's
    own, sized by ``SGLANG_VLM_CACHE_SIZE_MB`` — the memory SGLang sets aside
    from the KV-cache budget — so there is no second bound to choose.
    """

    enabled: bool = False
    max_patches: int = 16384
    max_items: int = 64
    cache_mb: int | None = None
    host_cache_mb: int = 0
    check_finite: bool = False

    ENV = {
        "enabled": "VITBATCH_ENABLE",
        "check_finite": "VITBATCH_CHECK_FINITE",
        "max_patches": "VITBATCH_MAX_PATCHES",
        "max_items": "VITBATCH_MAX_ITEMS",
        "cache_mb": "VITBATCH_CACHE_MB",
        "host_cache_mb": "VITBATCH_HOST_CACHE_MB",
    }
    FLAGS = {
        "max_patches": "vit_batch_max_patches",
        "max_items": "vit_batch_max_items",
        "cache_mb": "vit_batch_cache_mb",
        "host_cache_mb": "vit_batch_host_cache_mb",
    }

    def __post_init__(self) -> None:
        """A bad value stops the launch here, naming the flag, not at the first image."""
        for name, flag in self.FLAGS.items():
            value = getattr(self, name)
            if value is None and name == "cache_mb":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"vitbatch: --{flag.replace('_', '-')} / {self.ENV[name]} must be an integer "
                    f">= 0 (0: {'unbounded' if name.startswith('max_') else 'off'}), got {value!r}"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        if environ.get(RENAMED_ENV):
            raise ValueError(RENAMED_MESSAGE)
        values: dict[str, Any] = {}
        for name, variable in cls.ENV.items():
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            if name in BOOLEANS:
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r}: expected an integer") from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        env = {}
        for name, variable in self.ENV.items():
            value = getattr(self, name)
            if name in BOOLEANS:
                env[variable] = "1" if value else "0"
            elif value is not None:
                env[variable] = str(value)
        return env

    def budget(self) -> Budget:
        """Budget in encoder patches (``Item.cost``, see :func:`core_item`)."""
        return Budget(self.max_patches or None, self.max_items or None)

    def deprecation(self) -> str | None:
        """The warning a deprecated setting earns, or ``None``."""
        if self.cache_mb is None:
            return None
        return (
            f"vitbatch: --vit-batch-cache-mb / VITBATCH_CACHE_MB ({self.cache_mb}) is deprecated "
            "and ignored: vitbatch now shares SGLang's embedding cache, sized by "
            "SGLANG_VLM_CACHE_SIZE_MB (0 turns it off); --vit-batch-host-cache-mb adds a host tier"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add vitbatch's options to SGLang's argument parser.

    Defaults are ``None`` so that an option not given leaves a ``VITBATCH_*``
    value the user exported untouched.
    """
    defaults = Settings()
    group = parser.add_argument_group("vitbatch (cross-request ViT batching)")
    group.add_argument(
        "--enable-vit-batching",
        action="store_true",
        help="Encode the images of all requests of a step in token-budgeted ViT calls (vitbatch).",
    )
    group.add_argument(
        "--vit-batch-max-patches",
        type=int,
        default=None,
        help="Most vision patches (before spatial merging) per vision-encoder call, 0: unbounded "
        f"(default {defaults.max_patches}).",
    )
    group.add_argument("--vit-batch-max-tokens", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument(
        "--vit-batch-check-finite",
        action="store_true",
        default=None,
        help="Debugging aid: refuse encoder outputs holding NaN/Inf (naming the item) and let "
        "SGLang's own path serve that step. Costs a device sync per encoder call.",
    )
    group.add_argument(
        "--vit-batch-max-items",
        type=int,
        default=None,
        help=f"Most items per vision-encoder call, 0: unbounded (default {defaults.max_items}).",
    )
    group.add_argument(
        "--vit-batch-cache-mb",
        type=int,
        default=None,
        help="Deprecated, ignored: vitbatch uses SGLang's embedding cache "
        "(size it with SGLANG_VLM_CACHE_SIZE_MB).",
    )
    group.add_argument(
        "--vit-batch-host-cache-mb",
        type=int,
        default=None,
        help="Pinned host tier keeping evicted embeddings, MiB, 0: off "
        f"(default {defaults.host_cache_mb}).",
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """The environment's settings, overridden by the options actually given."""
    if getattr(args, "vit_batch_max_tokens", None) is not None:
        raise ValueError(RENAMED_MESSAGE)
    base = Settings.from_env(environ)
    given = {
        name: getattr(args, flag)
        for name, flag in Settings.FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    enabled = base.enabled or bool(getattr(args, "enable_vit_batching", False))
    check_finite = base.check_finite or bool(getattr(args, "vit_batch_check_finite", False))
    return replace(base, enabled=enabled, check_finite=check_finite, **given)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

_registered = False


def register() -> None:
    """``sglang.srt.plugins`` entry point: cheap, idempotent, patches the mm path only when
    enabled."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args", _after_from_cli_args, HookType.AFTER
    )
    if Settings.from_env().enabled:
        _register_mm_hook()


def _after_add_cli_args(_result: None, parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)


def _after_from_cli_args(_result: Any, _cls: type, args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    if not settings.enabled:
        return
    os.environ.update(settings.to_env())  # spawned scheduler processes read these
    if (warning := settings.deprecation()) is not None:
        logger.warning("%s", warning)
    _register_mm_hook()
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()  # this process's plugins already ran: patch it now too (fork)


_mm_hook_registered = False


def _register_mm_hook() -> None:
    global _mm_hook_registered
    if _mm_hook_registered:
        return
    _mm_hook_registered = True
    problem = surface.surface_problem()
    if problem is not None:  # one line, and SGLang runs untouched
        logger.error("%s", problem)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_chunked_prefill, HookType.AROUND)


# ---------------------------------------------------------------------------
# Per-process state
# ---------------------------------------------------------------------------


class AdapterState:
    """The batcher of this scheduler process, and what went wrong so far."""

    def __init__(self, settings: Settings) -> None:
        cache = EmbeddingCache(
            device_tier=SGLangDeviceTier(), host_capacity_bytes=settings.host_cache_mb * MB
        )
        self.settings = settings
        self.batcher = VitBatcher(
            settings.budget(),
            cache,
            check_finite=settings.check_finite,
            agree=group_agree(group) if (group := _agree_group()) is not None else None,
        )
        self.fallbacks = 0
        self.unsupported = 0
        self._logged: set[str] = set()
        if (warning := settings.deprecation()) is not None:
            self.log_once("deprecated", "%s", warning)
        self._model_seen = False
        export_batcher(self.batcher, _metric_labels())

    def see_model(self, data_embedding_func: Callable) -> None:
        """Take the embedding width from the model the first time a step names it."""
        if not self._model_seen:
            self._model_seen = True
            width = _expected_hidden_size(data_embedding_func)
            if width is not None:
                self.batcher.set_hidden_size(width)

    def log_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning(message, *args, exc_info=exc_info)


_state: AdapterState | None = None
_state_error_logged = False


def _log_state_error(error: Exception) -> None:
    global _state_error_logged
    if not _state_error_logged:
        _state_error_logged = True
        logger.error("vitbatch could not start (%s); SGLang's native path serves every step", error)


def _expected_hidden_size(data_embedding_func: Callable) -> int | None:
    """The LLM's hidden size (what every multimodal embedding row must have), read
    from the model that owns ``data_embedding_func`` (a bound method of the model,
    or a callable model); ``None`` when no config says it."""
    owner = getattr(data_embedding_func, "__self__", data_embedding_func)
    config = getattr(owner, "config", None)
    for candidate in (getattr(config, "text_config", None), config):
        width = getattr(candidate, "hidden_size", None)
        if isinstance(width, int) and width > 0:
            return width
    return None


def _agree_group() -> Any:
    """The CPU group of the attention-TP ranks, or ``None`` at attention-TP size 1.

    Every encoder call at attention-TP > 1 is a collective: the tower is sharded
    over the group, and with ``--mm-enable-dp-encoder`` each call's items are
    split over the ranks and all-gathered. Each rank has its own copy of
    SGLang's embedding cache (a per-process global), and the caches drift apart
    (a step served natively on one rank's terms, an eviction order changed by a
    failed restore), so a hit on one rank may be a miss on another. SGLang after
    0.5.23 agrees its cache misses over this group before encoding (a SUM
    all-reduce of per-item miss flags; an item missed anywhere is encoded
    everywhere); vitbatch's agreement 1 (``vitbatch.core.agreement``) does the
    same for its own plan — per distinct item "no usable cached embedding",
    MAX-reduced — plus a step checksum and the call capacity, so its micro-batches
    are identical on every rank whatever each rank's cache holds."""
    try:
        from sglang.srt.distributed.parallel_state import get_attn_tp_group

        group = get_attn_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return None
    if group is None or group.world_size <= 1:
        return None
    return group.cpu_group


def _metric_labels() -> dict[str, str]:
    """Prometheus labels of this scheduler process, as far as SGLang tells them."""
    labels: dict[str, str] = {}
    try:
        from sglang.srt.server_args import get_global_server_args

        args = get_global_server_args()
        labels["model_name"] = str(args.served_model_name or args.model_path)
    except Exception:
        pass
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        labels["tp_rank"] = str(get_tensor_model_parallel_rank())
    except Exception:
        pass
    return labels


def get_state() -> AdapterState:
    global _state
    if _state is None:
        _state = AdapterState(Settings.from_env())
    return _state


def reset_state(settings: Settings | None = None) -> AdapterState:
    """A fresh batcher (tests; or after changing the settings)."""
    global _state
    _state = AdapterState(settings or Settings.from_env())
    return _state


# ---------------------------------------------------------------------------
# The interception
# ---------------------------------------------------------------------------


class Unsupported(Exception):
    """A step the core cannot reproduce exactly; SGLang's native path serves it."""


def _around_chunked_prefill(
    original: Callable[..., tuple[torch.Tensor | None, torch.Tensor]], *args: Any, **kwargs: Any
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The AROUND hook: SGLang's arguments pass through unchanged to
    :func:`chunked_prefill_embedding`, or to ``original`` if vitbatch cannot serve the step."""
    if kwargs:  # SGLang passes all seven positionally; anything else is not ours to guess
        return original(*args, **kwargs)
    state: AdapterState | None = None
    try:
        state = get_state()  # inside the try: a state that cannot be built costs speed only
        state.see_model(args[0])
        return chunked_prefill_embedding(state, original, *args)
    except Unsupported as reason:
        state.unsupported += 1
        state.batcher.note_fallback("unsupported")
        state.log_once(
            f"unsupported:{reason}", "vitbatch: SGLang's native path serves steps with %s", reason
        )
    except Exception as error:  # a plugin bug must cost speed, never a request
        if state is None:  # vitbatch could not even start: say so once, serve natively
            _log_state_error(error)
            return original(*args)
        state.fallbacks += 1
        state.batcher.note_fallback("error")
        state.log_once(
            f"error:{type(error).__name__}",
            "vitbatch failed on a step (%s: %s); SGLang's native path serves it "
            "(logged once per error type)",
            type(error).__name__,
            error,
            exc_info=True,
        )
    return original(*args)


def core_item(item: MultimodalDataItem) -> Item:
    """A ``MultimodalDataItem`` as a core item (SGLang offsets are inclusive ``(start, end)``)."""
    spans = tuple(Span(start, end - start + 1) for start, end in item.offsets)
    feature = item.feature if isinstance(item.feature, torch.Tensor) else None
    num_tokens = sum(span.length for span in spans)
    return Item(
        hash=item.hash,
        modality=str(getattr(item.modality, "name", item.modality)).lower(),
        num_tokens=num_tokens,
        spans=spans,
        features=feature,
        cost=_patches(feature, num_tokens),
        payload=item,
    )


def _patches(feature: torch.Tensor | None, num_tokens: int) -> int:
    """Encoder input units of an item: the rows of a flattened-patch feature
    (Qwen-VL family: one row per patch before merging); embedding rows where the
    feature has another layout (e.g. ``[images, C, H, W]`` pixel tensors)."""
    if feature is not None and feature.dim() == 2 and feature.shape[0] >= num_tokens:
        return int(feature.shape[0])
    return num_tokens


def _check_order(items: Sequence[Item]) -> None:
    """SGLang assembles item by item; the core by position. They agree unless items interleave."""
    previous_end = -1
    for item in items:
        for span in item.spans:
            if span.offset < previous_end:
                raise Unsupported("interleaved multimodal items")
            previous_end = span.end


def chunked_prefill_embedding(
    state: AdapterState,
    original: Callable[..., tuple[torch.Tensor | None, torch.Tensor]],
    data_embedding_func: Callable,
    embedding_items: list[MultimodalDataItem],
    items_size: list[int],
    prefix_length: list[int],
    extend_length: list[int],
    items_offset_list: list[list[tuple[int, int]]],
    input_ids: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """vitbatch's version of ``_get_chunked_prefill_embedding``: same inputs, same outputs."""
    from sglang.srt.managers import mm_schedule

    device = input_ids.device
    last = min(len(items_size) - 1, len(prefix_length))  # SGLang's eagle3 workaround, kept
    chunks: list[RequestChunk] = []
    full_path: list[int] = []
    for index in range(last):
        if items_size[index] == items_size[index + 1]:
            continue
        extend = extend_length[index] if index < len(extend_length) else 0
        if extend <= 0:
            continue
        window = Window.from_prefix(prefix_length[index], extend)
        offsets = items_offset_list[index]
        request_items = embedding_items[items_size[index] : items_size[index + 1]]
        if not surface.per_image_request(request_items):  # multi-run items / EVS
            if surface.runs_full_path(offsets, window.start, window.end):
                full_path.append(index)  # SGLang's own per-request path
            continue
        if not any(end >= window.start and start < window.end for start, end in offsets):
            continue
        items = [core_item(item) for item in request_items]
        _check_order(items)
        chunks.append(RequestChunk(items, window, request_id=index))

    borrowable = {
        id(item.payload)
        for chunk in chunks
        for item in chunk.items
        if item.spans[0].offset >= chunk.window.start and item.spans[-1].end <= chunk.window.end
    }
    moved: list[MultimodalDataItem] = []
    encoder = _engine_encoder(state, data_embedding_func, device, borrowable, moved)
    pieces: list[tuple[int, torch.Tensor]] = []
    try:
        if chunks:
            result = state.batcher.run_step(chunks, encoder)
            pieces.extend(
                (chunk.request_id, embedding)
                for chunk, embedding in zip(chunks, result.embeddings)
                if embedding is not None
            )
    finally:
        _release_features(state, moved)

    for index in full_path:
        embedding, input_ids = mm_schedule._get_chunked_embedding_full(
            data_embedding_func,
            embedding_items[items_size[index] : items_size[index + 1]],
            items_offset_list[index],
            prefix_length[index],
            extend_length[index],
            input_ids,
            device,
        )
        if embedding is not None:
            pieces.append((index, embedding))

    pieces.sort(key=lambda piece: piece[0])
    if not pieces:
        return None, input_ids
    if len(pieces) == 1:
        return pieces[0][1], input_ids
    return torch.cat([embedding for _, embedding in pieces], dim=0), input_ids


def _engine_encoder(
    state: AdapterState,
    data_embedding_func: Callable,
    device: torch.device,
    borrowable: set[int],
    moved: list[MultimodalDataItem],
) -> Callable[[Sequence[Item]], list[torch.Tensor] | torch.Tensor]:
    """SGLang's ``data_embedding_func`` as an engine encoder over core items.

    Features go to the device through the batcher's CPU-reference offload so
    that releasing them later hands the host tensor back instead of copying.
    """
    from sglang.srt.managers import mm_schedule

    borrow_key = surface.borrow_cuda_ipc_key()
    defer_move = mm_schedule._can_skip_pre_embed_feature_move(data_embedding_func)

    def encode(items: Sequence[Item]) -> list[torch.Tensor] | torch.Tensor:
        engine_items = [item.payload for item in items]
        for engine_item in engine_items:
            if (
                borrow_key is not None
                and id(engine_item) in borrowable
                and engine_item.can_defer_cuda_ipc_feature_reconstruction()
            ):
                engine_item.model_specific_data[borrow_key] = True
        _wait_for_native_offload(engine_items, device, defer_move)
        if not defer_move:
            for engine_item in engine_items:
                feature = engine_item.feature
                if isinstance(feature, torch.Tensor) and feature.device != device:
                    engine_item.feature = state.batcher.offload.to_device(feature, device)
                    moved.append(engine_item)
        output = data_embedding_func(engine_items)
        if isinstance(output, list):
            return [embedding.reshape(-1, embedding.shape[-1]) for embedding in output]
        if isinstance(output, torch.Tensor):
            return output.reshape(-1, output.shape[-1])
        return output  # the core reports anything else as a clear error → native fallback

    return encode


def _wait_for_native_offload(
    items: Sequence[MultimodalDataItem], device: torch.device, defer_move: bool
) -> None:
    """Host features may still be arriving from SGLang's own async copy-back of a previous step."""
    event = surface.host_offload_event()
    if event is None or not any(
        isinstance(i.feature, torch.Tensor) and i.feature.is_cpu for i in items
    ):
        return
    if defer_move or device.type != "cuda":
        event.synchronize()
    else:
        torch.cuda.current_stream(device).wait_event(event)


def _release_features(state: AdapterState, moved: Sequence[MultimodalDataItem]) -> None:
    """Hand the host tensors back now: SGLang's post-forward copy-back then finds
    host features and copies nothing. Safe without a sync: the device copies
    were only used on the current stream, which orders their reuse."""
    offload = state.batcher.offload
    for engine_item in moved:
        feature = engine_item.feature
        if isinstance(feature, torch.Tensor) and offload.host_reference(feature) is not None:
            engine_item.feature = offload.release(feature)
