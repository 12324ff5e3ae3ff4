"""``vitbatch bench``: the three modes on one workload, a table, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from vitbatch.bench.common import (
    DTYPES,
    TOLERANCE,
    device_and_dtype,
    device_name,
    max_difference,
    run_environment,
)
from vitbatch.bench.report import GIB, Column, format_table, ratio_to, write_plot
from vitbatch.bench.runner import MODES, run_modes
from vitbatch.bench.workload import WORKLOADS, chunked_steps, draw_requests
from vitbatch.core import Budget

COLUMNS = (
    Column("mode", "mode"),
    Column("images/s", "images_per_second", ".1f"),
    Column("TFLOP/s", "tflops", lambda t: f"{t:.1f}" if t >= 1 else f"{t:.3f}"),
    Column("encoder calls", "encoder_calls", "d"),
    Column("peak GiB", "peak_bytes", lambda b: f"{b / GIB:.2f}"),
    Column("speedup", "speedup", lambda x: f"{x:.2f}x"),
    Column("plan+assemble ms", "host_ms", ".1f"),
    Column("idle host %", "host_share", lambda x: f"{x * 100:.2f}"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vitbatch.encoders.qwen_vision import CONFIGS

    parser.add_argument(
        "--encoder", default="tiny", choices=sorted(CONFIGS), help="bundled ViT config"
    )
    parser.add_argument("--workload", nargs="+", default=["default"], choices=sorted(WORKLOADS))
    parser.add_argument(
        "--requests", type=int, default=None, help="override the workload's request count"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument(
        "--max-patches",
        type=int,
        default=Budget().max_cost,
        help="vitbatch budget: patches per call",
    )
    parser.add_argument(
        "--max-items", type=int, default=Budget().max_items, help="vitbatch budget: items per call"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--repeat", type=int, default=2, help="timed passes per mode; the fastest counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--engine",
        default="core",
        choices=("core", "sglang"),
        help="core: vitbatch's core three ways; "
        "sglang: SGLang's own get_embedding_and_mask, native vs vitbatch",
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="--engine sglang: at least this many scheduler steps"
    )
    parser.add_argument(
        "--cache-mb", type=int, default=100, help="--engine sglang: embedding cache per mode (MiB)"
    )


def _progress(total: int, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; the bench runs without it
        return None
    return tqdm(total=total, desc="steps", unit="step", disable=disabled, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from vitbatch.encoders.qwen_vision import build_encoder

    if args.engine == "sglang":
        from vitbatch.bench import sglang_bench

        return sglang_bench.run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype(args)
    torch.manual_seed(args.seed)
    model = build_encoder(args.encoder, device, dtype)
    reports = [run_workload(args, name, model, device, dtype) for name in args.workload]
    environment = {
        **run_environment(args.encoder, device, dtype),
        "command": "vitbatch bench " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else None,
    }
    try:
        import transformers

        environment["transformers"] = transformers.__version__
    except ImportError:
        environment["transformers"] = None
    if args.json:
        args.json.write_text(json.dumps({**environment, "workloads": reports}, indent=2))
    if args.plot:
        write_plot(
            {r["workload"]: r["results"] for r in reports},
            args.plot,
            title=f"{args.encoder} on {environment['device']}",
        )
    return 0 if all(r["outputs_equal"] for r in reports) else 1


def run_workload(
    args: argparse.Namespace,
    name: str,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Run every mode on workload ``name``, print its table, return its report."""
    config = model.config
    spec = WORKLOADS[name]
    if args.requests:
        spec = type(spec)(**{**spec.__dict__, "requests": args.requests})
    requests = draw_requests(
        spec,
        patch_size=config.patch_size,
        merge_size=config.spatial_merge_size,
        patch_dim=config.patch_dim,
        seed=args.seed,
    )
    steps = chunked_steps(requests, spec.chunk_tokens)
    budget = Budget(max_cost=args.max_patches, max_items=args.max_items)
    flops = _workload_flops(model, requests)

    bar = _progress((1 + args.repeat) * len(steps) * len(args.modes), args.no_progress)
    results, outputs = run_modes(
        args.modes,
        steps,
        model,
        device,
        dtype,
        budget,
        on_step=(bar.update if bar else lambda: None),
        flops=flops,
        repeat=args.repeat,
    )
    if bar:
        bar.close()

    reference = args.modes[0]
    differences = {mode: max_difference(outputs[reference], outputs[mode]) for mode in args.modes}
    tolerance = TOLERANCE[dtype]
    equal = all(diff <= tolerance for diff in differences.values())
    print(
        f"workload {name}: {spec.requests} requests, {len(steps)} step(s), "
        f"{sum(len(r.images) for r in requests)} images; "
        f"encoder {args.encoder} {str(dtype).removeprefix('torch.')} "
        f"on {device_name(device)}; "
        f"vitbatch budget {budget.max_cost} patches / {budget.max_items} items"
    )
    rows = [r.as_dict() for r in results]
    for row in rows:
        row["host_ms"] = (row["plan_seconds"] + row["assemble_seconds"]) * 1e3
    baseline = "per-request" if "per-request" in args.modes else reference
    ratio_to(rows, "images_per_second", baseline, into="speedup")
    print(format_table(rows, COLUMNS))
    if "unbounded" in args.modes:
        print("(unbounded: vitbatch's core with no budget, not SGLang's code; see --engine sglang)")
    print(
        "outputs equal across modes: "
        + ("yes" if equal else "NO")
        + f" (relative error vs {reference}: "
        + ", ".join(f"{m} {d:.2e}" for m, d in differences.items())
        + f"; tolerance {tolerance:g})"
    )
    offload = None
    if device.type == "cuda":
        from vitbatch.bench.offload_report import measure_offload

        offload = measure_offload(max(steps, key=len), device)
        print(
            f"CPU-reference offload, largest step: {offload.copies_avoided} feature copies "
            f"({offload.bytes / 2**20:.1f} MiB) not copied back; copy-back would take "
            f"{offload.copy_back_seconds * 1e3:.2f} ms, handing back host references took "
            f"{offload.reference_seconds * 1e3:.3f} ms"
        )
    print()
    return {
        "workload": name,
        "requests": spec.requests,
        "steps": len(steps),
        "images": sum(len(r.images) for r in requests),
        "budget": {"max_cost": budget.max_cost, "max_items": budget.max_items},
        "outputs_equal": equal,
        "relative_error": differences,
        "results": [r.as_dict() for r in results],
        "offload": offload.__dict__ if offload else None,
    }


def _workload_flops(model: torch.nn.Module, requests: Sequence) -> float | None:
    """FLOPs of encoding each distinct image once, if the encoder can count them."""
    count = getattr(model, "flops", None)
    if count is None:
        return None
    distinct = {image.hash: image.grid for request in requests for image in request.images}
    return float(count(list(distinct.values())))
