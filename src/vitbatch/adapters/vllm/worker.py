"""Worker side: vitbatch's state on a model runner, the host-tier moves, the V1 runner.

Both of vLLM's model runners keep encoder outputs in a dict keyed by mm hash
(V1: ``runner.encoder_cache``; V2: ``runner.encoder_cache.encoder_outputs``)
and free entries the scheduler lists in ``free_encoder_mm_hashes``. Everything
here works on such a dict, so the V1 wrappers below and the V2 wrappers in
:mod:`.worker_v2` share it:

* before vLLM frees (V1 ``_update_states``, V2 ``free_states``),
  :func:`apply_tier_moves` restores, demotes and drops as the step's
  :class:`~.metadata.VitBatchStepMetadata` says;
* the encoder call goes through :class:`vitbatch.core.VitBatcher`
  (token-budgeted micro-batches, dedup, the ``vitbatch_encode_batch`` hook whose
  default calls vLLM's own ``group_and_batch_mm_kwargs`` + ``embed_multimodal``).

Any exception inside vitbatch is logged once and that step runs vLLM's path.
Steps without vitbatch's metadata run vLLM's code unchanged.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata, read
from vitbatch.core import Budget, EmbeddingCache, Item, Span, VitBatcher
from vitbatch.core.agreement import group_agree
from vitbatch.metrics import export_batcher

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput

logger = logging.getLogger("vllm.vitbatch")

states: weakref.WeakSet[WorkerState] = weakref.WeakSet()


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
class Payload:
    """What the engine encoder needs back from a core item."""

    request_id: str
    modality: str
    kwargs: Any  # vLLM's MultiModalKwargsItem


class WorkerState:
    """vitbatch's state on one model runner: the batcher, the host tier, counters.

    The device cache is vLLM's (the scheduler governs it); the core's own cache
    stays empty (items are not cacheable). The host tier is a plain dict: the
    scheduler's index bounds it and decides every move, so it needs no policy.
    """

    def __init__(self, runner: Any, metadata: VitBatchStepMetadata, runner_kind: str) -> None:
        group = agree_group(runner)
        self.runner_kind = runner_kind
        self.batcher = VitBatcher(
            budget=Budget(metadata.max_batch_patches, metadata.max_batch_items),
            cache=EmbeddingCache(0),
            hidden_size=expected_hidden_size(runner),
            check_finite=metadata.check_finite,
            agree=group_agree(group) if group is not None else None,
        )
        export_batcher(self.batcher, metric_labels(runner))
        self.host: dict[str, torch.Tensor] = {}
        self.missing: set[str] = set()
        self.stats = WorkerStats()
        self._logged: set[str] = set()
        states.add(self)
        logger.info(
            "vitbatch: encoder steps of this worker (model runner %s) run through vitbatch (%s)",
            runner_kind,
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

    def note_native(self, reason: str) -> None:
        self.stats.native_steps += 1
        self.stats.native_reasons[reason] = self.stats.native_reasons.get(reason, 0) + 1
        self.batcher.note_fallback("unsupported")
        self.log_once("native:" + reason, "vitbatch: %s - these steps run vLLM's own path", reason)

    def note_error(self, what: str) -> None:
        self.stats.fallbacks += 1
        self.batcher.note_fallback("error")
        self.log_once(what, "vitbatch: %s failed; vLLM's own path runs", what, exc_info=True)


_state_lock = threading.Lock()


def worker_state(runner: Any, metadata: VitBatchStepMetadata, runner_kind: str) -> WorkerState:
    """The runner's state, built on its first vitbatch step."""
    state = getattr(runner, "_vitbatch_state", None)
    if state is None:
        with _state_lock:
            state = getattr(runner, "_vitbatch_state", None)
            if state is None:
                state = WorkerState(runner, metadata, runner_kind)
                runner._vitbatch_state = state
    state.configure(metadata)
    return state


def expected_hidden_size(runner: Any) -> int | None:
    """The LLM's hidden size: the width of every multimodal embedding vLLM merges."""
    try:
        width = runner.model_config.get_hidden_size()
    except Exception:  # noqa: BLE001 - unknown: the core learns it, carefully
        return None
    return width if isinstance(width, int) and width > 0 else None


def agree_group(runner: Any) -> Any:
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


def metric_labels(runner: Any) -> dict[str, str]:
    """Prometheus labels like vLLM's own (``model_name``) plus the worker's TP rank."""
    labels: dict[str, str] = {"engine": "vllm"}
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


def apply_tier_moves(
    cache: MutableMapping[str, torch.Tensor],
    device: torch.device,
    state: WorkerState,
    freed: Iterable[str],
    metadata: VitBatchStepMetadata,
) -> None:
    """Mirror the scheduler's decisions on the runner's encoder-output dict ``cache``.

    Runs before vLLM frees this step's ``freed`` hashes: restores first, then
    the demoted entries leave ``cache`` for the host tier (vLLM's free then
    finds nothing to pop), then drops.
    """
    offload = state.batcher.offload
    if metadata.reset:
        state.host.clear()
    for mm_hash in metadata.restore:
        host = state.host.pop(mm_hash, None)
        if host is None:
            state.missing.add(mm_hash)  # encoded in this step's encoder call
            state.stats.restore_misses += 1
            continue
        cache[mm_hash] = offload.to_device(host, device)
        state.stats.host_restores += 1
    demote = set(metadata.demote)
    for mm_hash in freed:
        if mm_hash in demote:
            tensor = cache.pop(mm_hash, None)
            if tensor is not None:
                # A restored entry still has its host tensor: no device->host copy.
                state.host[mm_hash] = offload.release(tensor)
                state.stats.demotions += 1
    for mm_hash in metadata.drop:
        if state.host.pop(mm_hash, None) is not None:
            state.stats.host_drops += 1


def move_tiers(
    cache: MutableMapping[str, torch.Tensor],
    device: torch.device,
    state: WorkerState,
    scheduler_output: Any,
    metadata: VitBatchStepMetadata,
) -> None:
    """:func:`apply_tier_moves` for one step; if it fails, vLLM frees as usual and
    whatever was not restored is encoded in this step's encoder call instead."""
    try:
        apply_tier_moves(cache, device, state, scheduler_output.free_encoder_mm_hashes, metadata)
    except Exception:  # noqa: BLE001 - any failure: keep serving
        state.note_error("host-tier update")
        state.missing.update(h for h in metadata.restore if h not in cache)


def native_only_reason(runner: Any, modalities: Sequence[str]) -> str | None:
    """Cases whose vLLM branches vitbatch does not reproduce: leave the step to vLLM."""
    if runner.model_config.is_encoder_decoder:
        return "encoder-decoder model"
    if "prompt_embeds" in modalities:
        return "prompt_embeds inputs"
    lora_manager = getattr(runner, "lora_manager", None)
    if getattr(runner, "lora_config", None) and (
        lora_manager is None
        or not hasattr(lora_manager, "supports_tower_connector_lora")
        or lora_manager.supports_tower_connector_lora()
    ):
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
    num_embeds = position.get_num_embeds()
    return Item(
        hash=mm_hash,
        modality=modality,
        num_tokens=num_embeds,
        spans=(Span(position.offset, num_embeds),),
        # The item's tensors by field name, for third-party encoder plugins (no copy).
        features={n: e.data for n, e in kwargs.items() if isinstance(e.data, torch.Tensor)},
        cost=item_cost(kwargs, num_embeds),
        group=tuple(sorted(kwargs.keys())),
        cacheable=False,  # vLLM's encoder cache is the cache; don't keep a second copy
        payload=Payload(request_id, modality, kwargs),
    )


def count_cross_request(state: WorkerState, items: Sequence[Item]) -> None:
    if len({item.payload.request_id for item in items}) > 1:
        state.stats.cross_request_calls += 1


# ---------------------------------------------------------------------------
# Model runner V1 (vllm/v1/worker/gpu_model_runner.py)
# ---------------------------------------------------------------------------


def _v1_engine_encoder(runner: Any, state: WorkerState):
    """vLLM's own encoding of a micro-batch: its batching, cudagraphs if any, embed_multimodal."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    try:
        from vllm.utils.torch_utils import PIN_MEMORY as pin_memory
    except ImportError:  # moved: pinning is only a speed-up
        pin_memory = torch.cuda.is_available()

    def encode(items: Sequence[Item]) -> list[torch.Tensor]:
        count_cross_request(state, items)
        mm_kwargs = [(item.payload.modality, item.payload.kwargs) for item in items]
        outputs: list[torch.Tensor] = []
        for modality, num_items, batch in group_and_batch_mm_kwargs(
            mm_kwargs, device=runner.device, pin_memory=pin_memory
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


def _v1_store(runner: Any, mm_hash: str, output: torch.Tensor, scheduler_output: Any) -> None:
    """Cache one output as vLLM's own ``_execute_mm_encoder`` would."""
    store = getattr(runner, "_cache_encoder_output", None)  # vLLM 0.27+
    if store is not None:
        store(
            mm_hash,
            output,
            getattr(scheduler_output, "ec_manager_metadata", None),
            scheduler_output.free_encoder_mm_hashes,
        )
        return
    runner.encoder_cache[mm_hash] = output
    save = getattr(runner, "maybe_save_ec_to_connector", None)
    if save is not None:
        save(runner.encoder_cache, mm_hash)


def _v1_encode_step(
    runner: Any, state: WorkerState, scheduler_output: SchedulerOutput, scheduled: Any
) -> list[torch.Tensor]:
    """Encode the step's scheduled inputs (and restores whose host copy is missing)."""
    mm_hashes, mm_kwargs, refs = scheduled
    entries = [
        (h, request_id, modality, kwargs, position)
        for h, (modality, kwargs), (request_id, position) in zip(mm_hashes, mm_kwargs, refs)
    ]
    for mm_hash in sorted(state.missing):  # restores whose host copy was missing
        found = _find_feature(runner, mm_hash)
        if found is not None and mm_hash not in mm_hashes:
            request_id, feature = found
            entries.append(
                (mm_hash, request_id, feature.modality, feature.data, feature.mm_position)
            )
    items = []
    for entry in entries:
        if entry[0] in runner.encoder_cache:
            state.stats.already_cached += 1
            continue
        items.append(make_item(*entry))
    encode = _v1_engine_encoder(runner, state)
    embeddings = state.batcher.encode(items, encode) if items else {}
    outputs = []
    for item in items:
        output = embeddings[item.key]
        if item.hash not in runner.encoder_cache:
            _v1_store(runner, item.hash, output, scheduler_output)
        outputs.append(output)
    state.missing.clear()  # only now: if anything above raised, the native path handles them
    state.stats.steps += 1
    return outputs


def _v1_encode_missing_natively(runner: Any, state: WorkerState, scheduler_output: Any) -> None:
    """Restores whose host copy was missing, when the step ran vLLM's native path."""
    missing, state.missing = sorted(state.missing), set()
    encode = _v1_engine_encoder(runner, state)
    for mm_hash in missing:
        found = _find_feature(runner, mm_hash)
        if found is None or mm_hash in runner.encoder_cache:
            continue
        request_id, feature = found
        item = make_item(mm_hash, request_id, feature.modality, feature.data, feature.mm_position)
        _v1_store(runner, mm_hash, encode([item])[0], scheduler_output)


def _v1_update_states(original):
    @functools.wraps(original)
    def _update_states(self, scheduler_output: SchedulerOutput, *args: Any, **kwargs: Any):
        metadata = read(scheduler_output)
        if metadata is not None:
            state = worker_state(self, metadata, "V1")
            move_tiers(self.encoder_cache, self.device, state, scheduler_output, metadata)
        return original(self, scheduler_output, *args, **kwargs)

    _update_states.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return _update_states


def _v1_execute(original):
    @functools.wraps(original)
    def _execute_mm_encoder(self, scheduler_output: SchedulerOutput, *args: Any, **kwargs: Any):
        metadata = read(scheduler_output)
        if metadata is None or args or kwargs:
            return original(self, scheduler_output, *args, **kwargs)
        state = worker_state(self, metadata, "V1")
        if not scheduler_output.scheduled_encoder_inputs and not state.missing:
            return original(self, scheduler_output)  # nothing to encode (decode steps)
        try:
            scheduled = self._batch_mm_inputs_from_scheduler(scheduler_output)
            reason = native_only_reason(self, [modality for modality, _ in scheduled[1]])
            if reason is None:
                return _v1_encode_step(self, state, scheduler_output, scheduled)
            state.note_native(reason)
        except Exception:  # noqa: BLE001 - any failure: fall back to vLLM, keep serving
            state.note_error("encoding")
        outputs = original(self, scheduler_output)
        if state.missing:
            _v1_encode_missing_natively(self, state, scheduler_output)
        return outputs

    _execute_mm_encoder.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return _execute_mm_encoder


_V1_PATCHES = (("_update_states", _v1_update_states), ("_execute_mm_encoder", _v1_execute))
_patch_lock = threading.Lock()


def wrap_methods(owner: type, patches: Sequence[tuple[str, Any]]) -> None:
    """Wrap ``owner``'s methods once (a wrapped method carries ``__vitbatch_original__``)."""
    with _patch_lock:
        for name, wrap in patches:
            current = getattr(owner, name)
            if not hasattr(current, "__vitbatch_original__"):
                setattr(owner, name, wrap(current))


def unwrap_methods(owner: type, names: Iterable[str]) -> None:
    with _patch_lock:
        for name in names:
            original = getattr(getattr(owner, name), "__vitbatch_original__", None)
            if original is not None:
                setattr(owner, name, original)


def install_worker_patches() -> dict[str, bool]:
    """Route both model runners through vitbatch for steps carrying vitbatch's metadata.

    Idempotent and thread-safe. A runner whose part of the engine surface is
    missing is left alone, with one log line. Returns which runners are driven.
    """
    report = surface.check()
    driven = {}
    if report.ok("runner_v1"):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        wrap_methods(GPUModelRunner, _V1_PATCHES)
        driven["v1"] = True
    else:
        driven["v1"] = False
        _log_missing_once(report, "runner_v1")
    if report.ok("runner_v2"):
        from vitbatch.adapters.vllm.worker_v2 import install_v2_patches

        driven["v2"] = install_v2_patches()
    else:
        driven["v2"] = False
        _log_missing_once(report, "runner_v2")
    return driven


_logged_parts: set[str] = set()


def _log_missing_once(report: surface.SurfaceReport, part: str) -> None:
    if part not in _logged_parts:
        _logged_parts.add(part)
        logger.info("vitbatch: not driving that model runner: %s", report.describe(part))


def uninstall_worker_patches() -> None:
    """Restore vLLM's methods (tests)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    unwrap_methods(GPUModelRunner, [name for name, _ in _V1_PATCHES])
    if surface.check().ok("runner_v2"):
        from vitbatch.adapters.vllm.worker_v2 import uninstall_v2_patches

        uninstall_v2_patches()


def merged_stats(
    all_states: Iterable[WorkerState],
) -> tuple[WorkerStats, Mapping[str, int]]:
    """Worker counters summed over ``all_states`` and per-runner-kind step counts."""
    total = WorkerStats()
    kinds: dict[str, int] = {}
    for state in all_states:
        for name, theirs in vars(state.stats).items():
            mine = getattr(total, name)
            if isinstance(mine, dict):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            else:
                setattr(total, name, mine + theirs)
        kinds[state.runner_kind] = kinds.get(state.runner_kind, 0) + state.stats.steps
    return total, kinds
