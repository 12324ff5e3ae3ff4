"""Run one workload through the three encoding modes and compare them.

Modes, all through the same core so only the grouping of misses differs:

- ``per-request``: one encoder call per request and step (the legacy path);
- ``unbounded``: every miss of the step in one call (SGLang's native CUDA path);
- ``vitbatch``: the planner with its token budget, pinned staging, non-blocking copies.

Each mode first makes an untimed pass that also warms up and records its
outputs (on the host) for the equality check, then ``repeat`` timed passes,
each with a fresh cache; the fastest counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from vitbatch.bench.encoder_plugin import EmbeddedEncoder
from vitbatch.bench.memory import read_peak, reset_peak
from vitbatch.core import Budget, EmbeddingCache, RequestChunk, StepStats, VitBatcher
from vitbatch.plugin import make_plugin_manager

MODES = ("per-request", "unbounded", "vitbatch")


@dataclass
class ModeResult:
    mode: str
    images: int
    seconds: float
    encoder_calls: int
    peak_bytes: int | None
    encoded_tokens: int
    plan_seconds: float
    assemble_seconds: float
    # Planning + assembly of the same steps replayed on a warm cache with the
    # device idle: the host cost alone. In a timed pass the assembly's kernel
    # launches can wait for room in a launch queue the encoder calls filled, so
    # ``assemble_seconds`` there is host wall time, not host work.
    idle_host_seconds: float = 0.0
    flops: float | None = None
    tokens_per_call: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    @property
    def host_share(self) -> float:
        """Planning + assembly host time (device idle) as a fraction of the step time."""
        return self.idle_host_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def tflops(self) -> float | None:
        return None if self.flops is None or self.seconds <= 0 else self.flops / self.seconds / 1e12

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(images_per_second=self.images_per_second, tflops=self.tflops, host_share=self.host_share)
        return out


def _run_steps(
    mode: str,
    steps: Sequence[Sequence[RequestChunk]],
    batcher: VitBatcher,
    keep_outputs: bool,
    on_step: Callable[[], None],
) -> tuple[StepStats, list[torch.Tensor | None]]:
    totals = StepStats()
    outputs: list[torch.Tensor | None] = []
    for chunks in steps:
        groups = [[chunk] for chunk in chunks] if mode == "per-request" else [list(chunks)]
        parts = []
        for group in groups:
            result = batcher.run_step(group)
            totals.add(result.stats)
            parts.extend(e for e in result.embeddings if e is not None)
        if keep_outputs:
            outputs.append(torch.cat(parts).float().cpu() if parts else None)
        on_step()
    return totals, outputs


def run_mode(
    mode: str,
    steps: Sequence[Sequence[RequestChunk]],
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    on_step: Callable[[], None] = lambda: None,
    flops: float | None = None,
    repeat: int = 1,
) -> tuple[ModeResult, list[torch.Tensor | None]]:
    """Time ``mode`` over ``steps``; returns the result and the reference outputs.

    :param repeat: timed passes; the fastest counts (the others absorb noise).
    :param flops: encoder FLOPs of the workload's distinct images (every mode
        encodes each distinct image once, thanks to the cache), for TFLOP/s.
    """

    pinned_cache: dict[int, torch.Tensor] = {}

    def fresh_batcher() -> VitBatcher:
        encoder = EmbeddedEncoder(model, device, dtype, pinned=(mode == "vitbatch"), pinned_cache=pinned_cache)
        pm = make_plugin_manager(load_entry_points=False, plugins=[encoder])
        mode_budget = budget if mode == "vitbatch" else Budget.unbounded()
        return VitBatcher(mode_budget, EmbeddingCache(8 << 30), pm)

    _, outputs = _run_steps(mode, steps, fresh_batcher(), keep_outputs=True, on_step=on_step)
    best: tuple[float, StepStats, int | None] | None = None
    for _ in range(repeat):
        batcher = fresh_batcher()  # cold cache: every pass encodes the same images
        reset_peak(device)
        started = time.perf_counter()
        totals, _ = _run_steps(mode, steps, batcher, keep_outputs=False, on_step=on_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        if best is None or seconds < best[0]:
            best = (seconds, totals, read_peak(device))
    assert best is not None
    seconds, totals, peak = best
    idle = _idle_host_seconds(mode, steps, batcher, device)
    images = len({(chunk.request_id, index) for chunks in steps for chunk in chunks for index in range(len(chunk.items))})
    result = ModeResult(
        mode=mode,
        images=images,
        seconds=seconds,
        encoder_calls=totals.encoder_calls,
        peak_bytes=peak,
        encoded_tokens=sum(totals.tokens_per_call),
        plan_seconds=totals.plan_seconds,
        assemble_seconds=totals.assemble_seconds,
        idle_host_seconds=idle,
        tokens_per_call=totals.tokens_per_call,
        flops=flops,
    )
    return result, outputs


def _idle_host_seconds(
    mode: str, steps: Sequence[Sequence[RequestChunk]], batcher: VitBatcher, device: torch.device
) -> float:
    """Plan + assemble time of ``steps`` replayed on ``batcher``'s warm cache, device idle.

    Every item is a cache hit, so no encoder runs: what remains is the planner
    and the assembly of every chunk, as in the timed pass.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    replay, _ = _run_steps(mode, steps, batcher, keep_outputs=False, on_step=lambda: None)
    if replay.misses:
        raise RuntimeError(f"{mode}: {replay.misses} cache misses in the warm replay; the cache is too small")
    return replay.plan_seconds + replay.assemble_seconds


def max_difference(reference: Sequence[torch.Tensor | None], other: Sequence[torch.Tensor | None]) -> float:
    """Worst relative difference ``||a - b|| / ||a||`` over the steps of two modes.

    Relative, because a 32-block random ViT in bf16 has outputs of arbitrary
    scale and matmul kernels legitimately round differently for other batch
    shapes; inf on a shape mismatch or a missing output.
    """
    worst = 0.0
    for a, b in zip(reference, other, strict=True):
        if a is None or b is None:
            if a is not b:
                return float("inf")
            continue
        if a.shape != b.shape:
            return float("inf")
        scale = a.double().norm().item()
        difference = (a.double() - b.double()).norm().item()
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst
