"""Worker side, shared by both model runners: vitbatch's per-runner state.

Both of vLLM's model runners keep encoder outputs in a dict keyed by mm hash
and free entries the scheduler lists in ``free_encoder_mm_hashes``; so one
state serves both, and :mod:`.worker_v1` and :mod:`.worker_v2` (the wrappers,
one leaf module per runner) share it:

* :class:`WorkerState`, vitbatch's object for one runner (the batcher, the host
  tier, counters, what one wrapper leaves for the next), held in one attribute
  of the runner (see :func:`worker_state`); its host tier is a
  :class:`~vitbatch.core.host_arena.HostArena` (pinned blocks, filled on a side
  stream) keyed by mm hash and sized from the scheduler's bound
  (:func:`arena_bytes`);
* :func:`merged_stats`, the counters of all runners of a process.

The moves applied to the host tier each step are :mod:`.worker_host_tier`;
vLLM's encoder inputs as core items are :mod:`.worker_items`. vLLM's objects
are read through :mod:`.surface` only.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitbatch import metrics
from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata
from vitbatch.adapters.vllm.prefetch_pool import PrefetchPool
from vitbatch.adapters.vllm.worker_items import Entry
from vitbatch.core import Budget, EmbeddingCache, Item, VitBatcher
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
