"""The one result type and the one table of every bench command, and the PNG plot.

:class:`Result` is what a mode measured on one workload, whichever engine ran it
(vitbatch's core, SGLang's step, vLLM end to end): the figures all three share,
plus the engine's own counters in ``extra``. Its :meth:`Result.as_dict` is the
JSON row. :func:`format_table` prints any rows (``as_dict`` rows, or the vLLM
bench's rows over rounds) with a list of :class:`Column`; a column whose row
also has a ``range`` entry for its key prints median (min–max).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20


@dataclass
class Result:
    """One mode on one workload.

    :param mode: the row's name (``per-request``, ``sglang-native``, ``vitbatch`` ...).
    :param images: images served in the counted pass.
    :param seconds: wall time of the counted pass.
    :param encoder_calls: encoder calls in that pass (None where they are not visible).
    :param peak_bytes: peak memory of that pass (None where unknown).
    :param extra: the engine's own figures, flattened into :meth:`as_dict`.
    """

    mode: str
    images: int
    seconds: float
    encoder_calls: int | None = None
    peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "images": self.images,
            "seconds": self.seconds,
            "encoder_calls": self.encoder_calls,
            "peak_bytes": self.peak_bytes,
            **self.extra,
            "images_per_second": self.images_per_second,
        }


@dataclass(frozen=True)
class Column:
    """One table column: its title, the row key, and how a value prints."""

    title: str
    key: str
    fmt: str | Callable[[Any], str] = "s"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        low_high = row.get("range", {}).get(self.key)
        if callable(self.fmt):
            return self.fmt(value)
        if low_high and low_high[0] != low_high[1] and isinstance(value, int | float):
            low, high = low_high
            return f"{value:{self.fmt}} ({low:{self.fmt}}–{high:{self.fmt}})"
        return format(value, self.fmt)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table, padded so it also reads as plain text."""
    cells = [[c.title for c in columns]] + [[c.cell(row) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def ratio_to(rows: list[dict[str, Any]], key: str, baseline: str, into: str) -> None:
    """Write ``row[key] / baseline_row[key]`` into ``row[into]`` (baseline: a mode name)."""
    base = next((r for r in rows if r["mode"] == baseline), rows[0])
    for row in rows:
        ours, theirs = row.get(key), base.get(key)
        row[into] = ours / theirs if ours is not None and theirs else None


def write_plot(results: Mapping[str, Sequence[dict]], path: Path, title: str) -> None:
    """Grouped bars per workload: images/s and peak GiB of each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results)
    modes = [r["mode"] for r in next(iter(results.values()))]
    width = 0.8 / len(modes)
    colors = ["#a5a5a5", "#ed7d31", "#4472c4"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, mode in enumerate(modes):
        xs = [w + (index - (len(modes) - 1) / 2) * width for w in range(len(workloads))]
        rows = [next(r for r in results[w] if r["mode"] == mode) for w in workloads]
        left.bar(
            xs, [r["images_per_second"] for r in rows], width, label=mode, color=colors[index % 3]
        )
        right.bar(
            xs,
            [(r["peak_bytes"] or 0) / GIB for r in rows],
            width,
            label=mode,
            color=colors[index % 3],
        )
    for axis, label in ((left, "images/s"), (right, "peak GiB")):
        axis.set_xticks(range(len(workloads)), workloads)
        axis.set_ylabel(label)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
