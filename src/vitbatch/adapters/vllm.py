"""vLLM adapter: vitbatch behind vLLM's encoder-cache-manager seam.

Enable with ``--ec-manager-config`` (or ``LLM(ec_manager_config=...)``)::

    {"encoder_cache_manager_cls": "vitbatch.adapters.vllm.VitBatchEncoderCacheManager",
     "manager_config": {"max_batch_patches": 16384, "host_cache_bytes": 1073741824}}

Two halves, joined by the per-step metadata vLLM already carries from the
scheduler to the workers (``SchedulerOutput.ec_manager_metadata``):

* **Scheduler side** - :class:`VitBatchEncoderCacheManager`, a subclass of
  vLLM's ``EncoderCacheManager``. vLLM's own accounting stays in charge of the
  device cache. On top of it the manager keeps an index of a *host tier*: when
  vLLM evicts an entry, the worker keeps it in (pinned) host memory instead of
  dropping it, and a later request for the same image counts as cached - it
  costs no encoder budget and is restored by a host-to-device copy. The
  scheduler decides every move (demote, restore, drop) and ships them in
  :class:`VitBatchStepMetadata`, so the workers' host tiers mirror the index
  exactly, on every tensor-parallel rank.
* **Worker side** - while a step's metadata is vitbatch's, the model runner's
  ``_process_encoder_cache_scheduler_output`` applies the tier moves and
  ``_execute_mm_encoder`` routes the step's encoder inputs through
  :class:`vitbatch.core.VitBatcher` (token-budgeted micro-batches, dedup, the
  ``vitbatch_encode_batch`` hook whose default calls vLLM's own
  ``group_and_batch_mm_kwargs`` + ``embed_multimodal``). Any exception inside
  vitbatch is logged once and that step runs vLLM's native path.

Why the patch is installed lazily: vLLM loads general plugins in every process
*before* any config is visible to them, so :func:`register` cannot know whether
vitbatch is configured. The two places that do know install the worker patch:
the manager's ``create_manager`` (the scheduler's process; covers in-process
executors) and the unpickling of :class:`VitBatchStepMetadata` (a worker process
that receives vitbatch's metadata). Without the manager configured, nothing of
vLLM is touched. This is the only module of vitbatch that imports vLLM, and only
inside functions (the manager class is built on first attribute access).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.core import Budget, EmbeddingCache, Item, Span, Totals, VitBatcher
from vitbatch.core.agreement import Agree, group_agree
from vitbatch.metrics import export_batcher

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

# A child of vLLM's logger: our lines appear in vLLM's log stream, with its format and level.
logger = logging.getLogger("vllm.vitbatch")

MANAGER_CLASS_NAME = "VitBatchEncoderCacheManager"
MANAGER_QUALNAME = f"{__name__}.{MANAGER_CLASS_NAME}"


# ---------------------------------------------------------------------------
# Options (``manager_config``)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmOptions:
    """What ``manager_config`` may set.

    :param max_batch_patches: encoder cost units (patches before merging for the
        Qwen-VL family, embedding rows otherwise) in one encoder call; ``None``
        for no limit. vLLM natively encodes all of a step's images of one
        modality in one call; this bounds the call's activation memory.
    :param max_batch_items: items in one encoder call; ``None`` for no limit.
    :param host_cache_bytes: size of the host tier on each worker; 0 disables it.
    :param host_cache_embeds: the same bound in embedding rows (overrides
        ``host_cache_bytes``; the scheduler counts rows, like vLLM's cache).
    :param check_finite: debugging aid: refuse encoder outputs holding NaN/Inf
        (the step then runs vLLM's own path); costs a device sync per call.
    """

    max_batch_patches: int | None = 16384
    max_batch_items: int | None = 64
    host_cache_bytes: int = 1 << 30
    host_cache_embeds: int | None = None
    check_finite: bool = False

    @classmethod
    def from_manager_config(cls, config: Mapping[str, Any] | None) -> VllmOptions:
        """Parse ``manager_config``; an unknown key or a bad value is a clear error."""
        config = dict(config or {})
        if "max_batch_tokens" in config:  # the name before 0.2; same unit (patches)
            if "max_batch_patches" in config:
                raise ValueError(
                    "vitbatch: give max_batch_patches only (max_batch_tokens is its old name)"
                )
            logger.warning("vitbatch: manager_config max_batch_tokens is now max_batch_patches")
            config["max_batch_patches"] = config.pop("max_batch_tokens")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"vitbatch: unknown manager_config key(s) {unknown} in --ec-manager-config; "
                f"expected some of {sorted(known)}"
            )
        options = cls(**config)
        Budget(options.max_batch_patches, options.max_batch_items)  # validates
        if options.host_cache_bytes < 0 or (options.host_cache_embeds or 0) < 0:
            raise ValueError("vitbatch: host_cache_bytes / host_cache_embeds must be >= 0")
        return options

    @property
    def budget(self) -> Budget:
        return Budget(self.max_batch_patches, self.max_batch_items)

    def host_capacity_embeds(self, bytes_per_embed: int) -> int:
        """The host tier's bound in embedding rows."""
        if self.host_cache_embeds is not None:
            return self.host_cache_embeds
        return self.host_cache_bytes // max(1, bytes_per_embed)


# ---------------------------------------------------------------------------
# Scheduler -> worker metadata
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VitBatchStepMetadata:
    """One step's instructions from the scheduler's manager to every worker.

    Plain data (tuples of mm hashes, ints): it is pickled to worker processes.

    :ivar restore: host-tier entries to copy back into the device cache (they
        count as cached for this step's scheduling).
    :ivar demote: hashes of this step's ``free_encoder_mm_hashes`` to keep in
        the host tier instead of dropping.
    :ivar drop: host-tier entries to forget.
    :ivar reset: clear the host tier first (vLLM reset its encoder cache).
    """

    restore: tuple[str, ...] = ()
    demote: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    reset: bool = False
    max_batch_patches: int | None = 16384
    max_batch_items: int | None = 64
    check_finite: bool = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Arriving in a worker process means vitbatch's manager is configured:
        # make sure that process's model runner honours these instructions.
        for name, value in state.items():
            object.__setattr__(self, name, value)
        install_worker_patch()


# ---------------------------------------------------------------------------
# Scheduler side: host-tier index (pure Python) and the manager
# ---------------------------------------------------------------------------


class HostTierIndex:
    """What the workers' host tiers hold: mm hash -> embedding rows, LRU, bounded in rows."""

    def __init__(self, capacity_embeds: int) -> None:
        self.capacity = capacity_embeds
        self.used = 0
        self.entries: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, mm_hash: str) -> bool:
        return mm_hash in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def size(self, mm_hash: str) -> int | None:
        return self.entries.get(mm_hash)

    def put(self, mm_hash: str, num_embeds: int) -> tuple[bool, list[str]]:
        """Add an entry, evicting least recently demoted ones to make room.

        :returns: whether it was stored, and the hashes evicted for it.
        """
        if num_embeds > self.capacity:
            return False, []
        self.pop(mm_hash)
        evicted = []
        while self.used + num_embeds > self.capacity:
            victim, size = self.entries.popitem(last=False)
            self.used -= size
            evicted.append(victim)
        self.entries[mm_hash] = num_embeds
        self.used += num_embeds
        return True, evicted

    def pop(self, mm_hash: str) -> int | None:
        size = self.entries.pop(mm_hash, None)
        if size is not None:
            self.used -= size
        return size

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0


@dataclass
class SchedulerStats:
    """Cumulative counters of the scheduler-side manager."""

    cache_hits: int = 0
    """check_and_update_cache answered True from vLLM's device cache (an embedding
    another request, or an earlier chunk, already computed)."""
    host_restores: int = 0
    """host-tier entries counted as cached and scheduled for a host-to-device copy."""
    revived: int = 0
    """entries evicted earlier in the same scheduling pass and taken back (no copy at all)."""
    demotions: int = 0
    host_drops: int = 0
    restores_refused: int = 0
    """host-tier hits that could not get device-cache room (encoded instead)."""


_managers: weakref.WeakSet[Any] = weakref.WeakSet()
_worker_states: weakref.WeakSet[Any] = weakref.WeakSet()


def _manager_methods(base: type) -> dict[str, Any]:
    """The manager's methods; ``base`` is vLLM's ``EncoderCacheManager``."""

    @classmethod  # type: ignore[misc]
    def create_manager(cls, *, cache_size: int, vllm_config: VllmConfig):
        options = VllmOptions.from_manager_config(vllm_config.ec_manager_config.manager_config)
        model_config = vllm_config.model_config
        if model_config.is_encoder_decoder:
            # vLLM uses a different manager for these and does not cache their
            # encoder outputs; vitbatch leaves them entirely to vLLM.
            from vllm.v1.core.encoder_cache_manager import EncoderDecoderCacheManager

            logger.warning(
                "vitbatch: encoder-decoder model; using vLLM's own encoder cache manager"
            )
            return EncoderDecoderCacheManager(cache_size=cache_size)
        if getattr(vllm_config, "use_v2_model_runner", False):
            # The worker patch drives the V1 model runner only. Without it the
            # host tier would promise restores nobody performs, so stay out.
            logger.warning(
                "vitbatch: vLLM's model runner V2 is in use, which vitbatch does not drive yet; "
                "encoding stays with vLLM. Set VLLM_USE_V2_MODEL_RUNNER=0 to use vitbatch."
            )
            return base(cache_size=cache_size)
        bytes_per_embed = (
            model_config.get_hidden_size()
            * torch.tensor([], dtype=model_config.dtype).element_size()
        )
        install_worker_patch()
        host_capacity = options.host_capacity_embeds(bytes_per_embed)
        logger.info(
            "vitbatch: encoder cache manager on "
            "(device cache %d embeddings, host tier %d embeddings, %s)",
            cache_size,
            host_capacity,
            options.budget,
        )
        return cls(cache_size=cache_size, options=options, host_capacity_embeds=host_capacity)

    def __init__(
        self, cache_size: int, options: VllmOptions | None = None, host_capacity_embeds: int = 0
    ) -> None:
        base.__init__(self, cache_size)
        self.options = options or VllmOptions()
        self.host = HostTierIndex(host_capacity_embeds)
        self.stats = SchedulerStats()
        self._evicted_sizes: dict[str, int] = {}  # evicted this pass -> rows
        self._freed_seen = 0
        self._promised: tuple[str, int] | None = None  # (request id, rows can_allocate promised)
        self._restore: list[str] = []
        self._demote: list[str] = []
        self._drop: list[str] = []
        self._reset = False
        _managers.add(self)

    def reset(self) -> None:
        base.reset(self)
        self.host.clear()
        self._evicted_sizes.clear()
        self._freed_seen = 0
        self._promised = None
        self._restore, self._demote, self._drop = [], [], []
        self._reset = True

    def _note_evictions(self, sizes: Mapping[str, int]) -> None:
        for mm_hash in self.freed[self._freed_seen :]:
            if mm_hash in sizes:
                self._evicted_sizes[mm_hash] = sizes[mm_hash]
        self._freed_seen = len(self.freed)

    def can_allocate(
        self,
        request: Request,
        input_id: int,
        encoder_compute_budget: int,
        num_embeds_to_schedule: int,
    ) -> bool:
        wanted = request.get_num_encoder_embeds(input_id) + num_embeds_to_schedule
        sizes = dict(self.freeable) if wanted > self.num_free_slots else {}
        ok = base.can_allocate(
            self, request, input_id, encoder_compute_budget, num_embeds_to_schedule
        )
        self._note_evictions(sizes)
        if ok:
            self._promised = (request.request_id, wanted)
        return ok

    def allocate(self, request: Request, input_id: int) -> None:
        base.allocate(self, request, input_id)
        self._promised = None

    def check_and_update_cache(self, request: Request, input_id: int) -> bool:
        if base.check_and_update_cache(self, request, input_id):
            self.stats.cache_hits += 1
            return True
        feature = request.mm_features[input_id]
        mm_hash = feature.identifier
        num_embeds = feature.mm_position.get_num_embeds()
        revive = self._evicted_sizes.get(mm_hash) == num_embeds
        if not revive:
            host_rows = self.host.size(mm_hash)
            if host_rows is None:
                return False
            if host_rows != num_embeds:
                # Same identifier, other row count (a reused client UUID): the
                # host copy is stale; forget it so it is never restored.
                self.host.pop(mm_hash)
                self._drop.append(mm_hash)
                self.stats.host_drops += 1
                return False
        if not self._make_room(request, num_embeds):
            self.stats.restores_refused += 1
            return False
        # Same bookkeeping as vLLM's allocate(), minus the compute budget:
        # nothing will be encoded for this entry.
        self.cached.setdefault(mm_hash, set()).add(request.request_id)
        self.num_embeds_by_hash[mm_hash] = num_embeds
        self.request_cached_ids.setdefault(request.request_id, set()).add(input_id)
        self.num_free_slots -= num_embeds
        self.num_freeable_slots -= num_embeds
        if revive:
            # The worker still holds it; vLLM's get_freed_mm_hashes() drops
            # re-cached hashes from the free list.
            del self._evicted_sizes[mm_hash]
            self.stats.revived += 1
        else:
            self.host.pop(mm_hash)
            self._restore.append(mm_hash)
            self.stats.host_restores += 1
        return True

    def _make_room(self, request: Request, num_embeds: int) -> bool:
        """Free device-cache rows for a restore, like can_allocate() but with no compute budget.

        Rows that can_allocate() already promised to this request's earlier
        inputs (allocated only after the request is scheduled) stay reserved.
        """
        promised = (
            self._promised[1] if self._promised and self._promised[0] == request.request_id else 0
        )
        wanted = num_embeds + promised
        if wanted <= self.num_free_slots:
            return True
        if wanted > self.num_freeable_slots:
            return False
        sizes = dict(self.freeable)
        while wanted > self.num_free_slots:
            mm_hash, rows = self.freeable.popitem(last=False)
            del self.cached[mm_hash]
            del self.num_embeds_by_hash[mm_hash]
            self.freed.append(mm_hash)
            self.num_free_slots += rows
        self._note_evictions(sizes)
        return True

    def get_freed_mm_hashes(self) -> list[str]:
        freed = base.get_freed_mm_hashes(self)
        demoted: list[str] = []
        for mm_hash in freed:
            rows = self._evicted_sizes.get(mm_hash)
            if rows is None:
                continue
            stored, evicted = self.host.put(mm_hash, rows)
            for victim in evicted:
                if victim in demoted:
                    demoted.remove(victim)
                else:
                    self._drop.append(victim)
                self.stats.host_drops += 1
            if stored:
                demoted.append(mm_hash)
        self._demote.extend(demoted)
        self.stats.demotions += len(demoted)
        self._evicted_sizes.clear()
        self._freed_seen = 0
        self._promised = None
        return freed

    def get_manager_metadata(self) -> VitBatchStepMetadata:
        metadata = VitBatchStepMetadata(
            restore=tuple(self._restore),
            demote=tuple(self._demote),
            drop=tuple(self._drop),
            reset=self._reset,
            max_batch_patches=self.options.max_batch_patches,
            max_batch_items=self.options.max_batch_items,
            check_finite=self.options.check_finite,
        )
        self._restore, self._demote, self._drop = [], [], []
        self._reset = False
        return metadata

    return {
        "__doc__": (
            "vLLM's EncoderCacheManager plus vitbatch's host tier and per-step worker metadata."
        ),
        "__module__": __name__,
        "__qualname__": MANAGER_CLASS_NAME,
        "create_manager": create_manager,
        "__init__": __init__,
        "reset": reset,
        "_note_evictions": _note_evictions,
        "can_allocate": can_allocate,
        "allocate": allocate,
        "check_and_update_cache": check_and_update_cache,
        "_make_room": _make_room,
        "get_freed_mm_hashes": get_freed_mm_hashes,
        "get_manager_metadata": get_manager_metadata,
    }


@functools.lru_cache(maxsize=1)
def _manager_class() -> type:
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

    return type(MANAGER_CLASS_NAME, (EncoderCacheManager,), _manager_methods(EncoderCacheManager))


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module never imports vLLM;
    # vLLM resolves the class by qualified name (getattr on this module).
    if name == MANAGER_CLASS_NAME:
        return _manager_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------


@dataclass
class WorkerStats:
    """Cumulative counters of one model runner."""

    steps: int = 0
    """encoder steps routed through vitbatch."""
    native_steps: int = 0
    """encoder steps left to vLLM on purpose (LoRA tower, EVS video, prompt embeds...)."""
    fallbacks: int = 0
    """steps where vitbatch raised and vLLM's native path ran instead."""
    cross_request_calls: int = 0
    """encoder calls whose items came from more than one request."""
    already_cached: int = 0
    """scheduled items found in the runner's encoder cache (not encoded again)."""
    host_restores: int = 0
    restore_misses: int = 0
    demotions: int = 0
    host_drops: int = 0
    native_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Payload:
    """What the engine encoder needs back from a core item."""

    request_id: str
    modality: str
    kwargs: Any  # vLLM's MultiModalKwargsItem


class _WorkerState:
    """vitbatch's state on one model runner: the batcher, the host tier, counters."""

    def __init__(
        self,
        metadata: VitBatchStepMetadata,
        hidden_size: int | None = None,
        labels: Mapping[str, str] | None = None,
        agree: Agree | None = None,
    ) -> None:
        labels = labels or {}
        # The device cache is vLLM's (runner.encoder_cache, governed by the
        # scheduler); the core's own cache stays empty (items are not cacheable).
        self.batcher = VitBatcher(
            budget=Budget(metadata.max_batch_patches, metadata.max_batch_items),
            cache=EmbeddingCache(0),
            hidden_size=hidden_size,
            check_finite=metadata.check_finite,
            agree=agree,
        )
        export_batcher(self.batcher, labels)
        self.host: dict[str, torch.Tensor] = {}
        self.missing: set[str] = set()
        self.stats = WorkerStats()
        self._logged: set[str] = set()
        _worker_states.add(self)
        logger.info(
            "vitbatch: encoder steps of this worker run through vitbatch (budget %s)",
            self.batcher.budget,
        )

    def configure(self, metadata: VitBatchStepMetadata) -> None:
        budget = Budget(metadata.max_batch_patches, metadata.max_batch_items)
        if budget != self.batcher.budget:
            self.batcher.budget = budget

    def log_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args, exc_info=exc_info)


_state_lock = threading.Lock()


def _worker_state(runner: Any, metadata: VitBatchStepMetadata) -> _WorkerState:
    state = getattr(runner, "_vitbatch_state", None)
    if state is None:
        with _state_lock:
            state = getattr(runner, "_vitbatch_state", None)
            if state is None:
                group = _agree_group(runner)
                state = _WorkerState(
                    metadata,
                    _expected_hidden_size(runner),
                    _metric_labels(runner),
                    group_agree(group) if group is not None else None,
                )
                runner._vitbatch_state = state
    state.configure(metadata)
    return state


def _expected_hidden_size(runner: Any) -> int | None:
    """The LLM's hidden size: the width of every multimodal embedding vLLM merges."""
    try:
        width = runner.model_config.get_hidden_size()
    except Exception:  # noqa: BLE001 - unknown: the core learns it, carefully
        return None
    return width if isinstance(width, int) and width > 0 else None


def _agree_group(runner: Any) -> Any:
    """The CPU group of the TP ranks that share a sharded vision tower, or ``None``
    (TP 1, or ``mm_encoder_tp_mode="data"``: each rank encodes its own share)."""
    try:
        if runner.model_config.multimodal_config.mm_encoder_tp_mode == "data":
            return None
    except Exception:  # noqa: BLE001 - no such option: the tower follows TP
        pass
    try:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return None
    return group.cpu_group if group.world_size > 1 else None


def _metric_labels(runner: Any) -> dict[str, str]:
    """Prometheus labels like vLLM's own (``model_name``) plus the worker's TP rank."""
    labels: dict[str, str] = {}
    try:
        labels["model_name"] = str(runner.model_config.served_model_name)
    except Exception:  # noqa: BLE001
        pass
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        labels["tp_rank"] = str(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001
        pass
    return labels


def _apply_tier_moves(
    runner: Any,
    state: _WorkerState,
    scheduler_output: SchedulerOutput,
    metadata: VitBatchStepMetadata,
) -> None:
    """Mirror the scheduler's decisions: restore, then free/demote, then drop."""
    offload = state.batcher.offload
    if metadata.reset:
        state.host.clear()
    for mm_hash in metadata.restore:
        host = state.host.pop(mm_hash, None)
        if host is None:
            state.missing.add(mm_hash)  # encoded in this step's _execute_mm_encoder
            state.stats.restore_misses += 1
            continue
        runner.encoder_cache[mm_hash] = offload.to_device(host, runner.device)
        state.stats.host_restores += 1
    demote = set(metadata.demote)
    for mm_hash in scheduler_output.free_encoder_mm_hashes:
        tensor = runner.encoder_cache.pop(mm_hash, None)
        if tensor is not None and mm_hash in demote:
            # A restored entry still has its host tensor: no device->host copy.
            state.host[mm_hash] = offload.release(tensor)
            state.stats.demotions += 1
    for mm_hash in metadata.drop:
        if state.host.pop(mm_hash, None) is not None:
            state.stats.host_drops += 1


def _native_only_reason(runner: Any, modalities: Sequence[str]) -> str | None:
    """Cases whose vLLM branches vitbatch does not reproduce: leave the step to vLLM."""
    if runner.model_config.is_encoder_decoder:
        return "encoder-decoder model"
    if "prompt_embeds" in modalities:
        return "prompt_embeds inputs"
    if getattr(runner, "lora_config", None) and runner.lora_manager.supports_tower_connector_lora():
        return "LoRA on the vision tower/connector"
    if "video" in modalities and (
        getattr(runner, "is_multimodal_pruning_enabled", False)
        or getattr(runner, "requires_sequential_video_encoding", False)
    ):
        return "EVS / sequential video encoding"
    observability = getattr(runner, "observability_config", None)
    if observability is not None and getattr(observability, "enable_mm_processor_stats", False):
        return "per-item encoder timing (enable_mm_processor_stats)"
    return None


def _item_cost(kwargs: Any, num_embeds: int) -> int:
    """Encoder work of one item: patches before merging when the item has a ``*_grid_thw``."""
    for name in ("image_grid_thw", "video_grid_thw"):
        if name in kwargs:
            grid = kwargs[name].data
            if isinstance(grid, torch.Tensor) and grid.numel() == 3:
                return max(1, math.prod(int(v) for v in grid.tolist()))
    return num_embeds


def _item_features(kwargs: Any) -> dict[str, torch.Tensor]:
    """The item's tensors by field name, for third-party encoder plugins (no copy)."""
    return {name: elem.data for name, elem in kwargs.items() if isinstance(elem.data, torch.Tensor)}


def _engine_encoder(runner: Any, state: _WorkerState):
    """vLLM's own encoding of a micro-batch: its batching, cudagraphs if any, embed_multimodal."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.utils.torch_utils import PIN_MEMORY
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    def encode(items: Sequence[Item]) -> list[torch.Tensor]:
        if len({item.payload.request_id for item in items}) > 1:
            state.stats.cross_request_calls += 1
        mm_kwargs = [(item.payload.modality, item.payload.kwargs) for item in items]
        outputs: list[torch.Tensor] = []
        for modality, num_items, batch in group_and_batch_mm_kwargs(
            mm_kwargs, device=runner.device, pin_memory=PIN_MEMORY
        ):
            result = None
            graphs = getattr(runner, "encoder_cudagraph_manager", None)
            if graphs is not None and graphs.supports_modality(modality):
                result = graphs.execute(batch)
            if result is None:
                result = runner.model.embed_multimodal(**batch)
            sanity_check_mm_encoder_outputs(result, expected_num_items=num_items)
            outputs.extend(result)
        return outputs

    return encode


def _find_feature(runner: Any, mm_hash: str) -> tuple[str, Any] | None:
    """A (request id, feature) of a live request carrying ``mm_hash`` with its data."""
    for request_id, request_state in runner.requests.items():
        for feature in request_state.mm_features or ():
            if feature.identifier == mm_hash and feature.data is not None:
                return request_id, feature
    return None


def _encode_step(
    runner: Any,
    state: _WorkerState,
    scheduler_output: SchedulerOutput,
    scheduled: tuple[list[str], list[tuple[str, Any]], list[tuple[str, Any]]],
) -> list[torch.Tensor]:
    """Encode the step's scheduled inputs (and restores whose host copy is missing) through
    the core."""
    metadata = scheduler_output.ec_manager_metadata
    mm_hashes, mm_kwargs, refs = scheduled
    entries = [
        (h, modality, kwargs, request_id, position)
        for h, (modality, kwargs), (request_id, position) in zip(mm_hashes, mm_kwargs, refs)
    ]
    for mm_hash in sorted(state.missing):  # restores whose host copy was missing
        found = _find_feature(runner, mm_hash)
        if found is not None and mm_hash not in mm_hashes:
            request_id, feature = found
            entries.append(
                (mm_hash, feature.modality, feature.data, request_id, feature.mm_position)
            )
    if not entries:
        state.missing.clear()
        return []
    items = []
    for mm_hash, modality, kwargs, request_id, position in entries:
        num_embeds = position.get_num_embeds()
        if mm_hash in runner.encoder_cache:
            state.stats.already_cached += 1
            continue
        items.append(
            Item(
                hash=mm_hash,
                modality=modality,
                num_tokens=num_embeds,
                spans=(Span(position.offset, num_embeds),),
                features=_item_features(kwargs),
                cost=_item_cost(kwargs, num_embeds),
                group=tuple(sorted(kwargs.keys())),
                cacheable=False,  # vLLM's encoder_cache is the cache; don't keep a second copy
                payload=_Payload(request_id, modality, kwargs),
            )
        )
    embeddings = state.batcher.encode(items, _engine_encoder(runner, state)) if items else {}
    outputs = []
    for item in items:
        output = embeddings[item.key]
        if item.hash not in runner.encoder_cache:
            runner._cache_encoder_output(
                item.hash, output, metadata, scheduler_output.free_encoder_mm_hashes
            )
        outputs.append(output)
    state.missing.clear()  # only now: if anything above raised, the native path handles them
    state.stats.steps += 1
    return outputs


def _encode_missing_natively(runner: Any, state: _WorkerState) -> None:
    """Restores whose host copy was missing, when the step ran vLLM's native path."""
    if not state.missing:
        return
    missing, state.missing = sorted(state.missing), set()
    encode = _engine_encoder(runner, state)
    for mm_hash in missing:
        found = _find_feature(runner, mm_hash)
        if found is None or mm_hash in runner.encoder_cache:
            continue
        request_id, feature = found
        item = Item(
            mm_hash,
            feature.modality,
            feature.mm_position.get_num_embeds(),
            (Span(feature.mm_position.offset, feature.mm_position.get_num_embeds()),),
            payload=_Payload(request_id, feature.modality, feature.data),
        )
        runner.encoder_cache[mm_hash] = encode([item])[0]


def _patched_process(original):
    @functools.wraps(original)
    def _process_encoder_cache_scheduler_output(
        self: GPUModelRunner, scheduler_output: SchedulerOutput
    ) -> None:
        metadata = scheduler_output.ec_manager_metadata
        if not isinstance(metadata, VitBatchStepMetadata):
            return original(self, scheduler_output)
        state = _worker_state(self, metadata)
        try:
            _apply_tier_moves(self, state, scheduler_output, metadata)
        except Exception:  # noqa: BLE001 - any failure: fall back to vLLM, keep serving
            state.stats.fallbacks += 1
            state.batcher.note_fallback("error")
            state.log_once(
                "tiers", "vitbatch: host-tier update failed; freeing as vLLM does", exc_info=True
            )
            # Whatever was not restored is encoded in _execute_mm_encoder.
            state.missing.update(h for h in metadata.restore if h not in self.encoder_cache)
            return original(self, scheduler_output)
        return None

    _process_encoder_cache_scheduler_output.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return _process_encoder_cache_scheduler_output


def _patched_execute(original):
    @functools.wraps(original)
    def _execute_mm_encoder(
        self: GPUModelRunner, scheduler_output: SchedulerOutput
    ) -> list[torch.Tensor]:
        metadata = scheduler_output.ec_manager_metadata
        if not isinstance(metadata, VitBatchStepMetadata):
            return original(self, scheduler_output)
        state = _worker_state(self, metadata)
        if not scheduler_output.scheduled_encoder_inputs and not state.missing:
            return original(self, scheduler_output)  # nothing to encode (decode steps)
        try:
            scheduled = self._batch_mm_inputs_from_scheduler(scheduler_output)
            reason = _native_only_reason(self, [modality for modality, _ in scheduled[1]])
            if reason is None:
                return _encode_step(self, state, scheduler_output, scheduled)
            state.stats.native_steps += 1
            state.stats.native_reasons[reason] = state.stats.native_reasons.get(reason, 0) + 1
            state.batcher.note_fallback("unsupported")
            state.log_once(
                "native:" + reason, "vitbatch: %s - these steps run vLLM's own encoder path", reason
            )
        except Exception:  # noqa: BLE001 - any failure: fall back to vLLM, keep serving
            state.stats.fallbacks += 1
            state.batcher.note_fallback("error")
            state.log_once(
                "encode",
                "vitbatch: encoding failed; running vLLM's native encoder path for this step",
                exc_info=True,
            )
        outputs = original(self, scheduler_output)
        _encode_missing_natively(self, state)
        return outputs

    _execute_mm_encoder.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return _execute_mm_encoder


_patch_lock = threading.Lock()


def install_worker_patch() -> bool:
    """Route vLLM's model runner through vitbatch for steps carrying vitbatch's metadata.

    Idempotent and thread-safe. Steps without vitbatch's metadata run vLLM's
    code unchanged. Returns whether the patch is in place.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    with _patch_lock:
        for name, wrap in (
            ("_process_encoder_cache_scheduler_output", _patched_process),
            ("_execute_mm_encoder", _patched_execute),
        ):
            current = getattr(GPUModelRunner, name)
            if not hasattr(current, "__vitbatch_original__"):
                setattr(GPUModelRunner, name, wrap(current))
    from vitbatch.adapters.vllm_v2 import install_v2_patch

    install_v2_patch()  # Model Runner V2 (GPU default); False where this vLLM lacks it
    return True


def uninstall_worker_patch() -> None:
    """Restore vLLM's methods (tests)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    with _patch_lock:
        for name in ("_process_encoder_cache_scheduler_output", "_execute_mm_encoder"):
            current = getattr(GPUModelRunner, name)
            original = getattr(current, "__vitbatch_original__", None)
            if original is not None:
                setattr(GPUModelRunner, name, original)


# ---------------------------------------------------------------------------
# Entry point and statistics
# ---------------------------------------------------------------------------

_registered = False


def register() -> None:
    """``vllm.general_plugins`` entry point: loaded in every vLLM process.

    Deliberately does nothing to vLLM: whether vitbatch is on is decided by
    ``--ec-manager-config``, which is not visible here, and the patch is
    installed where it is (see the module docstring). Idempotent.
    """
    global _registered
    if not _registered:
        _registered = True
        logger.debug(
            "vitbatch vLLM plugin loaded; enable it with --ec-manager-config (%s)", MANAGER_QUALNAME
        )


def stats() -> dict[str, Any]:
    """This process's vitbatch counters: scheduler manager(s) and model runner(s).

    ``worker.batcher`` is the core's :class:`~vitbatch.core.stats.Totals` summed
    over the runners (encoder calls, items, cost-per-call histogram...).
    """
    scheduler = SchedulerStats()
    for manager in list(_managers):
        for f in fields(SchedulerStats):
            setattr(scheduler, f.name, getattr(scheduler, f.name) + getattr(manager.stats, f.name))
    worker = WorkerStats()
    batcher = Totals()
    for state in list(_worker_states):
        for f in fields(WorkerStats):
            mine = getattr(worker, f.name)
            theirs = getattr(state.stats, f.name)
            if isinstance(mine, dict):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            else:
                setattr(worker, f.name, mine + theirs)
        batcher.merge(state.batcher.totals)
    host_entries = sum(len(state.host) for state in list(_worker_states))
    return {
        "scheduler": asdict(scheduler),
        "worker": {**asdict(worker), "host_entries": host_entries, "batcher": batcher.as_dict()},
    }
