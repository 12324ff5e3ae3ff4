"""What the step engine counts: per step in detail, over the process in constant memory.

A serving engine runs for weeks. :class:`StepStats` describes one step and may
list every encoder call of it (a step makes a handful); :class:`Totals` sums
steps into plain counters and fixed-bucket histograms, so its size does not
depend on how many steps ran. Metrics exporters (:mod:`vitbatch.metrics`) and
``vitbatch bench`` read :class:`Totals`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields

# Bucket upper bounds (inclusive); one more bucket counts everything above the last.
COST_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(4, 18))  # 16 .. 131072
ITEM_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass
class StepStats:
    """What one step did. ``*_seconds`` are host wall-clock times (no device sync).

    ``tokens_per_call``, ``cost_per_call``, ``items_per_call`` and
    ``seconds_per_call`` have one entry per encoder call of this step.
    """

    requests: int = 0
    items: int = 0
    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    deduplicated: int = 0
    encoder_calls: int = 0
    tokens_per_call: list[int] = field(default_factory=list)
    cost_per_call: list[int] = field(default_factory=list)
    items_per_call: list[int] = field(default_factory=list)
    seconds_per_call: list[float] = field(default_factory=list)
    oom_splits: int = 0
    agreements: int = 0
    plan_seconds: float = 0.0
    encode_seconds: float = 0.0
    assemble_seconds: float = 0.0
    d2h_copies_avoided: int = 0
    d2h_bytes_avoided: int = 0

    def add(self, other: StepStats) -> None:
        """Accumulate ``other`` into ``self`` (for a bounded run such as a benchmark pass)."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, list):
                mine.extend(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))


@dataclass
class Histogram:
    """Counts of observations per fixed bucket, plus their sum: constant size.

    ``counts[i]`` counts observations ``<= bounds[i]`` and ``> bounds[i-1]``;
    ``counts[-1]`` those above the last bound (Prometheus' ``+Inf`` bucket is the
    running total of all of them).
    """

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError(f"histogram bounds must increase, got {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_all(self, values: Sequence[float]) -> None:
        for value in values:
            self.observe(value)

    @property
    def count(self) -> int:
        return sum(self.counts)


def _histogram(bounds: tuple[float, ...]):
    return field(default_factory=lambda: Histogram(bounds))


@dataclass
class Totals:
    """Everything a :class:`~vitbatch.core.batcher.VitBatcher` did since it was made.

    Counters plus three histograms (cost and items per encoder call, seconds per
    encoder call): memory is constant in the number of steps. ``fallbacks`` counts
    steps the adapter served with the engine's own path instead
    (:meth:`VitBatcher.note_fallback`), by reason.
    """

    steps: int = 0
    requests: int = 0
    items: int = 0
    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    deduplicated: int = 0
    encoder_calls: int = 0
    encoded_tokens: int = 0
    encoded_cost: int = 0
    oom_splits: int = 0
    agreements: int = 0
    plan_seconds: float = 0.0
    encode_seconds: float = 0.0
    assemble_seconds: float = 0.0
    d2h_copies_avoided: int = 0
    d2h_bytes_avoided: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    cost_per_call: Histogram = _histogram(COST_BUCKETS)
    items_per_call: Histogram = _histogram(ITEM_BUCKETS)
    seconds_per_call: Histogram = _histogram(SECONDS_BUCKETS)

    def add(self, step: StepStats) -> None:
        """Fold one step into the totals."""
        self.steps += 1
        for name in _STEP_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(step, name))
        self.encoded_tokens += sum(step.tokens_per_call)
        self.encoded_cost += sum(step.cost_per_call)
        self.cost_per_call.observe_all(step.cost_per_call)
        self.items_per_call.observe_all(step.items_per_call)
        self.seconds_per_call.observe_all(step.seconds_per_call)

    def note_fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def merge(self, other: Totals) -> None:
        """Add another batcher's totals (an adapter summing several model runners)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, Histogram):
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
                mine.total += theirs.total
            elif isinstance(mine, dict):
                for key, value in theirs.items():
                    mine[key] = mine.get(key, 0) + value
            else:
                setattr(self, f.name, mine + theirs)

    def as_dict(self) -> dict[str, object]:
        """Plain data (JSON-ready): histograms as ``{"bounds", "counts", "sum"}``."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Histogram):
                value = {
                    "bounds": list(value.bounds),
                    "counts": list(value.counts),
                    "sum": value.total,
                }
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out


_STEP_COUNTERS = tuple(
    f.name
    for f in fields(StepStats)
    if f.default_factory is MISSING  # the non-list fields
)
"""The :class:`StepStats` counters :class:`Totals` sums as they are (one name in both)."""
