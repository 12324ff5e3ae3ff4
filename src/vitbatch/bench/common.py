"""What every bench command shares: where it ran, dtypes and tolerances, how outputs
are compared, and the statistics of repeated rounds.

The numerics live here and nowhere else: :func:`max_difference` (worst relative
error over the steps of two modes), :func:`relative_error` (one tensor pair),
:func:`percentile`, and :class:`Spread` with :func:`verdict`, which is how a
ratio between two engines is named ("faster" / "slower" only when the ranges of
their rounds do not overlap, else "same"). Engine-free: no engine import here.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
"""Relative Frobenius error allowed between modes (see :func:`max_difference`)."""


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` (float32 on CPU, bfloat16 on CUDA unless given)."""
    device = torch.device(args.device)
    if args.dtype:
        return device, DTYPES[args.dtype]
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def run_environment(encoder: str, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    """What a result JSON records about where it ran (every bench command)."""
    return {
        "encoder": encoder,
        "device": device_name(device),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda_driver": driver_version() if device.type == "cuda" else None,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------
# Output comparison
# ---------------------------------------------------------------------------


def relative_error(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """``||a - b|| / ||a||`` of one pair; 0 when both are missing, inf on a shape mismatch
    or when only one is missing."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    a, b = a.double(), b.double().to(a.device)
    scale = torch.linalg.norm(a).item()
    difference = torch.linalg.norm(a - b).item()
    return difference / scale if scale > 0 else difference


def max_difference(
    reference: Sequence[torch.Tensor | None], other: Sequence[torch.Tensor | None]
) -> float:
    """Worst :func:`relative_error` over the steps of two modes.

    Relative, because a 32-block random ViT in bf16 has outputs of arbitrary
    scale and matmul kernels legitimately round differently for other batch
    shapes; inf on a shape mismatch or a missing output.
    """
    return max((relative_error(a, b) for a, b in zip(reference, other, strict=True)), default=0.0)


def token_mismatches(reference: Sequence[list[int]], other: Sequence[list[int]]) -> int:
    """Prompts whose greedy token ids differ (a missing prompt counts as one)."""
    return sum(a != b for a, b in zip(reference, other)) + abs(len(reference) - len(other))


# ---------------------------------------------------------------------------
# Statistics over passes and rounds
# ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over rounds."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values))

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high

    def format(self, spec: str = ".2f") -> str:
        if self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}–{self.high:{spec}})"


def verdict(ours: Spread, theirs: Spread, higher_is_better: bool = True) -> str:
    """ "faster" / "slower" when the two ranges do not overlap, else "same"."""
    if ours.overlaps(theirs):
        return "same"
    ahead = ours.low > theirs.high if higher_is_better else ours.high < theirs.low
    return "faster" if ahead else "slower"
