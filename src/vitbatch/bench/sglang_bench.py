"""``vitbatch bench --engine sglang``: SGLang's own multimodal step, natively and with vitbatch.

Two modes, on SGLang's real ``get_embedding_and_mask`` (:mod:`vitbatch.bench.sglang_engine`):

- ``sglang-native``: SGLang's ``_get_chunked_prefill_embedding`` as shipped;
- ``vitbatch``: the same function with vitbatch's AROUND hook, installed through
  SGLang's ``HookRegistry`` as the plugin entry point does.

Runs are multi-step (waves of requests, chunked prefill where the workload asks,
images repeated across steps and requests: :mod:`vitbatch.bench.sglang_workload`)
so SGLang's embedding cache, its ``host_offload_event`` and the pinned host
allocator reach steady state. A first pass runs both modes step by step and
compares their outputs on every step; the timed passes follow, interleaved
across modes, each with fresh caches; the fastest counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence

import torch

from vitbatch.bench import sgl_kernel_standin
from vitbatch.bench.common import (
    TOLERANCE,
    device_and_dtype,
    device_name,
    relative_error,
    run_environment,
)
from vitbatch.bench.memory import read_peak, reset_peak
from vitbatch.bench.report import MIB, Column, Result, format_table, ratio_to
from vitbatch.bench.sglang_engine import ModeState, embedding_func, install_hook, run_step
from vitbatch.bench.sglang_workload import EngineRequest, StepSlice, engine_workload
from vitbatch.bench.workload import WORKLOADS

ENGINE_MODES = ("sglang-native", "vitbatch")

COLUMNS = (
    Column("mode", "mode"),
    Column("step ms", "mean_step_seconds", lambda s: f"{s * 1e3:.2f}"),
    Column("images/s", "images_per_second", ".1f"),
    Column("x native", "speedup", ".2f"),
    Column("peak MiB", "peak_bytes", lambda b: f"{b / MIB:.1f}"),
    Column("peak/nat", "peak_ratio", ".2f"),
    Column("calls", "encoder_calls", "d"),
    Column("D2H", "d2h_copies", "d"),
    Column("D2H MiB", "d2h_bytes", lambda b: f"{b / MIB:.1f}"),
    Column("D2H ms", "d2h_seconds", lambda s: f"{s * 1e3:.2f}"),
)


def check_pass(
    functions: dict[str, Callable],
    model: torch.nn.Module,
    grids: dict,
    requests: dict[int, EngineRequest],
    steps: Sequence[Sequence[StepSlice]],
    device: torch.device,
    args: argparse.Namespace,
) -> list[float]:
    """Both modes step by step (each with its own caches); the per-step error of vitbatch vs
    native."""
    native = ModeState("sglang-native", functions["sglang-native"], args)
    ours = ModeState("vitbatch", functions["vitbatch"], args)
    native_func = embedding_func(model, grids, native.calls)
    our_func = embedding_func(model, grids, ours.calls)
    errors = []
    for step in steps:
        reference, reference_mask = run_step(native, step, requests, native_func, device)
        output, mask = run_step(ours, step, requests, our_func, device)
        error = relative_error(reference, output)
        if not torch.equal(reference_mask.cpu(), mask.cpu()):
            error = float("inf")
        errors.append(error)
    return errors


def timed_pass(
    mode: str,
    function: Callable,
    model: torch.nn.Module,
    grids: dict,
    requests: dict[int, EngineRequest],
    steps: Sequence[Sequence[StepSlice]],
    device: torch.device,
    args: argparse.Namespace,
) -> Result:
    state = ModeState(mode, function, args)
    func = embedding_func(model, grids, state.calls)
    reset_peak(device)
    step_seconds = []
    for step in steps:
        started = time.perf_counter()
        run_step(state, step, requests, func, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - started)
    peak = read_peak(device)
    images = sum(len(requests[p.rid].images) for step in steps for p in step if p.start == 0)
    fallbacks, unsupported, items = state.counters()
    seconds = sum(step_seconds)
    return Result(
        mode=mode,
        images=images,
        seconds=seconds,
        encoder_calls=state.calls[0],
        peak_bytes=peak,
        extra={
            "steps": len(steps),
            "d2h_copies": state.copies,
            "d2h_bytes": state.bytes,
            "d2h_seconds": state.d2h_seconds,
            "fallbacks": fallbacks,
            "unsupported": unsupported,
            "vitbatch_items": items,  # items through vitbatch's batcher (0 in native mode)
            "step_seconds": step_seconds,
            "mean_step_seconds": seconds / len(steps) if steps else 0.0,
        },
    )


def run(args: argparse.Namespace) -> int:
    """Entry of ``vitbatch bench --engine sglang``; 0 when every step matched and nothing fell
    back."""
    from vitbatch.encoders.qwen_vision import build_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    standin = sgl_kernel_standin.install_if_missing() if device.type == "cuda" else False
    from vitbatch.bench.sglang_engine import sglang_names  # after the stand-in, if any

    sglang_version = sglang_names().version
    torch.manual_seed(args.seed)
    model = build_encoder(args.encoder, device, dtype)
    config = model.config
    original, patched = install_hook()
    functions = {"sglang-native": original, "vitbatch": patched}
    tolerance = TOLERANCE[dtype]
    reports = []
    ok = True

    def write_json(complete: bool) -> None:
        """Written after every workload too, so a run stopped at a time limit keeps its figures."""
        if not args.json:
            return
        environment = {
            "engine": "sglang",
            "complete": complete,
            "sglang": sglang_version,
            "sgl_kernel_standin": standin,
            "sgl_kernel_standin_calls": sgl_kernel_standin.calls(),
            **run_environment(args.encoder, device, dtype),
            "cache_mb": args.cache_mb,
            "steps_min": args.steps,
            "repeat": args.repeat,
            "command": "vitbatch " + " ".join(sys.argv[1:]),
        }
        args.json.write_text(json.dumps({**environment, "workloads": reports}, indent=2))

    try:
        for name in args.workload:
            spec = WORKLOADS[name]
            if args.requests:
                spec = dataclasses.replace(spec, requests=args.requests)
            requests, steps = engine_workload(
                spec,
                patch_size=config.patch_size,
                merge_size=config.spatial_merge_size,
                patch_dim=config.patch_dim,
                min_steps=args.steps,
                seed=args.seed,
            )
            grids = {image.hash: image.grid for r in requests.values() for image in r.images}
            errors = check_pass(functions, model, grids, requests, steps, device, args)
            results: dict[str, Result] = {}
            for _ in range(args.repeat):
                for mode in ENGINE_MODES:  # interleaved: a slow spell of the machine hits both
                    result = timed_pass(
                        mode, functions[mode], model, grids, requests, steps, device, args
                    )
                    if mode not in results or result.seconds < results[mode].seconds:
                        results[mode] = result
            ours = results["vitbatch"].extra
            equal = all(e <= tolerance for e in errors)
            engaged = ours["vitbatch_items"] > 0  # the hook really served steps
            ok = ok and equal and ours["fallbacks"] == 0 and engaged
            rows = [results[m].as_dict() for m in ENGINE_MODES]
            ratio_to(rows, "images_per_second", "sglang-native", into="speedup")
            ratio_to(rows, "peak_bytes", "sglang-native", into="peak_ratio")
            images = len({i.hash for r in requests.values() for i in r.images})
            print(
                f"workload {name} (SGLang {sglang_version} get_embedding_and_mask): "
                f"{len(requests)} requests, "
                f"{len(steps)} steps, {images} distinct images; encoder {args.encoder} "
                f"{str(dtype).removeprefix('torch.')} on {device_name(device)}"
            )
            print(format_table(rows, COLUMNS))
            print(
                f"outputs equal on every step: {'yes' if equal else 'NO'} (max relative error "
                f"{max(errors):.2e}, tolerance {tolerance:g}); vitbatch fallbacks "
                f"{ours['fallbacks']}, steps served natively as unsupported "
                f"{ours['unsupported']}, items through vitbatch {ours['vitbatch_items']}\n"
            )
            reports.append(
                {
                    "workload": name,
                    "requests": len(requests),
                    "steps": len(steps),
                    "distinct_images": images,
                    "outputs_equal": equal,
                    "vitbatch_engaged": engaged,
                    "max_relative_error": max(errors),
                    "step_relative_error": errors,
                    "results": [results[m].as_dict() for m in ENGINE_MODES],
                    "ratios": {
                        "images_per_second": rows[1]["speedup"],
                        "peak_bytes": rows[1]["peak_ratio"],
                    },
                }
            )
            write_json(complete=False)
    finally:
        sglang_names().set_chunked_prefill_embedding(original)
    called = sgl_kernel_standin.calls()
    if called:
        ok = False
        print(f"FAILED: sgl_kernel stand-in names were called: {called}", file=sys.stderr)
    write_json(complete=True)
    return 0 if ok else 1
