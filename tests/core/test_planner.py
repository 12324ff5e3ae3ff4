"""Planner: determinism, grouping, budget splits, overlap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.fakes import make_item
from vitbatch.core import Budget, RequestChunk, Window, plan_step, split_into_batches


def test_plan_is_deterministic_and_groups_by_modality_then_group() -> None:
    chunks = [
        RequestChunk(
            [make_item(1, 4, [(0, 4)]), make_item(2, 2, [(5, 2)], modality="audio")], Window(0, 9)
        ),
        RequestChunk(
            [make_item(3, 4, [(0, 4)], group="hi-res"), make_item(4, 4, [(4, 4)])], Window(0, 9)
        ),
    ]
    plans = [plan_step(chunks, lambda key: False, Budget()) for _ in range(3)]
    assert all(p == plans[0] for p in plans)
    groups = [(b.modality, b.group, [i.hash for i in b.items]) for b in plans[0].batches]
    assert groups == [("image", None, [1, 4]), ("audio", None, [2]), ("image", "hi-res", [3])]


def test_items_outside_window_are_not_planned() -> None:
    chunk = RequestChunk(
        [make_item(1, 4, [(0, 4)]), make_item(2, 4, [(10, 2), (20, 2)])], Window(4, 20)
    )
    plan = plan_step([chunk], lambda key: False, Budget())
    assert [i.hash for i in plan.needed[0]] == [2]


def test_oversized_item_goes_alone_and_splits_are_balanced() -> None:
    items = [make_item(h, n, [(0, n)]) for h, n in enumerate([3, 3, 3, 3, 20, 3])]
    batches = split_into_batches(items, Budget(max_cost=10, max_items=None))
    assert [[i.hash for i in b] for b in batches] == [[0, 1, 2], [3], [4], [5]]
    balanced = split_into_batches(
        [make_item(h, 3, [(0, 3)]) for h in range(5)], Budget(max_cost=12)
    )
    assert [len(b) for b in balanced] == [3, 2]


@settings(max_examples=300, deadline=None)
@given(
    costs=st.lists(st.integers(1, 50), max_size=30),
    max_cost=st.one_of(st.none(), st.integers(1, 80)),
    max_items=st.one_of(st.none(), st.integers(1, 8)),
)
def test_split_respects_budget_keeps_order_and_loses_nothing(costs, max_cost, max_items) -> None:
    items = [make_item(h, c, [(0, c)]) for h, c in enumerate(costs)]
    batches = split_into_batches(items, Budget(max_cost=max_cost, max_items=max_items))
    assert [i.hash for b in batches for i in b] == list(range(len(costs)))
    for batch in batches:
        assert batch
        if max_items is not None:
            assert len(batch) <= max_items
        if max_cost is not None and len(batch) > 1:
            assert sum(i.cost for i in batch) <= max_cost
    if max_cost is not None and max_items is None and costs and max(costs) <= max_cost:
        # Balanced splitting costs at most one call more than the minimum.
        import math

        assert len(batches) <= math.ceil(sum(costs) / max_cost) * 2


_RANK_SCRIPT = r"""
import torch
from tests.core.fakes import ConcatEncoder, make_item
from vitbatch.core import Budget, EmbeddingCache, Item, RequestChunk, Span, VitBatcher, Window
from vitbatch.core.planner import plan_step
from vitbatch.plugin import make_plugin_manager

def item(name, n, offset):
    features = torch.ones(n, 3, dtype=torch.float64)
    return Item(name, "image", n, (Span(offset, n),), features=features)

encoder = ConcatEncoder()
pm = make_plugin_manager(False, [encoder])
batcher = VitBatcher(Budget(max_cost=7), EmbeddingCache(5 * 2 * 6 * 8), pm, hidden_size=6)
names = [f"img-{i}" for i in range(7)]
for step in range(6):
    chunks = [
        RequestChunk([item(names[(step * 2 + r * 2 + k) % 7], 2, 4 * k) for k in range(2)],
                     Window(0, 12), r)
              for r in range(3)]
    encoder.calls.clear()
    plan = plan_step(chunks, batcher.cache.__contains__, batcher.budget)
    batcher.run_step(chunks)
    print(step, plan.hits, [[i.hash for i in call] for call in encoder.calls])
"""


def test_plan_and_cache_evolve_identically_under_any_hash_seed() -> None:
    """Tensor-parallel ranks are separate processes with their own PYTHONHASHSEED."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    outputs = []
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _RANK_SCRIPT], cwd=root, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "img-" in outputs[0] and "ItemKey" in outputs[0]  # the steps have hits
