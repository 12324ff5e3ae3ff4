"""The scheduler loop, for the encoder prefetch (``adapters.sglang.prefetch``): its hooks,
the waiting queue and what of a waiting request can be encoded ahead of its step.

Its names are the ``prefetch`` part, checked only when the prefetch is switched on
(:func:`~.check.prefetch_problem`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters.sglang.surface.hooks import _register
from vitbatch.adapters.sglang.surface.registry import HOOKS, ITEM, SCHEDULER, needs
from vitbatch.adapters.sglang.surface.transport import host_offload_event

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem


@needs(
    f"{HOOKS}:HookType.AFTER",
    f"{SCHEDULER}:Scheduler.run_batch",
    f"{SCHEDULER}:Scheduler.on_idle",
    part="prefetch",
)
def hook_scheduler_loop(after_batch: Callable, after_idle: Callable) -> None:
    """AFTER hooks on ``Scheduler.run_batch`` and ``Scheduler.on_idle``: each iteration of
    both event loops (``event_loop_normal``, ``event_loop_overlap``, 0.5.17 to 0.5.23) calls
    ``run_batch`` when it has a batch — which returns once the forward is launched (the
    overlap loop: on its forward stream, still running), before any result is processed —
    and ``on_idle`` when it has none. The hooks get ``(result, scheduler, ...)``."""
    _register(f"{SCHEDULER}.Scheduler.run_batch", after_batch, "AFTER")
    _register(f"{SCHEDULER}.Scheduler.on_idle", after_idle, "AFTER")


def scheduler_loaded() -> bool:
    """Whether this process has imported SGLang's scheduler module (a scheduler process)."""
    return SCHEDULER in sys.modules


@needs(f"{SCHEDULER}:Scheduler.run_batch", part="prefetch")
def waiting_requests(scheduler: Any) -> Sequence[Any]:
    """The scheduler's ``waiting_queue`` (``Req``s in admission order, the same on every rank)."""
    return scheduler.waiting_queue


@needs(f"{ITEM}:Req.finished", part="prefetch")
def request_state(request: Any) -> tuple[Any, bool, Sequence[MultimodalDataItem]]:
    """``(rid, finished, multimodal items)`` of a waiting ``Req`` (no items: ``[]``)."""
    inputs = getattr(request, "multimodal_inputs", None)
    items = getattr(inputs, "mm_items", None) if inputs is not None else None
    return request.rid, bool(request.finished()), [i for i in items or () if i is not None]


def prefetchable(item: MultimodalDataItem) -> bool:
    """Whether a waiting item can be encoded now exactly as its step would: hashed and laid out
    (the scheduler did both on arrival), its feature a plain tensor (not a CUDA-IPC proxy the
    step reconstructs, not a shared-memory pointer), and no precomputed embedding."""
    return (
        isinstance(getattr(item, "hash", None), int)
        and bool(getattr(item, "offsets", None))
        and isinstance(getattr(item, "feature", None), torch.Tensor)
        and getattr(item, "precomputed_embeddings", None) is None
        and not any(
            type(value).__name__ == "CudaIpcTensorTransportProxy"
            for value in getattr(item, "model_specific_data", {}).values()
        )
    )


def copy_back_pending() -> bool:
    """Whether SGLang's post-forward feature copy-back (0.5.21+) is still in flight: a retracted
    request's host features may still be arriving, so the prefetch waits a step (no sync)."""
    event = host_offload_event()
    return event is not None and not event.query()
