"""Prefetch selection and its ledger (vitbatch.core.prefetch), property-based."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitbatch.core import ItemKey
from vitbatch.core.prefetch import Candidate, PrefetchLedger, PrefetchLimits, select_prefetch

keys = st.builds(ItemKey, st.integers(0, 12), st.sampled_from([4, 16, 64]))
requests = st.lists(st.lists(st.tuples(keys, st.integers(1, 600)), max_size=4), max_size=8).map(
    lambda queue: [
        [Candidate(f"r{i}", key, cost) for key, cost in request] for i, request in enumerate(queue)
    ]
)
limits = st.builds(
    PrefetchLimits,
    max_requests=st.integers(1, 8),
    max_cost=st.integers(1, 1500),
    max_items=st.integers(1, 10),
    max_pool_bytes=st.integers(1, 4096),
)


def oracle(waiting, lim, known, row_bytes):
    """The rule, written as a flat walk over the queue."""
    flat = [c for request in waiting[: lim.max_requests] for c in request]
    out, seen, cost, room = [], set(known), 0, lim.max_pool_bytes
    for c in flat:
        if c.key in seen:
            continue
        seen.add(c.key)
        if c.cost > lim.max_cost:
            continue
        size = c.key.num_tokens * row_bytes
        if cost + c.cost > lim.max_cost or len(out) >= lim.max_items or size > room:
            break
        out.append(c)
        cost += c.cost
        room -= size
    return out


@settings(max_examples=400, deadline=None)
@given(requests, limits, st.sets(keys, max_size=6), st.sampled_from([0, 2, 16]))
def test_selection_follows_the_queue_within_every_limit(waiting, lim, known, row_bytes):
    picked = select_prefetch(waiting, lim, known.__contains__, row_bytes=row_bytes)
    assert picked == oracle(waiting, lim, known, row_bytes)
    assert picked == select_prefetch(waiting, lim, known.__contains__, row_bytes=row_bytes)
    assert len({c.key for c in picked}) == len(picked)
    assert not any(c.key in known for c in picked)
    assert sum(c.cost for c in picked) <= lim.max_cost
    assert len(picked) <= lim.max_items
    assert sum(c.key.num_tokens * row_bytes for c in picked) <= lim.max_pool_bytes
    allowed = {f"r{i}" for i in range(lim.max_requests)}
    assert {c.request_id for c in picked} <= allowed


def test_an_item_that_does_not_fit_stops_the_walk_but_an_oversized_one_is_passed_over():
    a, b, c = (ItemKey(h, 16) for h in "abc")
    lim = PrefetchLimits(max_requests=4, max_cost=100, max_items=8)
    waiting = [[Candidate("r0", a, 60)], [Candidate("r1", b, 50)], [Candidate("r2", c, 10)]]
    assert [x.key for x in select_prefetch(waiting, lim, lambda k: False)] == [a]
    waiting = [[Candidate("r0", a, 500)], [Candidate("r1", b, 50)], [Candidate("r2", c, 10)]]
    assert [x.key for x in select_prefetch(waiting, lim, lambda k: False)] == [b, c]


@pytest.mark.parametrize("field", ["max_requests", "max_cost", "max_items", "max_pool_bytes"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_bad_limits_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"PrefetchLimits.{field}"):
        PrefetchLimits(**{field: value})


ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), st.integers(0, 5), keys, st.integers(0, 64)),
        st.tuples(st.just("consume"), keys),
        st.tuples(st.just("cancel"), keys),
        st.tuples(st.just("evict"), keys),
        st.tuples(st.just("release"), st.integers(0, 5)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_the_ledger_accounts_for_every_prefetch_and_leaks_nothing(script):
    ledger = PrefetchLedger()
    held: dict[ItemKey, set[str]] = {}
    sizes: dict[ItemKey, int] = {}
    for op in script:
        if op[0] == "start":
            rid, key, size = f"r{op[1]}", op[2], op[3]
            ledger.started([Candidate(rid, key, 1)], {key: size})
            if key not in held:  # a key already held keeps its first size
                sizes[key] = size
            held.setdefault(key, set()).add(rid)
        elif op[0] == "consume":
            assert ledger.consumed(op[1]) == (op[1] in held)
            held.pop(op[1], None)
        elif op[0] == "cancel":
            ledger.cancelled(op[1])
            held.pop(op[1], None)
        elif op[0] == "evict":
            assert ledger.evicted(op[1]) == (op[1] in held)
            held.pop(op[1], None)
        else:
            rid = f"r{op[1]}"
            freed = ledger.release_request(rid)
            expect = [k for k, owners in held.items() if owners == {rid}]
            assert sorted(freed, key=repr) == sorted(expect, key=repr)
            for key in list(held):
                held[key].discard(rid)
                if not held[key]:
                    del held[key]
        assert set(ledger.keys()) == set(held)
        for key, owners in held.items():
            assert ledger.owners(key) == frozenset(owners)
        s = ledger.stats
        assert s.prefetched == s.consumed + s.wasted + s.cancelled + len(ledger)
        assert s.bytes_held == sum(sizes[k] for k in held)
    for rid in range(6):
        ledger.release_request(f"r{rid}")
    for key in list(ledger.keys()):  # a key can outlive its owners only if never owned
        ledger.evicted(key)
    assert len(ledger) == 0 and ledger.stats.bytes_held == 0
    assert ledger._keys_of == {} and ledger._bytes == {}
