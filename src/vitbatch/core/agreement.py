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

1. **Before any call** — one fixed-length vector (so ranks that see different
   numbers of items still pair up): a checksum and the count of the step's
   items (ranks that disagree on the step itself all refuse it together), the
   smallest call capacity any rank can afford now (from a memory probe: an OOM
   is avoided by an agreed split before the call, never by a local retry after
   it), and one flag per distinct item: "I have no usable cached embedding" (a
   miss, an entry evicted on this rank only, a host-tier restore that failed).
   Any flag set means every rank encodes that item. The header holds the first
   :data:`HEADER_FLAGS` flags; a larger step sends the rest in a second vector,
   once every rank knows the count is the same.
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
from typing import Any, Union

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


HEADER_FLAGS = 32
"""Item flags carried in agreement 1's fixed-length header; a step with more items
sends the rest in a second vector, whose length every rank then knows to be the same."""

_HEADER = 5  # checksum, -checksum, count, -count, -capacity


def start_flags(keys: Sequence[ItemKey], usable: set[ItemKey], capacity: int | None) -> list[int]:
    """Agreement 1's header, the same length on every rank whatever it sees: checksum and
    item count both ways (MAX of both = MIN and MAX), capacity negated (MAX of the
    negation = the smallest), then a "need it encoded" flag for each of the first
    :data:`HEADER_FLAGS` keys, zero-padded."""
    checksum = step_checksum(keys)
    cap = UNLIMITED if capacity is None else max(0, int(capacity))
    flags = need_flags(keys, usable)[:HEADER_FLAGS]
    return [
        checksum,
        -checksum,
        len(keys),
        -len(keys),
        -cap,
        *flags,
        *[0] * (HEADER_FLAGS - len(flags)),
    ]


def need_flags(keys: Sequence[ItemKey], usable: set[ItemKey]) -> list[int]:
    return [0 if key in usable else 1 for key in keys]


def read_start(agreed: Sequence[int], keys: Sequence[ItemKey]) -> tuple[set[ItemKey], int | None]:
    """The agreed set of keys among the header's and the agreed call capacity
    (``None``: no limit).

    :raises VitBatchError: the ranks do not see the same items (raised on every rank,
        since every rank reads the same agreed header).
    """
    if agreed[2] != -agreed[3]:
        raise VitBatchError(
            "tensor-parallel ranks see different numbers of multimodal items in the step "
            f"({-agreed[3]}..{agreed[2]}): every rank falls back"
        )
    if agreed[0] != -agreed[1]:
        raise VitBatchError(
            "tensor-parallel ranks disagree on the step's multimodal items "
            f"(checksums {-agreed[1]}..{agreed[0]}): every rank falls back"
        )
    capacity = -agreed[4]
    flags = agreed[_HEADER : _HEADER + HEADER_FLAGS]
    to_encode = {key for key, flag in zip(keys, flags) if flag}
    return to_encode, None if capacity >= UNLIMITED else capacity


class LocalAgreement:
    """World size 1: every decision is this rank's own, so nothing is exchanged.

    The only strategy allowed to react to a fault on its own (halve a micro-batch
    after an OOM, raise at once): no other rank waits in a collective.
    """

    defers_failures = False

    def start(
        self, keys: Sequence[ItemKey], usable: set[ItemKey], capacity: int | None
    ) -> tuple[set[ItemKey], int | None, int]:
        """``(keys to encode, call capacity, collectives made)``."""
        return {key for key in keys if key not in usable}, capacity, 0

    def outcome(self, failure: BaseException | None) -> int:
        """Raise ``failure``, if any; else the number of collectives made (none)."""
        if failure is not None:
            raise failure
        return 0


class GroupAgreement:
    """World size > 1: the two agreements of the module docstring over ``agree``.

    A failure is deferred (:attr:`defers_failures`): the rank keeps making the
    planned calls, and :meth:`outcome` raises on every rank together.
    """

    defers_failures = True

    def __init__(self, agree: Agree) -> None:
        self.agree = agree

    def start(
        self, keys: Sequence[ItemKey], usable: set[ItemKey], capacity: int | None
    ) -> tuple[set[ItemKey], int | None, int]:
        """Agreement 1: ``(keys to encode, call capacity, collectives made)``.

        :raises VitBatchError: on every rank, when the ranks see other items.
        """
        to_encode, agreed_capacity = read_start(
            self.agree(start_flags(keys, usable, capacity)), keys
        )
        if len(keys) <= HEADER_FLAGS:
            return to_encode, agreed_capacity, 1
        rest = keys[HEADER_FLAGS:]
        flags = self.agree(need_flags(rest, usable))
        to_encode |= {key for key, flag in zip(rest, flags) if flag}
        return to_encode, agreed_capacity, 2

    def outcome(self, failure: BaseException | None) -> int:
        """Agreement 2: if any rank failed, every rank raises (the adapter falls back)."""
        if self.agree([0 if failure is None else 1])[0]:
            if failure is not None:
                raise failure
            raise AgreedFallbackError(
                "another tensor-parallel rank failed this step; every rank falls back together"
            )
        return 1


Agreement = Union[LocalAgreement, GroupAgreement]
