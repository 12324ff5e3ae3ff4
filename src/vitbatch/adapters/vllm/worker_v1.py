"""Model runner V1 (``vllm/v1/worker/gpu_model_runner.py``; CPU, and GPU on request).

Three wrappers, installed by :mod:`.worker`:

* ``_update_states``: the step's host-tier and prefetch moves on
  ``runner.encoder_cache`` (:func:`~.worker_host_tier.move_tiers`,
  :func:`~.worker_prefetch.prefetch_moves`), before vLLM frees;
* ``_execute_mm_encoder``: the step's scheduled inputs (and restores whose host
  copy was missing) go to :class:`~vitbatch.core.VitBatcher`, which calls
  vLLM's own batching and ``embed_multimodal`` per micro-batch; outputs are
  stored the way vLLM stores them;
* ``execute_model``: once vLLM has launched the step's forward, the step's
  prefetch orders (:func:`~.worker_prefetch.launch_prefetch`, eager encoder).

Steps without vitbatch's metadata, and anything that raises, run vLLM's code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import read
from vitbatch.adapters.vllm.worker_host_tier import missing_restores, move_tiers
from vitbatch.adapters.vllm.worker_items import entry_item, make_item, native_only_reason
from vitbatch.adapters.vllm.worker_prefetch import launch_prefetch, prefetch_moves
from vitbatch.adapters.vllm.worker_state import WorkerState, state_of, worker_state
from vitbatch.core import Item


def engine_encoder(runner: Any, state: WorkerState) -> Callable[[Sequence[Item]], list]:
    """vLLM's own encoding of a micro-batch (its batching, cudagraphs if any)."""

    def encode(items: Sequence[Item]) -> list[torch.Tensor]:
        state.count_cross_request(items)
        mm_kwargs = [(item.payload.modality, item.payload.kwargs) for item in items]
        return surface.v1_encode(runner, mm_kwargs)

    return encode


def encode_step(
    runner: Any, state: WorkerState, scheduler_output: Any, scheduled: Any
) -> list[torch.Tensor]:
    """Encode the step's scheduled inputs (and restores whose host copy is missing)."""
    mm_hashes, mm_kwargs, refs = scheduled
    cache = surface.v1_outputs(runner)
    items = []
    for h, (modality, kwargs), (request_id, position) in zip(mm_hashes, mm_kwargs, refs):
        if h in cache:
            state.stats.already_cached += 1
            continue
        items.append(make_item(h, request_id, modality, kwargs, position))
    for entry in missing_restores(state, surface.v1_features(runner), skip=set(mm_hashes)):
        if entry[0] in cache:
            state.stats.already_cached += 1
            continue
        items.append(entry_item(entry))
    embeddings = state.batcher.encode(items, engine_encoder(runner, state)) if items else {}
    outputs = []
    for item in items:
        output = embeddings[item.key]
        if item.hash not in cache:
            surface.v1_store(runner, item.hash, output, scheduler_output)
        outputs.append(output)
    state.missing.clear()  # only now: if anything above raised, the native path handles them
    state.stats.steps += 1
    return outputs


def encode_missing_natively(runner: Any, state: WorkerState, scheduler_output: Any) -> None:
    """Restores whose host copy was missing, when the step ran vLLM's native path."""
    entries = missing_restores(state, surface.v1_features(runner), skip=surface.v1_outputs(runner))
    state.missing.clear()
    encode = engine_encoder(runner, state)
    for entry in entries:
        surface.v1_store(runner, entry[0], encode([entry_item(entry)])[0], scheduler_output)


def update_states(original: Callable[..., Any]) -> Callable[..., Any]:
    def _update_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = read(scheduler_output)
        if metadata is not None:
            state = worker_state(self, metadata, "V1")
            cache = surface.v1_outputs(self)
            move_tiers(cache, state, scheduler_output, metadata)
            prefetch_moves(cache, state, metadata)
        return original(self, scheduler_output, *args, **kwargs)

    return _update_states


def execute_mm_encoder(original: Callable[..., Any]) -> Callable[..., Any]:
    def _execute_mm_encoder(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = read(scheduler_output)
        if metadata is None or args or kwargs:
            return original(self, scheduler_output, *args, **kwargs)
        state = worker_state(self, metadata, "V1")
        if not surface.scheduled_encoder_inputs(scheduler_output) and not state.missing:
            return original(self, scheduler_output)  # nothing to encode (decode steps)
        try:
            scheduled = surface.v1_scheduled(self, scheduler_output)
            reason = native_only_reason(self, [modality for modality, _ in scheduled[1]])
            if reason is None:
                return encode_step(self, state, scheduler_output, scheduled)
            state.note_native(reason)
        except Exception:  # noqa: BLE001 - any failure: fall back to vLLM, keep serving
            state.note_error("encoding")
        outputs = original(self, scheduler_output)
        if state.missing:
            encode_missing_natively(self, state, scheduler_output)
        return outputs

    return _execute_mm_encoder


def execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def _execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, scheduler_output, *args, **kwargs)
        metadata = read(scheduler_output)
        state = state_of(self) if metadata is not None and metadata.prefetch else None
        if state is not None:
            launch_prefetch(
                state,
                metadata,
                lambda kw: surface.v1_encode_eagerly(self, kw),
                surface.device(self),
            )
        return output

    return _execute_model


PATCHES = (
    (surface.V1_UPDATE_STATES, update_states),
    (surface.V1_EXECUTE_MM_ENCODER, execute_mm_encoder),
    (surface.V1_EXECUTE_MODEL, execute_model),
)
