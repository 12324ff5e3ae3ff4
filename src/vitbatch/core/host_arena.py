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
one run of consecutive blocks at a time: the free list hands blocks out in
ascending runs, so a demotion into a fresh or recently freed area is one copy.

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
#: Largest single pinned allocation. PyTorch's pinned allocator rounds every request
#: up to a power of two, so one 1.2 GB arena would pin 2 GiB (and take that much
#: longer to pin, inside the step of the first demotion); segments of at most a power
#: of two each waste less than one block.
SEGMENT_BYTES = 1 << 28


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
        self._segments: list[torch.Tensor] = []  # the arena, in pinned segments
        self._per_segment = max(1, SEGMENT_BYTES // block_bytes)  # blocks per segment
        self._free: list[int] = []
        self._released: dict[int, Any] = {}  # block -> event after its last restore read
        self._stream: Any = None
        self._row_bytes = 0

    # -- sizes and lookups ----------------------------------------------------
    @property
    def used(self) -> int:
        return self._index.used

    @property
    def row_bytes(self) -> int:
        """Bytes of the rows held, without the blocks' rounding (what metrics report).

        A running count, not a sum over the entries: the metrics read it after
        every step that moved the tier, and the tier may hold thousands of entries.
        """
        return self._row_bytes

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
        self._row_bytes += entry.nbytes
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
        for start, block, length in self._runs(entry.blocks, entry.nbytes):
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

    def _runs(self, blocks: list[int], nbytes: int) -> list[tuple[int, int, int]]:
        """``(byte offset in the entry, first block, bytes)`` per run of consecutive blocks.

        Why: one copy per run, not per block - a 1008-pixel image's embedding is
        36 blocks of 256 KiB, and each block copy is a Python slice and a copy
        launch on the step path; the free list hands blocks out in ascending runs
        (see :meth:`_release`), so a demotion is mostly one copy.
        """
        runs: list[tuple[int, int, int]] = []
        for index, block in enumerate(blocks):
            start = index * self.block_bytes
            length = min(self.block_bytes, nbytes - start)
            if length <= 0:
                break
            # Only an entry's last block is partial, so a run so far is whole blocks;
            # a run stays inside one segment.
            if (
                runs
                and block % self._per_segment
                and block == runs[-1][1] + runs[-1][2] // self.block_bytes
            ):
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + length)
            else:
                runs.append((start, block, length))
        return runs

    def _release(self, entry: HostEntry) -> None:
        """Free an entry leaving the index (evicted or discarded; once per entry)."""
        self._row_bytes -= entry.nbytes
        # Reversed: the free list is popped from its end, so an entry's blocks come
        # back out in ascending order and the next entry's copies coalesce (_runs).
        self._free.extend(reversed(entry.blocks))
        entry.blocks = []
        entry.tensor = None

    def _ensure_buffer(self, device: torch.device) -> bool:
        if self._segments:
            return True
        blocks = self.capacity // self.block_bytes
        if blocks == 0:
            return False
        pin = device.type == "cuda"
        for first in range(0, blocks, self._per_segment):
            count = min(self._per_segment, blocks - first)
            size = count * self.block_bytes
            self._segments.append(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
        self._free = list(range(blocks - 1, -1, -1))
        if pin:
            self._stream = torch.cuda.Stream(device)
        return True

    def _block(self, block: int, length: int) -> torch.Tensor:
        """``length`` bytes from the start of ``block`` (within its segment)."""
        segment, index = divmod(block, self._per_segment)
        start = index * self.block_bytes
        return self._segments[segment][start : start + length]

    def _gather(self, entry: HostEntry) -> torch.Tensor:
        runs = self._runs(entry.blocks, entry.nbytes)
        parts = [self._block(block, length) for _, block, length in runs]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        return flat[: entry.nbytes].view(entry.dtype).view(entry.shape)

    def _copy_out(self, tensor: torch.Tensor, blocks: list[int]) -> Any:
        """Enqueue the copy of ``tensor`` into ``blocks``; the event it completes, if any."""
        source = tensor.contiguous().view(-1).view(torch.uint8)
        runs = self._runs(blocks, source.numel())
        if tensor.device.type != "cuda":
            for start, block, length in runs:
                self._block(block, length).copy_(source[start : start + length])
            return None
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            waited: list[Any] = []  # one restore's event covers every block it read
            for block in blocks:
                released = self._released.pop(block, None)
                if released is not None and all(released is not e for e in waited):
                    waited.append(released)
                    stream.wait_event(released)
            for start, block, length in runs:
                self._block(block, length).copy_(source[start : start + length], non_blocking=True)
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
