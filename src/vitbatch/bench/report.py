"""Text table and PNG plot of benchmark results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitbatch.bench.runner import ModeResult

GIB = 1 << 30


def format_table(results: Sequence[ModeResult], baseline: str) -> str:
    base = next((r for r in results if r.mode == baseline), results[0])
    rows = [("mode", "images/s", "TFLOP/s", "encoder calls", "peak GiB", "speedup", "plan+assemble ms")]
    for r in results:
        rows.append(
            (
                r.mode,
                f"{r.images_per_second:.1f}",
                "-" if r.tflops is None else (f"{r.tflops:.1f}" if r.tflops >= 1 else f"{r.tflops:.3f}"),
                str(r.encoder_calls),
                "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}",
                f"{r.images_per_second / base.images_per_second:.2f}x",
                f"{(r.plan_seconds + r.assemble_seconds) * 1e3:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_plot(results: Sequence[ModeResult], path: Path, title: str) -> None:
    """Bar chart of images/s and peak memory per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r.mode for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(modes, [r.images_per_second for r in results], color="#4472c4")
    left.set_ylabel("images/s")
    right.bar(modes, [(r.peak_bytes or 0) / GIB for r in results], color="#ed7d31")
    right.set_ylabel("peak GiB")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
