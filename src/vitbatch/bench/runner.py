"""Run one workload through the three encoding modes and compare them.

Modes, all through the same core so only the grouping of misses differs:

- ``per-request``: one encoder call per request and step (the legacy path);
- ``unbounded``: every miss of the step in one call, through vitbatch's core with no
  budget (the grouping SGLang uses natively, not SGLang's code: see ``--engine sglang``);
- ``vitbatch``: the planner with its token budget, pinned staging, non-blocking copies.

Each mode first makes an untimed pass that also warms up and records its
outputs (on the host) for the equality check, then ``repeat`` timed passes,
each with a fresh cache, interleaved across modes; the fastest counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from vitbatch.bench.encoder_plugin import EmbeddedEncoder
from vitbatch.bench.memory import read_peak, reset_peak
from vitbatch.bench.report import Result
from vitbatch.core import Budget, EmbeddingCache, RequestChunk, StepStats, VitBatcher
from vitbatch.plugin import make_plugin_manager

MODES = ("per-request", "unbounded", "vitbatch")


def core_result(
    mode: str,
    images: int,
    seconds: float,
    totals: StepStats,
    peak: int | None,
    idle_host_seconds: float,
    flops: float | None,
) -> Result:
    """A :class:`~vitbatch.bench.report.Result` of the core bench: its own figures are the
    planner's and assembly's host time, the tokens encoded, and TFLOP/s.

    ``idle_host_seconds``: planning + assembly of the same steps replayed on a warm
    cache with the device idle, the host cost alone. In a timed pass the assembly's
    kernel launches can wait for room in a launch queue the encoder calls filled, so
    ``assemble_seconds`` there is host wall time, not host work.
    """
    return Result(
        mode=mode,
        images=images,
        seconds=seconds,
        encoder_calls=totals.encoder_calls,
        peak_bytes=peak,
        extra={
            "encoded_tokens": sum(totals.tokens_per_call),
            "plan_seconds": totals.plan_seconds,
            "assemble_seconds": totals.assemble_seconds,
            "idle_host_seconds": idle_host_seconds,
            "flops": flops,
            "tokens_per_call": totals.tokens_per_call,
            "tflops": None if flops is None or seconds <= 0 else flops / seconds / 1e12,
            # planning + assembly host time (device idle) as a fraction of the step time
            "host_share": idle_host_seconds / seconds if seconds > 0 else 0.0,
        },
    )


def _run_steps(
    mode: str,
    steps: Sequence[Sequence[RequestChunk]],
    batcher: VitBatcher,
    keep_outputs: bool,
    on_step: Callable[[], None],
) -> tuple[StepStats, list[torch.Tensor | None]]:
    totals = StepStats()  # one bounded pass: per-call detail is wanted here
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


def run_modes(
    modes: Sequence[str],
    steps: Sequence[Sequence[RequestChunk]],
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    on_step: Callable[[], None] = lambda: None,
    flops: float | None = None,
    repeat: int = 1,
) -> tuple[list[Result], dict[str, list[torch.Tensor | None]]]:
    """Time every mode over ``steps``; returns the results and each mode's outputs.

    The timed passes are interleaved (pass 1 of every mode, then pass 2 ...) and
    the fastest pass of each mode counts: a shared machine that slows down for
    a few seconds then slows every mode, not only the one that happened to run.

    :param repeat: timed passes per mode.
    :param flops: encoder FLOPs of the workload's distinct images (every mode
        encodes each distinct image once, thanks to the cache), for TFLOP/s.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    pinned_cache: dict[int, torch.Tensor] = {}

    def fresh_batcher(mode: str) -> VitBatcher:
        encoder = EmbeddedEncoder(
            model, device, dtype, pinned=(mode == "vitbatch"), pinned_cache=pinned_cache
        )
        pm = make_plugin_manager(load_entry_points=False, plugins=[encoder])
        mode_budget = budget if mode == "vitbatch" else Budget.unbounded()
        hidden = model.config.out_hidden_size
        return VitBatcher(mode_budget, EmbeddingCache(8 << 30), pm, hidden_size=hidden)

    outputs = {}
    for mode in modes:  # untimed: warms up and records the outputs to compare
        _, outputs[mode] = _run_steps(
            mode, steps, fresh_batcher(mode), keep_outputs=True, on_step=on_step
        )

    best: dict[str, tuple[float, StepStats, int | None]] = {}
    idle: dict[str, float] = {}
    for round_ in range(repeat):
        for mode in modes:
            # Cold cache: every pass encodes. Only this pass's batcher is alive,
            # so no other pass's cached embeddings count in its peak memory.
            batcher = fresh_batcher(mode)
            reset_peak(device)
            started = time.perf_counter()
            totals, _ = _run_steps(mode, steps, batcher, keep_outputs=False, on_step=on_step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            if mode not in best or seconds < best[mode][0]:
                best[mode] = (seconds, totals, read_peak(device))
            if round_ == repeat - 1:
                idle[mode] = _idle_host_seconds(mode, steps, batcher, device)

    images = len(
        {
            (chunk.request_id, index)
            for chunks in steps
            for chunk in chunks
            for index in range(len(chunk.items))
        }
    )
    results = []
    for mode in modes:
        seconds, totals, peak = best[mode]
        results.append(core_result(mode, images, seconds, totals, peak, idle[mode], flops))
    return results, outputs


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
        raise RuntimeError(
            f"{mode}: {replay.misses} cache misses in the warm replay; the cache is too small"
        )
    return replay.plan_seconds + replay.assemble_seconds
