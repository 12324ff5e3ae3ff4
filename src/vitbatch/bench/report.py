"""Text table and PNG plot of benchmark results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from vitbatch.bench.runner import ModeResult

GIB = 1 << 30


def format_table(results: Sequence[ModeResult], baseline: str) -> str:
    base = next((r for r in results if r.mode == baseline), results[0])
    rows = [
        (
            "mode",
            "images/s",
            "TFLOP/s",
            "encoder calls",
            "peak GiB",
            "speedup",
            "plan+assemble ms",
            "idle host %",
        )
    ]
    for r in results:
        rows.append(
            (
                r.mode,
                f"{r.images_per_second:.1f}",
                "-"
                if r.tflops is None
                else (f"{r.tflops:.1f}" if r.tflops >= 1 else f"{r.tflops:.3f}"),
                str(r.encoder_calls),
                "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}",
                f"{r.images_per_second / base.images_per_second:.2f}x",
                f"{(r.plan_seconds + r.assemble_seconds) * 1e3:.1f}",
                f"{r.host_share * 100:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
