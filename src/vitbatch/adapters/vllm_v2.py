"""vLLM Model Runner V2: its encoder calls run through vitbatch's core.

V2 (``vllm/v1/worker/gpu/``) encodes in ``EncoderRunner.execute_mm_encoder(mm_kwargs)``
after ``prepare_mm_inputs`` chose the step's items. That call carries no hashes or
embedding counts, so the ``prepare_mm_inputs`` wrapper records them (identifier and
``get_num_embeds()`` of each chosen feature) and the ``execute_mm_encoder`` wrapper
hands the items to :class:`~vitbatch.core.VitBatcher`, which plans token-budgeted
micro-batches across the step's requests, deduplicates identical content and
validates every output, then calls vLLM's own grouping and ``embed_multimodal``.

Why the step goes to vLLM unchanged instead:

* encoder CUDA graphs are captured (``cudagraph_manager`` set): vLLM's graph path
  is faster than anything eager, so vitbatch never replaces it;
* the recorded items do not match the call (another caller, a vLLM change);
* anything raises: the failure is logged once, counted, and vLLM's path runs.

Host-tier moves of V1 (``_apply_tier_moves``) need the scheduler's metadata on the
worker; V2's runner does not pass ``ec_manager_metadata`` to the encoder runner,
so this module does not move tiers yet (see the report of issue 9b).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from vitbatch.adapters.vllm import _item_cost, _item_features
from vitbatch.core import Budget, EmbeddingCache, Item, Span, VitBatcher

logger = logging.getLogger(__name__)

#: Same default as V1 (``max_batch_patches``): encoder input patches per call, items per call.
DEFAULT_BUDGET = Budget(16384, 64)


@dataclass
class V2Stats:
    """Counters of one ``EncoderRunner``: they prove steps went through vitbatch."""

    steps: int = 0
    items: int = 0
    encoder_calls: int = 0
    graph_steps: int = 0
    fallbacks: int = 0
    unmatched: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class _V2State:
    """vitbatch's state on one ``EncoderRunner``: batcher, recorded items, counters."""

    def __init__(self, budget: Budget) -> None:
        self.batcher = VitBatcher(budget=budget, cache=EmbeddingCache(0))
        self.pending: list[tuple[str, int, Any]] = []  # (hash, num_embeds, kwargs)
        self.stats = V2Stats()
        self._logged: set[str] = set()

    def log_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args, exc_info=exc_info)


_state_lock = threading.Lock()
_states: list[_V2State] = []


def _state(runner: Any) -> _V2State:
    state = getattr(runner, "_vitbatch_v2", None)
    if state is None:
        with _state_lock:
            state = getattr(runner, "_vitbatch_v2", None)
            if state is None:
                state = _V2State(DEFAULT_BUDGET)
                runner._vitbatch_v2 = state
                _states.append(state)
                logger.info(
                    "vitbatch: V2 encoder runner routed through vitbatch (%s)", DEFAULT_BUDGET
                )
    return state


def _record(runner: Any, scheduled: dict[str, list[int]], mm_hashes: list[str]) -> None:
    """Remember (hash, embeds, kwargs) of the items ``prepare_mm_inputs`` returned, in order."""
    found: dict[str, tuple[int, Any]] = {}
    for req_id, input_ids in scheduled.items():
        features = runner.encoder_cache.mm_features[req_id]
        for input_id in input_ids:
            feature = features[input_id]
            if feature.data is not None:
                found[feature.identifier] = (feature.mm_position.get_num_embeds(), feature.data)
    _state(runner).pending = [(h, *found[h]) for h in mm_hashes]


def _patched_prepare(original):
    @functools.wraps(original)
    def prepare_mm_inputs(self, scheduled_encoder_inputs):
        mm_hashes, mm_kwargs = original(self, scheduled_encoder_inputs)
        try:
            _record(self, scheduled_encoder_inputs, mm_hashes)
        except Exception:  # noqa: BLE001 - never break vLLM's step
            state = _state(self)
            state.pending = []
            state.log_once("record", "vitbatch: could not record V2 items", exc_info=True)
        return mm_hashes, mm_kwargs

    prepare_mm_inputs.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return prepare_mm_inputs


def _engine_encoder(runner: Any, original, state: _V2State):
    """vLLM's own encoding of one micro-batch (its grouping, ``embed_multimodal``, checks)."""

    def encode(items):
        state.stats.encoder_calls += 1
        return list(original(runner, [(item.modality, item.payload) for item in items]))

    return encode


def _encode(runner: Any, original, state: _V2State, mm_kwargs) -> list[torch.Tensor]:
    items = [
        Item(
            mm_hash,
            modality,
            num_embeds,
            (Span(0, num_embeds),),
            features=_item_features(kwargs),
            cost=_item_cost(kwargs, num_embeds),
            group=tuple(sorted(kwargs.keys())),
            cacheable=False,  # vLLM's encoder cache keeps the result
            payload=kwargs,
        )
        for (mm_hash, num_embeds, _), (modality, kwargs) in zip(state.pending, mm_kwargs)
    ]
    embeddings = state.batcher.encode(items, _engine_encoder(runner, original, state))
    state.stats.steps += 1
    state.stats.items += len(items)
    return [embeddings[item.key] for item in items]


def _patched_execute(original):
    @functools.wraps(original)
    def execute_mm_encoder(self, mm_kwargs, *args, **kwargs):
        state = _state(self)
        pending, state.pending = state.pending, []
        if not mm_kwargs or args or kwargs:
            return original(self, mm_kwargs, *args, **kwargs)
        reason = None
        if getattr(self, "cudagraph_manager", None) is not None:
            reason = "encoder CUDA graphs captured"
            state.stats.graph_steps += 1
        elif len(pending) != len(mm_kwargs) or any(
            p[2] is not k for p, (_, k) in zip(pending, mm_kwargs)
        ):
            reason = "items not recorded by prepare_mm_inputs"
            state.stats.unmatched += 1
        if reason is None:
            state.pending = pending
            try:
                return _encode(self, original, state, mm_kwargs)
            except Exception:  # noqa: BLE001 - any failure: vLLM's path, keep serving
                state.stats.fallbacks += 1
                reason = "error"
                state.log_once(
                    "encode", "vitbatch: V2 encoding failed; vLLM's path runs", exc_info=True
                )
            finally:
                state.pending = []
        state.stats.reasons[reason] = state.stats.reasons.get(reason, 0) + 1
        return original(self, mm_kwargs)

    execute_mm_encoder.__vitbatch_original__ = original  # type: ignore[attr-defined]
    return execute_mm_encoder


_PATCHES = (("prepare_mm_inputs", _patched_prepare), ("execute_mm_encoder", _patched_execute))
_patch_lock = threading.Lock()


def install_v2_patch() -> bool:
    """Wrap V2's ``EncoderRunner``; False (and nothing changed) when this vLLM has no V2."""
    try:
        from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    except Exception:  # noqa: BLE001 - no V2 in this vLLM (or it fails to import on CPU)
        return False
    with _patch_lock:
        for name, wrap in _PATCHES:
            current = getattr(EncoderRunner, name, None)
            if current is None:
                logger.warning("vitbatch: vLLM's EncoderRunner has no %s; V2 not driven", name)
                return False
        for name, wrap in _PATCHES:
            current = getattr(EncoderRunner, name)
            if not hasattr(current, "__vitbatch_original__"):
                setattr(EncoderRunner, name, wrap(current))
    return True


def uninstall_v2_patch() -> None:
    """Restore vLLM's methods (tests)."""
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner

    with _patch_lock:
        for name, _ in _PATCHES:
            original = getattr(getattr(EncoderRunner, name), "__vitbatch_original__", None)
            if original is not None:
                setattr(EncoderRunner, name, original)


def v2_stats() -> dict[str, Any]:
    """V2 counters summed over this process's encoder runners."""
    total = V2Stats()
    for state in _states[:]:  # a copy: runners may be added meanwhile
        for name in ("steps", "items", "encoder_calls", "graph_steps", "fallbacks", "unmatched"):
            setattr(total, name, getattr(total, name) + getattr(state.stats, name))
        for key, value in state.stats.reasons.items():
            total.reasons[key] = total.reasons.get(key, 0) + value
    return {**total.__dict__}
