"""``vitbatch bench-vllm``: vLLM end to end, with and without vitbatch, on both model runners.

Each configuration (model runner x encoder CUDA graphs x native/vitbatch) runs
in its own child process: one fresh vLLM engine (``LLM``, in-process engine core
so the counters are readable), which then runs every workload:

* ``mixed`` - 64 requests, 1-4 images each, 224-1120 px sides;
* ``video`` - 32 requests of 8 frames each (images), a quarter of each
  request's frames shared with the other requests;
* ``resend`` - multi-turn: 48 first turns with 2 images each, then 32 filler
  requests whose images push the first turns' embeddings out of vLLM's encoder
  cache (its size follows ``--max-num-batched-tokens``); then, timed, 48 later
  turns sending the same images again (other text). vLLM re-encodes them;
  vitbatch restores them from its host tier. Only the later turns are timed:
  they are what the host tier changes.

Each workload is a list of phases (one ``LLM.generate`` call each); the last
phase is the timed one. Per workload: one warm-up pass, then ``--passes`` timed
passes (``max_tokens=1``: prefill throughput), each with images of a fresh seed,
then one equality pass (``max_tokens=8``, greedy) whose token ids are compared
between native and vitbatch. Figures: prefill requests/s and images/s, TTFT
p50/p99 (vLLM's own per-request ``first_token_latency``), encoder calls (calls
of the model's ``embed_multimodal``, in both modes), peak GPU memory above the
engine's steady allocation, and vitbatch's host-tier restores.

``--max-patches`` takes several values (0: no limit beyond vLLM's own encoder
budget per step): each is one vitbatch configuration, compared with the same
native run.

Prefix caching is off in every configuration, so a re-sent image reaches the
encoder path in both modes. With ``--model`` the script runs a real checkpoint;
by default it writes a Qwen2.5-VL-7B-shaped directory without weights and runs it
with ``load_format="dummy"`` (seeded random weights, no download).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKLOADS = ("mixed", "video", "resend")
RUNNERS = ("v2", "v1")
MODES = ("native", "vitbatch")


# ---------------------------------------------------------------------------
# Workloads: lists of (prompt text, images), deterministic per seed
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    images: tuple[tuple[int, int, int], ...]  # (width, height, content seed)
    words: str = "describe the images"


def _side(rng, low: int, high: int) -> int:
    return int(rng.integers(low // 28, high // 28 + 1)) * 28


def workload(name: str, seed: int, scale: float = 1.0) -> list[list[Request]]:
    """The phases of one pass (the last is timed); image contents are unique to ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = seed * 1_000_000
    n = max(2, round(64 * scale))
    if name == "mixed":
        return [
            [
                Request(
                    tuple(
                        (_side(rng, 224, 1120), _side(rng, 224, 1120), base + 10 * r + i)
                        for i in range(int(rng.integers(1, 5)))
                    )
                )
                for r in range(n)
            ]
        ]
    if name == "video":
        shared = [(448, 448, base + 900_000 + i) for i in range(2)]  # a quarter of 8 frames
        return [
            [
                Request(
                    tuple(shared + [(448, 448, base + 8 * r + i) for i in range(6)]),
                    "describe the frames",
                )
                for r in range(max(2, n // 2))
            ]
        ]
    if name == "resend":
        first = [
            Request(tuple((672, 672, base + 2 * r + i) for i in range(2)))
            for r in range(max(2, n * 3 // 4))
        ]
        fillers = [
            Request(((896, 896, base + 500_000 + r),), "describe the images")
            for r in range(max(2, n // 2))
        ]
        later = [Request(req.images, "compare the images turn") for req in first]
        return [first + fillers, later]
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def _image(width: int, height: int, content: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(content)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


# ---------------------------------------------------------------------------
# Child: one engine, every workload
# ---------------------------------------------------------------------------


def _count_encoder_calls() -> dict[str, int]:
    """Count ``embed_multimodal`` calls of every vLLM model class (in-process engine core)."""
    from vllm.model_executor.models import qwen2_5_vl

    counter = {"calls": 0}
    cls = qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
    original = cls.embed_multimodal

    def counted(self, *args, **kwargs):
        counter["calls"] += 1
        return original(self, *args, **kwargs)

    cls.embed_multimodal = counted
    return counter


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def child(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    from vllm import LLM, SamplingParams

    from vitbatch.bench.qwen_vl_model import prompt

    calls = _count_encoder_calls()
    kwargs: dict[str, Any] = {}
    if config["vitbatch"]:
        kwargs["additional_config"] = {"vitbatch": config["options"]}
    if config["graphs"]:
        kwargs["compilation_config"] = {
            "cudagraph_mm_encoder": True,
            "encoder_cudagraph_token_budgets": config["graph_budgets"],
            "cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64],
        }
    else:
        kwargs["enforce_eager"] = True
    if config["dummy"]:
        kwargs["load_format"] = "dummy"
    started = time.perf_counter()
    llm = LLM(
        model=config["model"],
        dtype=config["dtype"],
        seed=0,
        max_model_len=config["max_model_len"],
        max_num_seqs=config["max_num_seqs"],
        max_num_batched_tokens=config["max_num_batched_tokens"],
        limit_mm_per_prompt={"image": 8, "video": 0},
        enable_prefix_caching=False,
        disable_log_stats=False,
        gpu_memory_utilization=config["gpu_memory_utilization"],
        **kwargs,
    )
    startup = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {"startup_seconds": startup, "workloads": {}}

    def phases_for(name: str, seed: int) -> list[list[dict]]:
        return [
            [
                {
                    "prompt": prompt(len(r.images), r.words),
                    "multi_modal_data": {"image": [_image(*image) for image in r.images]},
                }
                for r in phase
            ]
            for phase in workload(name, seed, config["scale"])
        ]

    def stats() -> dict[str, Any]:
        if not config["vitbatch"]:
            return {}
        from vitbatch.adapters.vllm import stats as vitbatch_stats

        return vitbatch_stats()

    profiler = None
    if config.get("profile"):  # the timed passes only (engine core runs in this process)
        import cProfile

        profiler = cProfile.Profile()
    prefill = SamplingParams(temperature=0.0, max_tokens=1)
    for name in config["workloads"]:
        for phase in phases_for(name, 1):  # warm-up
            llm.generate(phase, prefill, use_tqdm=False)
        passes = []
        for p in range(config["passes"]):
            *untimed, prompts = phases_for(name, 2 + p)
            for phase in untimed:
                llm.generate(phase, prefill, use_tqdm=False)
            before_calls, before = calls["calls"], stats()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_memory = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            outputs = llm.generate(prompts, prefill, use_tqdm=False)
            if profiler is not None:
                profiler.disable()
            seconds = time.perf_counter() - t0
            ttft = [
                out.metrics.first_token_latency
                for out in outputs
                if getattr(out, "metrics", None) is not None
                and getattr(out.metrics, "first_token_latency", 0)
            ]
            after = stats()
            passes.append(
                {
                    "seconds": seconds,
                    "requests": len(prompts),
                    "images": sum(len(p["multi_modal_data"]["image"]) for p in prompts),
                    "ttft": ttft,
                    "encoder_calls": calls["calls"] - before_calls,
                    "peak_extra_bytes": (torch.cuda.max_memory_allocated() - base_memory)
                    if cuda
                    else None,
                    "host_restores": (
                        after["scheduler"]["host_restores"] - before["scheduler"]["host_restores"]
                        if after
                        else 0
                    ),
                }
            )
        greedy = SamplingParams(temperature=0.0, max_tokens=8)
        token_ids = [
            list(out.outputs[0].token_ids)
            for phase in phases_for(name, 2 + config["passes"])
            for out in llm.generate(phase, greedy, use_tqdm=False)
        ]
        results["workloads"][name] = {"passes": passes, "token_ids": token_ids}
    results["vitbatch_stats"] = stats()
    if profiler is not None:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        results["profile_tottime"] = text.getvalue()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(50)
        results["profile_cumulative"] = text.getvalue()
    return results


# ---------------------------------------------------------------------------
# Parent: configurations, table, JSON
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model dir or id (default: 7B-shaped, dummy)")
    parser.add_argument("--shape", default="7b", choices=("7b", "tiny"), help="generated model")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument(
        "--encoder-graphs",
        nargs="+",
        default=["off"],
        choices=("off", "on"),
        help="vLLM's encoder CUDA graphs (V1 runner in vLLM 0.26)",
    )
    parser.add_argument("--modes", nargs="+", default=["native", "vitbatch"], choices=MODES)
    parser.add_argument("--passes", type=int, default=2, help="timed passes per workload")
    parser.add_argument("--scale", type=float, default=1.0, help="requests x this")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument(
        "--max-patches",
        type=int,
        nargs="+",
        default=[0],
        help="vitbatch's max_batch_patches; several values: one vitbatch run each (0: no limit)",
    )
    parser.add_argument(
        "--host-cache-gb", type=float, default=1.0, help="vitbatch's host_cache_bytes, in GiB"
    )
    parser.add_argument(
        "--graph-budgets",
        type=int,
        nargs="+",
        default=[2048, 4096, 8192],
        help="encoder_cudagraph_token_budgets when --encoder-graphs on",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the timed passes of each configuration (top functions go into the JSON)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")


def _run_child(config: dict[str, Any], runner: str, timeout: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_USE_V2_MODEL_RUNNER": "1" if runner == "v2" else "0",
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "config.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(config))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "vitbatch.bench.vllm_engine", str(spec), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise RuntimeError(
                f"configuration {config['label']} failed ({proc.returncode}):\n{tail}"
            )
        result = json.loads(out.read_text())
        result["wall_seconds"] = time.perf_counter() - started
        result["log_lines"] = [
            line for line in (proc.stdout + proc.stderr).splitlines() if "vitbatch" in line
        ][:20]
        return result


def _summary(passes: list[dict]) -> dict[str, Any]:
    best = min(passes, key=lambda p: p["seconds"])  # steady state: the fastest timed pass
    ttft = [t for p in passes for t in p["ttft"]]
    return {
        "requests_per_s": best["requests"] / best["seconds"],
        "images_per_s": best["images"] / best["seconds"],
        "ttft_p50_ms": None if not ttft else 1000 * statistics.median(ttft),
        "ttft_p99_ms": None if not ttft else 1000 * _percentile(ttft, 0.99),
        "encoder_calls": best["encoder_calls"],
        "peak_extra_gib": None
        if best["peak_extra_bytes"] is None
        else best["peak_extra_bytes"] / 2**30,
        "host_restores": best["host_restores"],
    }


def _variants(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(label, max_batch_patches) of each configuration per runner; native has no options."""
    variants: list[tuple[str, int | None]] = []
    if "native" in args.modes:
        variants.append(("native", None))
    if "vitbatch" in args.modes:
        for patches in args.max_patches:
            label = "vitbatch" if len(args.max_patches) == 1 else f"vitbatch p={patches or 'inf'}"
            variants.append((label, patches or None))
    return variants


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model, dummy = args.model, False
        if model is None:
            from vitbatch.bench.qwen_vl_model import build_model_dir

            model, dummy = (
                str(build_model_dir(Path(tmp) / f"qwen2.5-vl-{args.shape}", args.shape)),
                True,
            )
        results = {}
        for runner in args.runners:
            for graphs in args.encoder_graphs:
                for mode, patches in _variants(args):
                    label = f"{runner}/graphs-{graphs}/{mode}"
                    config = {
                        "label": label,
                        "model": model,
                        "dummy": dummy,
                        "dtype": args.dtype,
                        "vitbatch": mode != "native",
                        "graphs": graphs == "on",
                        "graph_budgets": args.graph_budgets,
                        "options": {
                            "max_batch_patches": patches,
                            "host_cache_bytes": int(args.host_cache_gb * 2**30),
                        },
                        "workloads": args.workloads,
                        "passes": args.passes,
                        "scale": args.scale,
                        "max_num_batched_tokens": args.max_num_batched_tokens,
                        "max_num_seqs": args.max_num_seqs,
                        "max_model_len": args.max_model_len,
                        "gpu_memory_utilization": args.gpu_memory_utilization,
                        "profile": args.profile,
                    }
                    print(f"running {label} ...", file=sys.stderr, flush=True)
                    results[label] = _run_child(config, runner, args.timeout)
    rows = compare(results, args)
    print(format_rows(rows))
    if args.json:
        import torch

        from vitbatch.bench.main import DTYPES, run_environment

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = args.model or f"Qwen2.5-VL-{args.shape}-shaped, dummy weights"
        header = {**run_environment(model, device, DTYPES[args.dtype]), "argv": sys.argv}
        try:
            import vllm

            header["vllm"] = vllm.__version__
        except ImportError:
            pass
        args.json.write_text(json.dumps({"run": header, "rows": rows, "raw": results}, indent=1))
    return 0 if all(row.get("mismatches", 0) == 0 for row in rows) else 1


def compare(results: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    """One row per (runner, graphs, workload, mode): its summary, and against native its
    speedup and how many greedy outputs are identical."""
    rows = []
    for runner in args.runners:
        for graphs in args.encoder_graphs:
            native = results.get(f"{runner}/graphs-{graphs}/native")
            for name in args.workloads:
                for mode, _ in _variants(args):
                    result = results[f"{runner}/graphs-{graphs}/{mode}"]
                    row = {"runner": runner, "graphs": graphs, "workload": name, "mode": mode}
                    row.update(_summary(result["workloads"][name]["passes"]))
                    if native is not None and mode != "native":
                        a = native["workloads"][name]["token_ids"]
                        b = result["workloads"][name]["token_ids"]
                        row["prompts_compared"] = len(a)
                        row["mismatches"] = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
                        row["speedup"] = (
                            row["requests_per_s"]
                            / _summary(native["workloads"][name]["passes"])["requests_per_s"]
                        )
                    rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| runner | enc. graphs | workload | mode | req/s | img/s | TTFT p50 ms | TTFT p99 ms "
        "| encoder calls | peak extra GiB | host restores | vs native | equal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ratio = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        equal = (
            f"{row['prompts_compared'] - row['mismatches']}/{row['prompts_compared']}"
            if "mismatches" in row
            else ""
        )
        lines.append(
            f"| {row['runner'].upper()} | {row['graphs']} | {row['workload']} | {row['mode']} "
            f"| {row['requests_per_s']:.2f} | {row['images_per_s']:.1f} "
            f"| {_fmt(row['ttft_p50_ms'], '.0f')} | {_fmt(row['ttft_p99_ms'], '.0f')} "
            f"| {row['encoder_calls']} | {_fmt(row['peak_extra_gib'], '.2f')} "
            f"| {row['host_restores']} | {ratio} | {equal} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # the child process
    spec, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.write_text(json.dumps(child(json.loads(spec.read_text()))))
