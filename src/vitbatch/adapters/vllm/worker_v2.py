"""Model Runner V2 (``vllm/v1/worker/gpu/``, vLLM's GPU default): its encoder calls via vitbatch.

V2 keeps encoder outputs in ``runner.encoder_cache.encoder_outputs`` and, per
step, calls ``free_states`` (frees what the scheduler lists), then
``EncoderRunner.prepare_mm_inputs`` (the step's items) and
``EncoderRunner.execute_mm_encoder(mm_kwargs)`` (one call per modality group).
vitbatch wraps all three (installed by :mod:`.worker`):

* ``free_states``: the host-tier moves of :func:`~.worker_host_tier.apply_tier_moves`,
  then shares the runner's :class:`~.worker_state.WorkerState` with its
  encoder runner;
* ``prepare_mm_inputs``: records hash, request and feature of each item
  (``execute_mm_encoder`` receives none of them) in the state, and adds
  restores whose host copy was missing, so vLLM encodes and caches them like
  any other item;
* ``execute_model``: once vLLM has launched the step's forward, the step's
  prefetch orders (:func:`~.worker_prefetch.launch_prefetch`, the encoder
  runner's model, eagerly); ``free_states`` also applies the prefetch moves;
* ``execute_mm_encoder``: the items go to :class:`~vitbatch.core.VitBatcher`,
  which plans token-budgeted micro-batches and calls vLLM's own
  ``execute_mm_encoder`` on each one (its grouping, checks and, where captured,
  encoder CUDA graphs).

A step goes to vLLM unchanged when vitbatch is off (no metadata this step),
when the encoder runner has captured CUDA graphs (vLLM 0.27+ captures them in V2
when asked; its graph path beats eager micro-batches, so vitbatch keeps only
the host tier there), when the recorded items do not match the call, when the
step needs a vLLM branch vitbatch does not reproduce, or when anything raises
(logged once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import read
from vitbatch.adapters.vllm.worker_host_tier import missing_restores, move_tiers
from vitbatch.adapters.vllm.worker_items import (
    Entry,
    entry_item,
    modality_reason,
    native_only_reason,
)
from vitbatch.adapters.vllm.worker_prefetch import launch_prefetch, prefetch_moves
from vitbatch.adapters.vllm.worker_state import WorkerState, share_state, state_of, worker_state
from vitbatch.core import Item


def free_states(original: Callable[..., Any]) -> Callable[..., Any]:
    def _free_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = read(scheduler_output)
        encoder_runner = surface.v2_encoder_runner(self)
        if metadata is None or encoder_runner is None:
            return original(self, scheduler_output, *args, **kwargs)
        state = worker_state(self, metadata, "V2")
        share_state(encoder_runner, state)
        state.native_reason = native_only_reason(self, ())
        outputs = surface.v2_outputs(self)
        move_tiers(outputs, state, scheduler_output, metadata)
        prefetch_moves(outputs, state, metadata)
        return original(self, scheduler_output, *args, **kwargs)

    return _free_states


def prepare_mm_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    def _prepare(self: Any, scheduled_encoder_inputs: dict[str, list[int]], *a: Any, **k: Any):
        mm_hashes, mm_kwargs = original(self, scheduled_encoder_inputs, *a, **k)
        state = state_of(self)
        if state is None:
            return mm_hashes, mm_kwargs
        state.recorded = None
        try:
            features = surface.v2_features(self)
            found: dict[str, tuple[str, Any]] = {}
            for request_id, input_ids in scheduled_encoder_inputs.items():
                request_features = features[request_id]
                for input_id in input_ids:
                    feature = request_features[input_id]
                    if feature.data is not None:
                        found.setdefault(feature.identifier, (request_id, feature))
            skip = surface.v2_outputs(self).keys() | found.keys()
            for mm_hash, request_id, feature in missing_restores(state, features.items(), skip):
                found[mm_hash] = (request_id, feature)
                mm_hashes = [*mm_hashes, mm_hash]
                mm_kwargs = [*mm_kwargs, (feature.modality, feature.data)]
            state.missing.clear()
            state.recorded = ([(h, *found[h]) for h in mm_hashes], mm_kwargs)
        except Exception:  # noqa: BLE001 - never break vLLM's step
            state.note_error("recording the step's items")
        return mm_hashes, mm_kwargs

    return _prepare


def engine_encoder(
    encoder_runner: Any, original: Callable[..., Any], state: WorkerState
) -> Callable[[Sequence[Item]], list]:
    """vLLM's own encoding of one micro-batch (its grouping, checks, graphs if captured)."""

    def encode(items: Sequence[Item]) -> list[torch.Tensor]:
        state.count_cross_request(items)
        mm_kwargs = [(item.payload.modality, item.payload.kwargs) for item in items]
        return list(original(encoder_runner, mm_kwargs))

    return encode


def _native_reason(
    encoder_runner: Any, state: WorkerState, recorded: tuple[list[Entry], list], mm_kwargs: list
) -> str | None:
    """Why this call is vLLM's: set by ``free_states``, graphs, inputs, or not what was recorded."""
    pending, recorded_kwargs = recorded
    reason = state.native_reason
    if reason is None and surface.v2_graphs_captured(encoder_runner):
        # vLLM's captured encoder graphs beat eager micro-batches: the step is vLLM's.
        reason = "encoder CUDA graphs captured (vLLM's graph path runs)"
    if reason is None:
        reason = modality_reason([modality for modality, _ in mm_kwargs])
    if reason is None and (
        len(pending) != len(mm_kwargs)
        or any(a[1] is not b[1] for a, b in zip(recorded_kwargs, mm_kwargs))
    ):
        reason = "items not recorded by prepare_mm_inputs"
    return reason


def execute_mm_encoder(original: Callable[..., Any]) -> Callable[..., Any]:
    def _execute(self: Any, mm_kwargs: Any, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        state = state_of(self)
        recorded = state.recorded if state is not None else None
        if state is not None:
            state.recorded = None
        if state is None or recorded is None or args or kwargs or not mm_kwargs:
            return original(self, mm_kwargs, *args, **kwargs)
        reason = _native_reason(self, state, recorded, mm_kwargs)
        if reason is not None:
            state.note_native(reason)
            return original(self, mm_kwargs)
        try:
            items = [entry_item(entry) for entry in recorded[0]]
            embeddings = state.batcher.encode(items, engine_encoder(self, original, state))
            state.stats.steps += 1
            return [embeddings[item.key] for item in items]
        except Exception:  # noqa: BLE001 - any failure: vLLM's path, keep serving
            state.note_error("encoding")
        return original(self, mm_kwargs)

    return _execute


def execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def _execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, scheduler_output, *args, **kwargs)
        metadata = read(scheduler_output) if not kwargs.get("dummy_run") else None
        encoder_runner = surface.v2_encoder_runner(self) if metadata is not None else None
        state = state_of(self) if encoder_runner is not None and metadata.prefetch else None
        if state is not None:
            launch_prefetch(
                state,
                metadata,
                lambda kw: surface.v2_encode_eagerly(encoder_runner, kw),
                surface.device(self),
            )
        return output

    return _execute_model


PATCHES = (
    (surface.V2_FREE_STATES, free_states),
    (surface.V2_PREPARE_MM_INPUTS, prepare_mm_inputs),
    (surface.V2_EXECUTE_MM_ENCODER, execute_mm_encoder),
    (surface.V2_EXECUTE_MODEL, execute_model),
)
