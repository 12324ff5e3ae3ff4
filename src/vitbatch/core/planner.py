"""The cross-request plan of one scheduler step.

The plan decides *what* the encoder runs, never *how*: which items of which
requests the chunk windows need, which of those are already cached, which
misses are the same item asked for twice, and how the misses are cut into
micro-batches under the token budget.

Everything here is a pure function of its inputs, in input order. Tensor-parallel
ranks see the same step, so they build the same plan and issue the same encoder
calls in the same order; nothing depends on dict ordering of unhashed objects,
timing or memory state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from vitbatch.core.items import Item, ItemKey, RequestChunk


@dataclass(frozen=True)
class Budget:
    """Upper bounds for one encoder call.

    :param max_cost: most encoder cost units in one call. The unit is the one of
        ``Item.cost``: vision patches fed to the encoder before spatial merging
        (what its activation memory scales with), in every adapter and the bench;
        embedding rows only for an encoder that exposes no patch count. An item
        that alone exceeds it goes alone. ``None``: unbounded.
    :param max_items: most items in one call. ``None``: unbounded.
    """

    max_cost: int | None = 16384
    max_items: int | None = 64

    def __post_init__(self) -> None:
        if self.max_cost is not None and self.max_cost <= 0:
            raise ValueError(f"Budget.max_cost must be positive or None, got {self.max_cost}")
        if self.max_items is not None and self.max_items <= 0:
            raise ValueError(f"Budget.max_items must be positive or None, got {self.max_items}")

    @classmethod
    def unbounded(cls) -> Budget:
        """All misses of a group in one call (what SGLang does natively on CUDA)."""
        return cls(max_cost=None, max_items=None)


@dataclass(frozen=True)
class MicroBatch:
    """Items of one modality/group that one encoder call encodes together."""

    modality: str
    group: Hashable
    items: tuple[Item, ...]

    @property
    def cost(self) -> int:
        return sum(item.cost or 0 for item in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


@dataclass(frozen=True)
class StepPlan:
    """What one step needs and how the misses will be encoded.

    :ivar needed: per request (step order), the items overlapping its window, in
        request order.
    :ivar hits: keys of needed items already in the cache, in first-use order
        (a tuple, not a set: cache recency must evolve identically on every rank).
    :ivar batches: the encoder calls to make, in order.
    :ivar deduplicated: needed occurrences that are served by another occurrence
        of the same key in this step instead of being encoded again.
    """

    needed: tuple[tuple[Item, ...], ...]
    hits: tuple[ItemKey, ...]
    batches: tuple[MicroBatch, ...]
    deduplicated: int

    @property
    def misses(self) -> int:
        return sum(len(batch.items) for batch in self.batches)


def overlapping_items(chunk: RequestChunk) -> tuple[Item, ...]:
    """The items of ``chunk`` with at least one placeholder inside its window."""
    return tuple(item for item in chunk.items if item.overlaps(chunk.window))


def split_into_batches(items: Sequence[Item], budget: Budget) -> list[list[Item]]:
    """Cut ``items`` (kept in order) into calls that respect ``budget``.

    Calls are balanced rather than filled greedily: with a total of 1.3 budgets
    we make two calls of 0.65 each instead of 1.0 + 0.3, because the short
    second call would pay the same fixed launch cost for little work. No call
    exceeds ``budget.max_cost`` unless it holds a single oversized item.
    """
    if not items:
        return []
    max_items = budget.max_items or len(items)
    if budget.max_cost is None:
        return [list(items[i : i + max_items]) for i in range(0, len(items), max_items)]
    total = sum(item.cost or 0 for item in items)
    calls = max(math.ceil(total / budget.max_cost), math.ceil(len(items) / max_items))
    target = math.ceil(total / calls)
    batches: list[list[Item]] = []
    current: list[Item] = []
    current_cost = 0
    for item in items:
        cost = item.cost or 0
        fits = (
            current_cost < target
            and current_cost + cost <= budget.max_cost
            and len(current) < max_items
        )
        if current and not fits:
            batches.append(current)
            current, current_cost = [], 0
        current.append(item)
        current_cost += cost
    if current:
        batches.append(current)
    return batches


def plan_step(
    chunks: Sequence[RequestChunk],
    is_cached: Callable[[ItemKey], bool],
    budget: Budget,
) -> StepPlan:
    """Plan one step across all requests.

    :param chunks: every request of the step, in step order.
    :param is_cached: whether a key can be served from the embedding cache
        (consulted only for cacheable items).
    :param budget: limits of one encoder call.
    """
    needed = tuple(overlapping_items(chunk) for chunk in chunks)
    return plan_needed(needed, is_cached, budget)


def plan_needed(
    needed: Sequence[Sequence[Item]],
    is_cached: Callable[[ItemKey], bool],
    budget: Budget,
) -> StepPlan:
    """Plan the encoding of items already known to be needed (no windows).

    This is :func:`plan_step` after the overlap test; an engine that schedules
    encoder inputs itself (vLLM) calls it directly with one list per request.
    """
    needed = tuple(tuple(items) for items in needed)
    hits: dict[ItemKey, None] = {}  # ordered set
    first_miss: dict[ItemKey, Item] = {}
    deduplicated = 0
    for items in needed:
        for item in items:
            key = item.key
            if key in first_miss:
                deduplicated += 1
                continue
            if item.cacheable and (key in hits or is_cached(key)):
                if key in hits:
                    deduplicated += 1
                hits[key] = None
                continue
            first_miss[key] = item

    groups: dict[tuple[str, Hashable], list[Item]] = {}
    for item in first_miss.values():
        groups.setdefault(item.batch_group, []).append(item)
    batches = tuple(
        MicroBatch(modality, group, tuple(batch))
        for (modality, group), members in groups.items()
        for batch in split_into_batches(members, budget)
    )
    return StepPlan(needed=needed, hits=tuple(hits), batches=batches, deduplicated=deduplicated)
