"""What CPU-reference offload saves after a step: the copy-back of every feature.

Engines free the device copies of an item's features after the forward by
copying them back to the host (SGLang: ``feature.to("cpu", non_blocking=True)``
plus an event the next step waits on). With :class:`HostReferenceOffload` the
host tensor the features came from is handed back instead. This measures both
on one step's features.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vitbatch.core import HostReferenceOffload, RequestChunk


@dataclass
class OffloadReport:
    features: int
    bytes: int
    copy_back_seconds: float
    reference_seconds: float
    copies_avoided: int


def measure_offload(chunks: Sequence[RequestChunk], device: torch.device) -> OffloadReport:
    """Move one step's distinct features to ``device``, then release them both ways."""
    distinct = {id(item.features): item.features for chunk in chunks for item in chunk.items}
    host = list(distinct.values())

    native_moved = [f.to(device, non_blocking=True) for f in host]
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    copied = [f.to("cpu", non_blocking=True) for f in native_moved]
    event = torch.cuda.Event()
    event.record()
    event.synchronize()  # what the next step waits on before touching the features
    copy_back = time.perf_counter() - started
    del native_moved, copied

    offload = HostReferenceOffload()
    moved = [offload.to_device(f, device) for f in host]
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    released = [offload.release(f) for f in moved]
    reference = time.perf_counter() - started
    _check_host_references(released, host)
    return OffloadReport(
        features=len(host),
        bytes=offload.stats.d2h_bytes_avoided,
        copy_back_seconds=copy_back,
        reference_seconds=reference,
        copies_avoided=offload.stats.d2h_copies_avoided,
    )


def _check_host_references(released: Sequence[torch.Tensor], host: Sequence[torch.Tensor]) -> None:
    """Each released tensor is the feature's own host tensor or, for a pageable
    feature, the pinned twin the offload made once (same content, on the host)."""
    for index, (back, original) in enumerate(zip(released, host, strict=True)):
        if back is original:
            continue
        if back.device.type != "cpu" or not back.is_pinned() or not torch.equal(back, original):
            raise RuntimeError(
                f"feature {index}: release returned neither its host tensor "
                "nor an equal pinned twin "
                f"(device {back.device}, pinned {back.is_pinned()})"
            )
