"""Both model runners' prefetch steps, on a runner's :class:`~.worker_state.WorkerState`.

* :func:`prefetch_moves`, with the host-tier moves before vLLM frees: releases,
  then consumes (pool entries into vLLM's encoder cache; what the pool lacks is
  added to the step's missing inputs, which the runner encodes with the step);
* :func:`launch_prefetch`, after the step's forward was launched: this step's
  orders, through the batcher (the model's own encoder path, the same as the
  step's) into the pool, on the side stream.

Prefetch runs on the first pipeline stage only (the one that encodes). At
tensor parallelism > 1 the vision tower communicates (all-reduces when sharded
with the weights, all-gathers in ``mm_encoder_tp_mode="data"``), and those
collectives must not run beside the forward's on another stream of the same
communicator, so the prefetch runs inline on the step's stream there (ordered,
after the forward; no overlap). A failure costs only
the prefetch: logged once, the items are encoded at admission.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch

from vitbatch import metrics
from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import PrefetchOrder, VitBatchStepMetadata
from vitbatch.adapters.vllm.worker_items import order_item
from vitbatch.adapters.vllm.worker_state import WorkerState
from vitbatch.core import Item

#: ``[(modality, kwargs item)] -> outputs``: the model's encoder, eagerly.
EagerEncode = Callable[[list[tuple[str, Any]]], list[torch.Tensor]]


def prefetch_moves(
    cache: MutableMapping[str, torch.Tensor], state: WorkerState, metadata: VitBatchStepMetadata
) -> None:
    """Mirror the scheduler's prefetch ledger on ``cache`` (the runner's encoder outputs)."""
    pool = state.prefetch
    consume = metadata.prefetch_consume
    if pool is None or not surface.first_pp_rank():
        if pool is not None:
            pool.clear()
        return
    try:
        if metadata.reset:
            pool.clear()
        pool.release(metadata.prefetch_release)
        pool.consume(consume, cache, state.missing)
    except Exception:  # noqa: BLE001 - whatever was not handed over is encoded with the step
        state.log_once("prefetch-moves", "vitbatch: prefetch hand-over failed", exc_info=True)
        state.missing.update(h for h in consume if h not in cache)
    if consume or metadata.prefetch_release or metadata.reset:
        _publish(state)


def _publish(state: WorkerState) -> None:
    """The pool moved: its counters now, not at the next encoder call."""
    try:
        metrics.sync(state.batcher)
    except Exception:  # noqa: BLE001 - metrics never stop a step
        state.log_once("metrics", "vitbatch: metrics update failed", exc_info=True)


def launch_prefetch(
    state: WorkerState, metadata: VitBatchStepMetadata, encode: EagerEncode, device: Any
) -> None:
    """Encode this step's prefetch orders into the pool (after the forward is launched)."""
    pool = state.prefetch
    if pool is None or not metadata.prefetch or not surface.first_pp_rank():
        return

    def engine(items: Sequence[Item]) -> list[torch.Tensor]:
        return encode([(item.payload.modality, item.payload.kwargs) for item in items])

    def encode_orders(orders: Sequence[PrefetchOrder]) -> list[torch.Tensor]:
        items = [order_item(order) for order in orders]
        embeddings = state.batcher.encode(items, engine)
        return [embeddings[item.key] for item in items]

    # A tower on several TP ranks communicates: keep it on the step's stream there.
    side = device if surface.tp_world_size() == 1 else None
    error = pool.launch(metadata.prefetch, encode_orders, side)
    if error is not None:
        state.log_once(
            "prefetch",
            "vitbatch: prefetch failed (%s: %s); those items are encoded at admission",
            type(error).__name__,
            error,
        )
    _publish(state)
