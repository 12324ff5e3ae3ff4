"""Model Runner V2 (``vllm/v1/worker/gpu/``, vLLM's GPU default): its encoder calls via vitbatch.

V2 keeps encoder outputs in ``runner.encoder_cache.encoder_outputs`` and, per
step, calls ``free_states`` (frees what the scheduler lists), then
``EncoderRunner.prepare_mm_inputs`` (the step's items) and
``EncoderRunner.execute_mm_encoder(mm_kwargs)`` (one call per modality group).
vitbatch wraps all three:

* ``free_states``: the host-tier moves of :func:`~.worker.apply_tier_moves`,
  then hands the runner's :class:`~.worker.WorkerState` to its encoder runner;
* ``prepare_mm_inputs``: records hash, request and position of each item
  (``execute_mm_encoder`` receives none of them) and adds restores whose host
  copy was missing, so vLLM encodes and caches them like any other item;
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

import functools
from typing import Any

import torch

from vitbatch.adapters.vllm.metadata import read
from vitbatch.adapters.vllm.worker import (
    WorkerState,
    count_cross_request,
    make_item,
    move_tiers,
    native_only_reason,
    unwrap_methods,
    worker_state,
    wrap_methods,
)

_STATE = "_vitbatch_state"
_PENDING = "_vitbatch_pending"


def _free_states(original):
    @functools.wraps(original)
    def free_states(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = read(scheduler_output)
        encoder_runner = getattr(getattr(self, "model_state", None), "encoder_runner", None)
        if metadata is None or self.encoder_cache is None or encoder_runner is None:
            return original(self, scheduler_output, *args, **kwargs)
        state = worker_state(self, metadata, "V2")
        setattr(encoder_runner, _STATE, state)
        encoder_runner._vitbatch_native = native_only_reason(self, ())
        outputs = self.encoder_cache.encoder_outputs
        move_tiers(outputs, self.device, state, scheduler_output, metadata)
        return original(self, scheduler_output, *args, **kwargs)

    free_states.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return free_states


def _find(encoder_runner: Any, mm_hash: str) -> tuple[str, Any] | None:
    for request_id, features in encoder_runner.encoder_cache.mm_features.items():
        for feature in features:
            if feature.identifier == mm_hash and feature.data is not None:
                return request_id, feature
    return None


def _prepare(original):
    @functools.wraps(original)
    def prepare_mm_inputs(self, scheduled_encoder_inputs: dict[str, list[int]], *a, **k):
        mm_hashes, mm_kwargs = original(self, scheduled_encoder_inputs, *a, **k)
        state: WorkerState | None = getattr(self, _STATE, None)
        setattr(self, _PENDING, None)
        if state is None:
            return mm_hashes, mm_kwargs
        try:
            found: dict[str, tuple[str, Any]] = {}
            for request_id, input_ids in scheduled_encoder_inputs.items():
                features = self.encoder_cache.mm_features[request_id]
                for input_id in input_ids:
                    feature = features[input_id]
                    if feature.data is not None:
                        found.setdefault(feature.identifier, (request_id, feature))
            outputs = self.encoder_cache.encoder_outputs
            for mm_hash in sorted(state.missing):  # restores whose host copy was missing
                hit = _find(self, mm_hash)
                if hit is not None and mm_hash not in outputs and mm_hash not in found:
                    found[mm_hash] = hit
                    mm_hashes = [*mm_hashes, mm_hash]
                    mm_kwargs = [*mm_kwargs, (hit[1].modality, hit[1].data)]
            state.missing.clear()
            pending = [(h, *found[h]) for h in mm_hashes]
            setattr(self, _PENDING, (pending, mm_kwargs))
        except Exception:  # noqa: BLE001 - never break vLLM's step
            state.note_error("recording the step's items")
        return mm_hashes, mm_kwargs

    prepare_mm_inputs.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return prepare_mm_inputs


def _engine_encoder(encoder_runner: Any, original, state: WorkerState):
    """vLLM's own encoding of one micro-batch (its grouping, checks, graphs if captured)."""

    def encode(items):
        count_cross_request(state, items)
        mm_kwargs = [(item.payload.modality, item.payload.kwargs) for item in items]
        return list(original(encoder_runner, mm_kwargs))

    return encode


def _execute(original):
    @functools.wraps(original)
    def execute_mm_encoder(self, mm_kwargs, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        state: WorkerState | None = getattr(self, _STATE, None)
        recorded = getattr(self, _PENDING, None)
        setattr(self, _PENDING, None)
        if state is None or recorded is None or args or kwargs or not mm_kwargs:
            return original(self, mm_kwargs, *args, **kwargs)
        pending, recorded_kwargs = recorded
        reason = getattr(self, "_vitbatch_native", None)
        if reason is None and _graphs_captured(self):
            # vLLM's captured encoder graphs beat eager micro-batches: the step is vLLM's.
            reason = "encoder CUDA graphs captured (vLLM's graph path runs)"
        if reason is None:
            modalities = [modality for modality, _ in mm_kwargs]
            reason = native_only_reason_v2(modalities)
        if reason is None and (
            len(pending) != len(mm_kwargs)
            or any(a[1] is not b[1] for a, b in zip(recorded_kwargs, mm_kwargs))
        ):
            reason = "items not recorded by prepare_mm_inputs"
        if reason is not None:
            state.note_native(reason)
            return original(self, mm_kwargs)
        try:
            items = [
                make_item(h, request_id, f.modality, f.data, f.mm_position)
                for h, request_id, f in pending
            ]
            embeddings = state.batcher.encode(items, _engine_encoder(self, original, state))
            state.stats.steps += 1
            return [embeddings[item.key] for item in items]
        except Exception:  # noqa: BLE001 - any failure: vLLM's path, keep serving
            state.note_error("encoding")
        return original(self, mm_kwargs)

    execute_mm_encoder.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return execute_mm_encoder


def _graphs_captured(encoder_runner: Any) -> bool:
    manager = getattr(encoder_runner, "cudagraph_manager", None)
    if manager is None:
        return False
    is_captured = getattr(manager, "is_captured", None)
    return bool(is_captured()) if callable(is_captured) else True


def native_only_reason_v2(modalities: list[str]) -> str | None:
    if "prompt_embeds" in modalities:
        return "prompt_embeds inputs"
    return None


_RUNNER_PATCHES = (("free_states", _free_states),)
_ENCODER_PATCHES = (("prepare_mm_inputs", _prepare), ("execute_mm_encoder", _execute))


def install_v2_patches() -> bool:
    """Wrap V2's model runner and encoder runner (the caller checked the engine surface)."""
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    wrap_methods(GPUModelRunner, _RUNNER_PATCHES)
    wrap_methods(EncoderRunner, _ENCODER_PATCHES)
    return True


def uninstall_v2_patches() -> None:
    """Restore vLLM's methods (tests)."""
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    unwrap_methods(GPUModelRunner, [name for name, _ in _RUNNER_PATCHES])
    unwrap_methods(EncoderRunner, [name for name, _ in _ENCODER_PATCHES])
