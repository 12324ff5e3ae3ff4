"""Tensor parallelism: every rank makes the same encoder calls, even when one rank fails.

With a sharded vision tower every encoder call is a collective. If one rank
changed its sequence of calls on its own — split a micro-batch after an OOM,
re-encoded an item its cache had lost, fell back to the engine's path — the
collectives would stop pairing up and the server would hang, where the engine
alone would have failed loudly. So at world size > 1 the step engine takes
every decision that changes the call sequence from an *agreement*: a small
element-wise MAX all-reduce of integer flags over the ranks that share the
tower, on the engine's CPU (gloo) group, never on the device.

Two agreements per step, none at world size 1:

1. **Before any call** — one vector: a checksum of the step's items (ranks that
   disagree on the step itself all refuse it together), the smallest call
   capacity any rank can afford now (from a memory probe: an OOM is avoided by
   an agreed split before the call, never by a local retry after it), and one
   flag per distinct item: "I have no usable cached embedding" (a miss, an
   entry evicted on this rank only, a host-tier restore that failed). Any flag
   set means every rank encodes that item.
2. **After the calls** — "this rank failed" (a plugin raised, an output was
   malformed, an OOM surfaced inside a call). A rank that fails keeps making
   the remaining planned calls, so the sequence stays the same; then every rank
   raises and the adapter serves the step with the engine's own path on every
   rank together.

What no agreement can save: a fault inside an encoder call *before* that
call's own collective (the other ranks already wait in it). The engine alone
hangs or crashes the same way there; vitbatch adds no new way to get there,
because it never retries or skips a call locally at world size > 1.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitbatch.core.errors import VitBatchError
from vitbatch.core.items import ItemKey

Agree = Callable[[Sequence[int]], list[int]]
"""Element-wise MAX of an integer vector over the ranks sharing the encoder."""

CapacityProbe = Callable[[], "int | None"]
"""Most encoder cost units one call can take now on this rank; ``None``: no limit known."""

UNLIMITED = 1 << 62


class AgreedFallbackError(VitBatchError):
    """Another tensor-parallel rank failed this step: every rank falls back together."""


def group_agree(group: Any = None) -> Agree | None:
    """An :data:`Agree` over a ``torch.distributed`` process group (a CPU/gloo group).

    :param group: the ranks that share the vision tower; ``None`` for the default group.
    :returns: ``None`` at world size 1 (or without an initialized process group):
        no agreement is needed, and none is made.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size(group) <= 1:
        return None

    def agree(flags: Sequence[int]) -> list[int]:
        tensor = torch.tensor(list(flags), dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        return tensor.tolist()

    return agree


def step_checksum(keys: Sequence[ItemKey]) -> int:
    """The same 32-bit number on every rank that sees the same items in the same order."""
    return zlib.crc32(repr([(key.hash, key.num_tokens) for key in keys]).encode())


def start_flags(keys: Sequence[ItemKey], usable: set[ItemKey], capacity: int | None) -> list[int]:
    """Agreement 1's vector: checksum both ways (MAX of both = MIN and MAX), capacity
    negated (MAX of the negation = the smallest), one "need it encoded" flag per key."""
    checksum = step_checksum(keys)
    cap = UNLIMITED if capacity is None else max(0, int(capacity))
    return [checksum, -checksum, -cap, *(0 if key in usable else 1 for key in keys)]


def read_start(agreed: Sequence[int], keys: Sequence[ItemKey]) -> tuple[set[ItemKey], int | None]:
    """The agreed set of keys to encode and the agreed call capacity (``None``: no limit).

    :raises VitBatchError: the ranks do not see the same items (raised on every rank).
    """
    if agreed[0] != -agreed[1]:
        raise VitBatchError(
            "tensor-parallel ranks disagree on the step's multimodal items "
            f"(checksums {-agreed[1]}..{agreed[0]}): every rank falls back"
        )
    capacity = -agreed[2]
    to_encode = {key for key, flag in zip(keys, agreed[3:]) if flag}
    return to_encode, None if capacity >= UNLIMITED else capacity
