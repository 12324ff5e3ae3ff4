"""``vitbatch bench``: the three modes on one workload, a table, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from vitbatch.bench.report import format_table, write_plot
from vitbatch.bench.runner import MODES, ModeResult, max_difference, run_mode
from vitbatch.bench.workload import WORKLOADS, chunked_steps, draw_requests
from vitbatch.core import Budget

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vitbatch.encoders.qwen_vision import CONFIGS

    parser.add_argument("--encoder", default="tiny", choices=sorted(CONFIGS), help="bundled ViT config")
    parser.add_argument("--workload", default="default", choices=sorted(WORKLOADS))
    parser.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--max-tokens", type=int, default=Budget().max_tokens, help="vitbatch budget: patches per call")
    parser.add_argument("--max-items", type=int, default=Budget().max_items, help="vitbatch budget: items per call")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeat", type=int, default=2, help="timed passes per mode; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true")


def _progress(total: int, disabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; the bench runs without it
        return None
    return tqdm(total=total, desc="steps", unit="step", disable=disabled, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from vitbatch.encoders.qwen_vision import CONFIGS, build_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = CONFIGS[args.encoder]
    spec = WORKLOADS[args.workload]
    if args.requests:
        spec = type(spec)(**{**spec.__dict__, "requests": args.requests})
    torch.manual_seed(args.seed)
    model = build_encoder(args.encoder, device, dtype)
    requests = draw_requests(
        spec,
        patch_size=config.patch_size,
        merge_size=config.spatial_merge_size,
        patch_dim=config.patch_dim,
        seed=args.seed,
    )
    steps = chunked_steps(requests, spec.chunk_tokens)
    budget = Budget(max_tokens=args.max_tokens, max_items=args.max_items)
    flops = _workload_flops(model, requests)

    bar = _progress((1 + args.repeat) * len(steps) * len(args.modes), args.no_progress)
    results: list[ModeResult] = []
    outputs = {}
    for mode in args.modes:
        result, outputs[mode] = run_mode(
            mode, steps, model, device, dtype, budget, on_step=(bar.update if bar else lambda: None), flops=flops,
            repeat=args.repeat,
        )
        results.append(result)
    if bar:
        bar.close()

    reference = args.modes[0]
    differences = {mode: max_difference(outputs[reference], outputs[mode]) for mode in args.modes}
    tolerance = TOLERANCE[dtype]
    equal = all(diff <= tolerance for diff in differences.values())

    header = (
        f"workload {args.workload}: {spec.requests} requests, {len(steps)} step(s), "
        f"{sum(len(r.images) for r in requests)} images; encoder {args.encoder} {str(dtype).removeprefix('torch.')} "
        f"on {_device_name(device)}; vitbatch budget {budget.max_tokens} patches / {budget.max_items} items"
    )
    print(header)
    print(format_table(results, baseline="per-request" if "per-request" in args.modes else reference))
    print(
        "outputs equal across modes: "
        + ("yes" if equal else "NO")
        + f" (max |diff| vs {reference}: "
        + ", ".join(f"{m} {d:.2e}" for m, d in differences.items())
        + f"; tolerance {tolerance:g})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "workload": args.workload,
                    "encoder": args.encoder,
                    "device": _device_name(device),
                    "dtype": str(dtype),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "budget": {"max_tokens": budget.max_tokens, "max_items": budget.max_items},
                    "outputs_equal": equal,
                    "max_difference": differences,
                    "modes": [r.as_dict() for r in results],
                },
                indent=2,
            )
        )
    if args.plot:
        write_plot(results, args.plot, title=header.split(";")[0])
    return 0 if equal else 1


def _workload_flops(model: torch.nn.Module, requests: Sequence) -> float | None:
    """FLOPs of encoding each distinct image once, if the encoder can count them."""
    count = getattr(model, "flops", None)
    if count is None:
        return None
    distinct = {image.hash: image.grid for request in requests for image in request.images}
    return float(count(list(distinct.values())))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
