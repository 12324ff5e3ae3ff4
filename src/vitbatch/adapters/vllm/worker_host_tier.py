"""Worker side, shared by both model runners: the host tier mirroring the scheduler's index.

The scheduler's :class:`~.host_index.HostTierIndex` decides every host-tier
move (restore, demote, drop, reset) and ships them in the step's
:class:`~.metadata.VitBatchStepMetadata`; here each worker applies them to its
runner's encoder-output dict (keyed by mm hash, as in both runners) and to the
:class:`~vitbatch.core.host_arena.HostArena` of its
:class:`~.worker_state.WorkerState`, before vLLM frees the step's hashes. A
restore the arena cannot serve is never wrong rows: it is listed in
``state.missing`` and encoded in the step's encoder call instead
(:func:`missing_restores` finds a live feature to encode it from).

Apart from :mod:`.worker_state` so that the state (what a runner holds) and the
moves applied to it each read on their own; the wrappers (:mod:`.worker_v1`,
:mod:`.worker_v2`) call both. vLLM's objects are read through :mod:`.surface` only.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, MutableMapping
from typing import Any

import torch

from vitbatch import metrics
from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata
from vitbatch.adapters.vllm.worker_items import Entry, find_feature
from vitbatch.adapters.vllm.worker_state import WorkerState


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
