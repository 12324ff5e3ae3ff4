"""Worker side, shared by both model runners: vitbatch's per-runner state and what it does.

Both of vLLM's model runners keep encoder outputs in a dict keyed by mm hash
and free entries the scheduler lists in ``free_encoder_mm_hashes``; both find
a request's multimodal features in a mapping request id -> features. Everything
here works on those shapes, so :mod:`.worker_v1` and :mod:`.worker_v2` (the
wrappers, one leaf module per runner) share it:

* :class:`WorkerState`, vitbatch's object for one runner (the batcher, the host
  tier, counters, what one wrapper leaves for the next), held in one attribute
  of the runner (see :func:`worker_state`); its host tier is a
  :class:`~vitbatch.core.host_arena.HostArena` (pinned blocks, filled on a side
  stream) keyed by mm hash and sized from the scheduler's bound;
* :func:`apply_tier_moves`: restores, demotes and drops as the step's
  :class:`~.metadata.VitBatchStepMetadata` says, before vLLM frees;
* the core items of vLLM encoder inputs, and the restores whose host copy was
  missing (:func:`missing_restores`), which are encoded instead.

vLLM's objects are read through :mod:`.surface` only.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Container, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitbatch import metrics
from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import PrefetchOrder, VitBatchStepMetadata
from vitbatch.adapters.vllm.prefetch_pool import PrefetchPool
from vitbatch.core import Budget, EmbeddingCache, Item, Span, VitBatcher
from vitbatch.core.agreement import group_agree
from vitbatch.core.host_arena import HostArena
from vitbatch.core.prefetch import PrefetchStats

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
    """restores the host tier could not serve (entry gone or never stored): encoded again."""
    demotions: int = 0
    demotions_not_kept: int = 0
    """demotions the host arena could not store (larger than it, or the copy could not be
    enqueued); the scheduler still lists them, so their restores miss and are encoded again."""
    host_drops: int = 0
    native_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Payload:
    """What the engine encoder needs back from a core item."""

    request_id: str
    modality: str
    kwargs: Any  # vLLM's MultiModalKwargsItem


#: One encoder input found in a runner: ``(mm hash, request id, vLLM feature)``.
Entry = tuple[str, str, Any]


#: Room in the host arena beyond the scheduler's bound, for block rounding: an entry
#: wastes less than one block, and with blocks of at most 256 KiB an eighth more
#: covers it unless entries are smaller than about 1 MiB on average.
ARENA_SLACK = 8
ARENA_BLOCK_BYTES = 256 << 10


def arena_bytes(rows: int, row_bytes: int) -> int:
    """The host arena's size for the scheduler's bound of ``rows`` embedding rows."""
    raw = rows * row_bytes
    return raw + raw // ARENA_SLACK


def new_host_arena(capacity_bytes: int) -> HostArena:
    """A host arena of ``capacity_bytes`` (pinned blocks allocated at its first demotion)."""
    block = max(4096, min(ARENA_BLOCK_BYTES, capacity_bytes // 256) // 4096 * 4096)
    return HostArena(capacity_bytes, block_bytes=block)


class WorkerState:
    """vitbatch's state on one model runner: the batcher, the host tier, counters.

    The device cache is vLLM's (the scheduler governs it); the core's own cache
    stays empty (items are not cacheable). The host tier is a
    :class:`~vitbatch.core.host_arena.HostArena` keyed by mm hash: the scheduler's
    index decides every move and bounds it in rows; the arena is that bound in
    bytes plus room for block rounding (:func:`arena_bytes`), built at the first
    demotion. Should it still run out, it drops its least recent entries; the
    scheduler still lists them, their restores miss (``restore_misses``) and they
    are encoded again - never wrong rows.
    ``native_reason`` and ``recorded`` are what Model Runner V2's ``free_states``
    and ``prepare_mm_inputs`` leave for its ``execute_mm_encoder`` in one step.
    """

    def __init__(self, runner: Any, metadata: VitBatchStepMetadata, runner_kind: str) -> None:
        group = surface.agree_group(runner)
        self.runner_kind = runner_kind
        width, dtype = surface.hidden_size(runner), surface.embedding_dtype(runner)
        self.row_bytes = width * dtype.itemsize if width and dtype is not None else None
        self.batcher = VitBatcher(
            budget=Budget(metadata.max_batch_patches, metadata.max_batch_items),
            cache=EmbeddingCache(0),
            hidden_size=surface.hidden_size(runner),
            dtype=surface.embedding_dtype(runner),
            check_finite=metadata.check_finite,
            agree=group_agree(group) if group is not None else None,
        )
        self.host = new_host_arena(0)
        self.host_rows: int | None = None  # the scheduler's bound; None until configured
        self._arena_built = False
        self.missing: set[str] = set()
        self.prefetch: PrefetchPool | None = None  # built when the scheduler ships a bound
        self.stats = WorkerStats()
        metrics.export_batcher(
            self.batcher, surface.metric_labels(runner), self.host_tier_counts, self.prefetch_counts
        )
        self.native_reason: str | None = None
        self.recorded: tuple[list[Entry], list[Any]] | None = None
        self._logged: set[str] = set()
        states.add(self)
        logger.info(
            "vitbatch: encoder steps of this worker (model runner %s) run through vitbatch (%s)",
            runner_kind,
            self.batcher.budget,
        )

    def host_tier_counts(self) -> metrics.HostTierCounts:
        """What this worker's host tier (the one holding the rows) did, for the metrics."""
        return metrics.HostTierCounts(
            hits=self.stats.host_restores,
            demotions=self.stats.demotions,
            drops=self.stats.host_drops,
            entries=len(self.host),
            bytes=self.host.row_bytes,
        )

    def prefetch_counts(self) -> PrefetchStats:
        """What this worker's prefetch pool did, for the metrics (zeros with prefetch off)."""
        return self.prefetch.stats if self.prefetch is not None else PrefetchStats()

    def configure(self, metadata: VitBatchStepMetadata) -> None:
        budget = Budget(metadata.max_batch_patches, metadata.max_batch_items)
        if budget != self.batcher.budget:
            self.batcher.budget = budget
        if metadata.host_capacity_embeds != self.host_rows:
            # The first step, or another bound: a fresh arena, built at the next demotion.
            self.host.clear()
            self.host = new_host_arena(0)
            self.host_rows = metadata.host_capacity_embeds
            self._arena_built = False
        if metadata.prefetch_pool_bytes:
            if self.prefetch is None:
                self.prefetch = PrefetchPool(metadata.prefetch_pool_bytes)
            self.prefetch.capacity = metadata.prefetch_pool_bytes

    def demote(self, mm_hash: str, tensor: torch.Tensor) -> bool:
        """Keep ``tensor`` in the host tier: its copy is enqueued, not waited for."""
        if not self._arena_built:
            row_bytes = self.row_bytes or tensor_row_bytes(tensor)
            self.host = new_host_arena(arena_bytes(self.host_rows or 0, row_bytes))
            self._arena_built = True
        return self.host.put(mm_hash, tensor) is not None

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

    def count_cross_request(self, items: Sequence[Item]) -> None:
        if len({item.payload.request_id for item in items}) > 1:
            self.stats.cross_request_calls += 1


_state_lock = threading.Lock()


def worker_state(runner: Any, metadata: VitBatchStepMetadata, runner_kind: str) -> WorkerState:
    """The runner's state, built on its first vitbatch step (held as ``runner._vitbatch_state``)."""
    state = state_of(runner)
    if state is None:
        with _state_lock:
            state = state_of(runner)
            if state is None:
                state = WorkerState(runner, metadata, runner_kind)
                share_state(runner, state)
    state.configure(metadata)
    return state


def state_of(owner: Any) -> WorkerState | None:
    """The state a runner (or V2's encoder runner) holds, ``None`` before vitbatch's first step."""
    return getattr(owner, "_vitbatch_state", None)


def share_state(owner: Any, state: WorkerState) -> None:
    """Let ``owner`` (a runner, or the encoder runner its wrappers call) hold ``state``."""
    owner._vitbatch_state = state


def tensor_row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one embedding row of ``tensor`` (when the model config did not say)."""
    rows = tensor.shape[0] if tensor.dim() else 1
    return max(1, tensor.numel() * tensor.element_size() // max(1, rows))


def apply_tier_moves(
    cache: MutableMapping[str, torch.Tensor],
    state: WorkerState,
    freed: Iterable[str],
    metadata: VitBatchStepMetadata,
) -> None:
    """Mirror the scheduler's decisions on the runner's encoder-output dict ``cache``.

    Runs before vLLM frees this step's ``freed`` hashes: restores first (each a
    host-to-device copy ordered after its demotion's copy on the device, the host
    waits for neither), then drops (their blocks are free again), then the
    demoted entries leave ``cache`` for the host tier (a device-to-host copy
    enqueued on the arena's side stream; vLLM's free then finds nothing to pop).
    Nothing here waits for the device.
    """
    if metadata.reset:
        state.host.clear()
    for mm_hash in metadata.restore:
        restored = state.host.take(mm_hash)
        if restored is None:
            state.missing.add(mm_hash)  # encoded in this step's encoder call
            state.stats.restore_misses += 1
            continue
        cache[mm_hash] = restored
        state.stats.host_restores += 1
    for mm_hash in metadata.drop:
        if state.host.discard(mm_hash):
            state.stats.host_drops += 1
    demote = set(metadata.demote)
    for mm_hash in freed:
        if mm_hash in demote:
            tensor = cache.pop(mm_hash, None)
            if tensor is None:
                continue
            if state.demote(mm_hash, tensor):
                state.stats.demotions += 1
            else:
                state.stats.demotions_not_kept += 1


def move_tiers(
    cache: MutableMapping[str, torch.Tensor],
    state: WorkerState,
    scheduler_output: Any,
    metadata: VitBatchStepMetadata,
) -> None:
    """:func:`apply_tier_moves` for one step; if it fails, vLLM frees as usual and
    whatever was not restored is encoded in this step's encoder call instead."""
    try:
        apply_tier_moves(cache, state, surface.freed_hashes(scheduler_output), metadata)
    except Exception:  # noqa: BLE001 - any failure: keep serving
        state.note_error("host-tier update")
        state.missing.update(h for h in metadata.restore if h not in cache)
    if metadata.restore or metadata.demote or metadata.drop or metadata.reset:
        try:
            metrics.sync(state.batcher)  # the tier moved: its counters now, not at the next call
        except Exception:  # noqa: BLE001 - metrics never stop a step
            state.log_once("metrics", "vitbatch: metrics update failed", exc_info=True)


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


def missing_restores(
    state: WorkerState,
    features_by_request: Iterable[tuple[str, Iterable[Any]]],
    skip: Container[str],
) -> list[Entry]:
    """Restores whose host copy was missing, with a live feature to encode them from.

    Hash order; those in ``skip`` (cached, or already in the step) and those no
    live request carries are left out. ``state.missing`` is the caller's to clear.
    """
    pairs = list(features_by_request)
    found: list[Entry] = []
    for mm_hash in sorted(state.missing):
        hit = find_feature(pairs, mm_hash)
        if hit is not None and mm_hash not in skip:
            found.append((mm_hash, *hit))
    return found


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
