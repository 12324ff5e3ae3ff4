"""The per-step message from the scheduler's manager to every worker, and how it travels.

vLLM 0.27+ carries a manager's metadata in ``SchedulerOutput.ec_manager_metadata``
(the scheduler asks the manager for it). vLLM 0.26 has no such field, so the
scheduler patch (:mod:`.scheduler`) attaches the same object to the
``SchedulerOutput`` as an attribute; the output is a plain dataclass, pickled
whole to worker processes, so the attribute arrives with it. :func:`read`
looks in both places, so the workers need not know which route a version took.

Shared by both sides and importing neither: what arriving in a worker process
sets off (installing the runner wrappers) is given by the package through
:func:`on_arrival`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitbatch.adapters.vllm import surface

ATTRIBUTE = "vitbatch_metadata"
_arrival: list[Callable[[], Any]] = []


def on_arrival(callback: Callable[[], Any]) -> None:
    """Call ``callback`` whenever step metadata is unpickled (a worker learns vitbatch is on)."""
    if callback not in _arrival:
        _arrival.append(callback)


@dataclass(frozen=True)
class PrefetchOrder:
    """One item of a waiting request to encode ahead of its admission.

    The worker has not seen the request yet (it learns of a request when it is
    scheduled), so the order carries the item's inputs: vLLM's
    ``MultiModalKwargsItem`` as the scheduler's ``Request`` holds it (pickled
    with the step on multiprocess executors, shared by reference in-process).
    """

    mm_hash: str
    modality: str
    num_embeds: int
    cost: int
    data: Any


@dataclass(frozen=True)
class VitBatchStepMetadata:
    """One step's instructions from the scheduler's manager to every worker.

    Plain data (tuples of mm hashes, ints): it is pickled to worker processes.

    :ivar restore: host-tier entries to copy back into the device cache (they
        count as cached for this step's scheduling).
    :ivar demote: hashes of this step's ``free_encoder_mm_hashes`` to keep in
        the host tier instead of dropping.
    :ivar drop: host-tier entries to forget.
    :ivar reset: clear the host tier first (vLLM reset its encoder cache).
    :ivar host_capacity_embeds: the scheduler's bound on the host tier, in embedding
        rows (0: no host tier); the workers size their host arenas from it.
    :ivar prefetch: items of waiting requests to encode now, into the prefetch pool.
    :ivar prefetch_consume: pool entries an admitted request uses: they move into
        vLLM's encoder cache (the scheduler counted them as cached).
    :ivar prefetch_release: pool entries no waiting request needs any more.
    :ivar prefetch_pool_bytes: the pool's bound on each worker (0: prefetch off).
    """

    restore: tuple[str, ...] = ()
    demote: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    reset: bool = False
    max_batch_patches: int | None = None
    max_batch_items: int | None = 64
    check_finite: bool = False
    host_capacity_embeds: int = 0
    prefetch: tuple[PrefetchOrder, ...] = ()
    prefetch_consume: tuple[str, ...] = ()
    prefetch_release: tuple[str, ...] = ()
    prefetch_pool_bytes: int = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Arriving in a worker process means vitbatch is on: make sure that
        # process's model runners honour these instructions.
        for name, value in state.items():
            object.__setattr__(self, name, value)
        for callback in _arrival:
            callback()


def attach(scheduler_output: Any, metadata: VitBatchStepMetadata) -> None:
    """Give ``scheduler_output`` this step's metadata unless vLLM already carried it."""
    if isinstance(surface.carried_metadata(scheduler_output), VitBatchStepMetadata):
        return
    object.__setattr__(scheduler_output, ATTRIBUTE, metadata)


def read(scheduler_output: Any) -> VitBatchStepMetadata | None:
    """This step's metadata, or ``None`` when the step is not vitbatch's (vitbatch off)."""
    for metadata in (
        surface.carried_metadata(scheduler_output),
        getattr(scheduler_output, ATTRIBUTE, None),
    ):
        if isinstance(metadata, VitBatchStepMetadata):
            return metadata
    return None
