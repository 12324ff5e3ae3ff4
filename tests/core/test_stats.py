"""Totals stay the same size however many steps run; histograms count what they are fed."""

from __future__ import annotations

import sys

import pytest

from vitbatch.core import Histogram, StepStats, Totals


def step(costs: list[int], seconds: float = 0.002) -> StepStats:
    return StepStats(
        requests=2,
        items=len(costs) + 1,
        hits=1,
        misses=len(costs),
        encoder_calls=len(costs),
        tokens_per_call=[c // 4 for c in costs],
        cost_per_call=costs,
        items_per_call=[1] * len(costs),
        seconds_per_call=[seconds] * len(costs),
    )


def test_totals_memory_is_constant_over_100k_steps() -> None:
    totals = Totals()
    totals.add(step([64, 4096]))
    sizes = (sys.getsizeof(totals.__dict__), [len(h.counts) for h in _histograms(totals)])
    for i in range(100_000):
        totals.add(step([16 * (1 + i % 50), 1 << (i % 18)], seconds=0.0001 * (i % 7)))
    assert (sys.getsizeof(totals.__dict__), [len(h.counts) for h in _histograms(totals)]) == sizes
    assert all(not isinstance(v, list) for v in vars(totals).values())
    assert totals.steps == 100_001 and totals.encoder_calls == 200_002
    assert totals.cost_per_call.count == 200_002 == totals.seconds_per_call.count


def _histograms(totals: Totals) -> list[Histogram]:
    return [totals.cost_per_call, totals.items_per_call, totals.seconds_per_call]


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    h = Histogram((1.0, 10.0))
    for value in (0.5, 1.0, 1.5, 10.0, 11.0, 1e9):
        h.observe(value)
    assert h.counts == [2, 2, 2] and h.count == 6 and h.total == pytest.approx(1e9 + 24.0)
    with pytest.raises(ValueError, match="must increase"):
        Histogram((2.0, 1.0))


def test_totals_fold_steps_fallbacks_and_merge() -> None:
    a, b = Totals(), Totals()
    a.add(step([100, 300]))
    a.note_fallback("error")
    b.add(step([5000]))
    b.note_fallback("error")
    b.note_fallback("unsupported")
    a.merge(b)
    assert (
        a.steps == 2
        and a.encoder_calls == 3
        and a.encoded_cost == 5400
        and a.encoded_tokens == 1350
    )
    assert a.fallbacks == {"error": 2, "unsupported": 1}
    assert a.cost_per_call.count == 3 and a.cost_per_call.total == 5400
    plain = a.as_dict()
    assert plain["cost_per_call"]["counts"] == a.cost_per_call.counts and plain["hits"] == 2
