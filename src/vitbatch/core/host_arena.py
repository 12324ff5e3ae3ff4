"""The host tier's storage: one pinned, bounded arena, filled off the step path.

Why an arena: a demotion that allocated a fresh pinned tensor and copied into
it synchronously would pay a pinned allocation (slow, and it serialises with
the device) and a device synchronisation inside the step, once per evicted
embedding. Here the pinned memory is allocated once, in fixed-size blocks; a
demotion takes free blocks and enqueues its device-to-host copies on a side
stream, after the work that produced the embedding, and records an event; the
step goes on. A restore makes the *consuming* stream wait on that event (a
device-side wait: no host synchronisation) and copies back from the blocks.

Blocks, not one contiguous run per entry: the tier is a least-recently-used
cache, entries of very different sizes come and go, and a block list never
fragments (an entry wastes less than one block). An entry's bytes are copied
one block-sized slice at a time.

Ordering, without waiting on the host:

* demotion: side stream waits for the current stream (the embedding is ready),
  copies, records ``ready``; the device tensor is marked used by the side
  stream (``record_stream``), so the allocator never hands its memory out
  before the copy has read it;
* restore: current stream waits for ``ready``, copies blocks back into a new
  device tensor, records ``released`` on the blocks it read;
* reuse of a block: the side stream waits for that block's ``released`` before
  writing into it.

A copy that fails to enqueue leaves nothing stored: the item is encoded again,
never served from a half-written entry. Host tensors (no CUDA) are kept as they
are, without a copy, unless ``copy_host_tensors`` (tests: the block path on CPU).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vitbatch.core.host_tier import LruTier, tensor_bytes

DEFAULT_BLOCK_BYTES = 1 << 20


@dataclass
class HostEntry:
    """One demoted embedding: where its rows live on the host and where they go back."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    home: torch.device
    nbytes: int
    blocks: list[int] = field(default_factory=list)
    tensor: torch.Tensor | None = None  # a host tensor kept as it is (no blocks)
    ready: Any = None  # torch.cuda.Event of the device-to-host copy, or None


class HostArena:
    """Demoted embeddings, least recently used first, keyed by any hashable key
    (the core's :class:`~vitbatch.core.items.ItemKey`; an adapter's own, e.g. vLLM's mm hash).

    :param capacity_bytes: the bound; the pinned arena (``capacity_bytes``
        rounded down to whole blocks) is allocated on the first device demotion.
    :param block_bytes: the allocation unit; by default 1 MiB, smaller for a small
        arena (at least 256 blocks, at least 4 KiB each).
    :param copy_host_tensors: copy host tensors into blocks too (for tests).
    """

    def __init__(
        self,
        capacity_bytes: int,
        block_bytes: int | None = None,
        *,
        copy_host_tensors: bool = False,
    ) -> None:
        if block_bytes is None:
            block_bytes = min(DEFAULT_BLOCK_BYTES, max(4096, capacity_bytes // 256))
        if capacity_bytes < 0 or block_bytes <= 0:
            raise ValueError("host arena capacity must be >= 0 and block size > 0")
        self.capacity = capacity_bytes
        self.block_bytes = block_bytes
        self.copy_host_tensors = copy_host_tensors
        self._index: LruTier[Hashable, HostEntry] = LruTier(capacity_bytes, _footprint(self))
        self._buffer: torch.Tensor | None = None
        self._free: list[int] = []
        self._released: dict[int, Any] = {}  # block -> event after its last restore read
        self._stream: Any = None

    # -- sizes and lookups ----------------------------------------------------
    @property
    def used(self) -> int:
        return self._index.used

    @property
    def row_bytes(self) -> int:
        """Bytes of the rows held, without the blocks' rounding (what metrics report)."""
        return sum(entry.nbytes for entry in self._index.entries.values())

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[Hashable]:
        return list(self._index.entries)

    def entry(self, key: Hashable) -> HostEntry | None:
        return self._index.peek(key)

    def peek(self, key: Hashable) -> torch.Tensor | None:
        """A host copy of the entry's rows, waiting for its copy (checks and tests only)."""
        entry = self._index.peek(key)
        if entry is None:
            return None
        if entry.tensor is not None:
            return entry.tensor
        if entry.ready is not None:
            entry.ready.synchronize()
        return self._gather(entry).clone()

    # -- demotion -------------------------------------------------------------
    def put(
        self, key: Hashable, tensor: torch.Tensor, protected: Iterable[Hashable] = ()
    ) -> list[Hashable] | None:
        """Store ``tensor``'s rows, evicting least-recently-used unprotected entries.

        :returns: the evicted keys, or ``None`` (nothing evicted, nothing stored) when
            it cannot fit or its copy could not be enqueued.
        """
        self.discard(key)
        nbytes = tensor_bytes(tensor)
        entry = HostEntry(tuple(tensor.shape), tensor.dtype, tensor.device, nbytes)
        if tensor.device.type == "cpu" and not self.copy_host_tensors:
            entry.tensor = tensor
        else:
            entry.blocks = [0] * self._blocks_for(nbytes)  # sized now, filled below
            if not self._ensure_buffer(tensor.device):
                return None
        evicted = self._index.make_room(_footprint(self)(entry), protected)
        if evicted is None:
            return None
        for _, victim in evicted:
            self._release(victim)
        if entry.tensor is None:
            entry.blocks = [self._free.pop() for _ in entry.blocks]
            try:
                entry.ready = self._copy_out(tensor, entry.blocks)
            except Exception:  # noqa: BLE001 - not stored: the item is encoded again
                self._free.extend(entry.blocks)
                return None
        self._index.put(key, entry)
        return [victim_key for victim_key, _ in evicted]

    # -- restore --------------------------------------------------------------
    def restore(self, key: Hashable) -> torch.Tensor | None:
        """The entry's rows on the device they came from (the entry stays, most recent).

        The copy back is ordered on the current stream after the demotion's copy;
        the host waits for neither.
        """
        entry = self._index.peek(key)
        if entry is None:
            return None
        self._index.touch(key)
        if entry.tensor is not None:
            host = entry.tensor
            return host.to(entry.home, non_blocking=True) if entry.home != host.device else host
        out = torch.empty(entry.shape, dtype=entry.dtype, device=entry.home)
        flat = out.view(-1).view(torch.uint8)
        cuda = entry.home.type == "cuda"
        if cuda:
            torch.cuda.current_stream(entry.home).wait_event(entry.ready)
        for start, block in zip(range(0, entry.nbytes, self.block_bytes), entry.blocks):
            length = min(self.block_bytes, entry.nbytes - start)
            flat[start : start + length].copy_(self._block(block, length), non_blocking=cuda)
        if cuda:
            released = torch.cuda.Event()
            released.record(torch.cuda.current_stream(entry.home))
            for block in entry.blocks:
                self._released[block] = released
        return out

    def take(self, key: Hashable) -> torch.Tensor | None:
        """:meth:`restore` and forget the entry."""
        out = self.restore(key)
        if out is not None:
            self.discard(key)
        return out

    # -- forgetting -----------------------------------------------------------
    def discard(self, key: Hashable) -> bool:
        entry = self._index.pop(key)
        if entry is not None:
            self._release(entry)
        return entry is not None

    def clear(self) -> None:
        for key in self.keys():
            self.discard(key)

    # -- internals ------------------------------------------------------------
    def _blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.block_bytes))

    def _release(self, entry: HostEntry) -> None:
        self._free.extend(entry.blocks)
        entry.blocks = []
        entry.tensor = None

    def _ensure_buffer(self, device: torch.device) -> bool:
        if self._buffer is not None:
            return True
        blocks = self.capacity // self.block_bytes
        if blocks == 0:
            return False
        pin = device.type == "cuda"
        self._buffer = torch.empty(blocks * self.block_bytes, dtype=torch.uint8, pin_memory=pin)
        self._free = list(range(blocks - 1, -1, -1))
        if pin:
            self._stream = torch.cuda.Stream(device)
        return True

    def _block(self, block: int, length: int) -> torch.Tensor:
        assert self._buffer is not None
        start = block * self.block_bytes
        return self._buffer[start : start + length]

    def _gather(self, entry: HostEntry) -> torch.Tensor:
        parts = [
            self._block(block, min(self.block_bytes, entry.nbytes - start))
            for start, block in zip(range(0, entry.nbytes, self.block_bytes), entry.blocks)
        ]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return flat[: entry.nbytes].view(entry.dtype).view(entry.shape)

    def _copy_out(self, tensor: torch.Tensor, blocks: list[int]) -> Any:
        """Enqueue the copy of ``tensor`` into ``blocks``; the event it completes, if any."""
        source = tensor.contiguous().view(-1).view(torch.uint8)
        if tensor.device.type != "cuda":
            for start, block in zip(range(0, source.numel(), self.block_bytes), blocks):
                piece = source[start : start + self.block_bytes]
                self._block(block, piece.numel()).copy_(piece)
            return None
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            for start, block in zip(range(0, source.numel(), self.block_bytes), blocks):
                released = self._released.pop(block, None)
                if released is not None:
                    stream.wait_event(released)
                piece = source[start : start + self.block_bytes]
                self._block(block, piece.numel()).copy_(piece, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        source.record_stream(stream)
        return ready


def _footprint(arena: HostArena):
    """An entry's size in the bound: whole blocks, or a kept host tensor's bytes."""

    def size_of(entry: HostEntry) -> int:
        if entry.tensor is not None:
            return entry.nbytes
        return len(entry.blocks) * arena.block_bytes

    return size_of
