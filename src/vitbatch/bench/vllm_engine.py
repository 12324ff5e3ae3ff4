"""``vitbatch bench-vllm``: an A/B of vLLM end to end with and without vitbatch that shows
its spread.

Engines compared, per model runner (and encoder-graph setting):

* ``native`` - vLLM as installed;
* ``vitbatch`` - the same with ``additional_config={"vitbatch": {...}}`` (one per
  ``--max-patches`` value);
* ``eccpu`` - vLLM with its own CPU encoder cache, ``ECCPUConnector``
  (``ec_role: ec_both``), on the runners that take an EC connector: probed from
  the installed vLLM (its V2 runner gained one after 0.26; on V1 it always runs).

They run in **alternation**, each configuration in a fresh process
(:mod:`vitbatch.bench.vllm_child`), for ``--rounds`` rounds; the order rotates
each round so no engine always runs first or last. Every figure is the median
and min–max over rounds (each round's figure: its fastest timed pass); a ratio
to native is called "faster" / "slower" only when the two engines' ranges of
requests/s do not overlap, else "same". The JSON keeps every round (written
after each, so a run stopped at a time limit keeps what it measured), and greedy
token ids of every configuration are compared with native's of the same round.

Prefix caching is on, as in vLLM by default, in every configuration;
``--no-prefix-caching`` runs the older comparison with it off. Workloads:
:mod:`vitbatch.bench.vllm_workloads`. With ``--model`` the bench runs a real
checkpoint; by default it writes a Qwen2.5-VL-shaped directory without weights
(``--shape``) and runs it with ``load_format="dummy"``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vitbatch.bench.vllm_child import ENGINES, ChildConfig, v2_runner_takes_ec_connector
from vitbatch.bench.vllm_report import compare, format_rows, protocol_line, write_json
from vitbatch.bench.vllm_workloads import WORKLOADS

RUNNERS = ("v2", "v1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model dir or id (default: generated, dummy)")
    parser.add_argument("--shape", default="7b", choices=("7b", "tiny"), help="generated model")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(ENGINES),
        choices=ENGINES,
        help="engines to compare (eccpu: vLLM + ECCPUConnector, where the runner takes it)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds, a fresh process each"
    )
    parser.add_argument("--passes", type=int, default=1, help="timed passes per workload and round")
    parser.add_argument("--scale", type=float, default=1.0, help="requests x this")
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="the older comparison: vLLM's prefix caching off in every configuration",
    )
    parser.add_argument(
        "--encoder-graphs",
        nargs="+",
        default=["off"],
        choices=("off", "on"),
        help="vLLM's encoder CUDA graphs (V1 runner in vLLM 0.26)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: 16384, capped at the generated shape's positions; a --model's own",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="default 0.85 on CUDA; 0.25 without (vLLM's CPU backend reserves that share "
        "of host memory for its KV cache)",
    )
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
        "--host-admission",
        default="all",
        choices=("all", "repeated"),
        help="vitbatch's host_admission: which evicted entries go to the host tier",
    )
    parser.add_argument(
        "--ec-cpu-gb", type=float, default=1.0, help="ECCPUConnector's ec_cpu_bytes, in GiB"
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
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no further round once the last round's duration would overrun it "
        "(a device call's limit); the rounds done are reported",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")


def ec_transfer_config(gib: float) -> dict[str, Any]:
    """vLLM's ECCPUConnector in one process (both roles), ``gib`` of host memory."""
    return {
        "ec_connector": "ECCPUConnector",
        "ec_role": "ec_both",
        "ec_connector_extra_config": {"ec_cpu_bytes": int(gib * 2**30)},
    }


def configurations(args: argparse.Namespace, model: str, dummy: bool) -> list[list[ChildConfig]]:
    """The configurations, one group per (runner, graphs): the engines compared in it."""
    max_len = args.max_model_len
    if max_len is None and args.model is None:
        from vitbatch.bench.qwen_vl_model import SHAPES

        max_len = min(16384, SHAPES[args.shape]["text"]["max_position_embeddings"])
    groups = []
    for runner in args.runners:
        for graphs in args.encoder_graphs:
            base = ChildConfig(
                label="",
                engine="native",
                runner=runner,
                model=model,
                dummy=dummy,
                dtype=args.dtype,
                workloads=tuple(args.workloads),
                passes=args.passes,
                scale=args.scale,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs,
                max_model_len=max_len,
                gpu_memory_utilization=memory_share(args),
                prefix_caching=args.prefix_caching,
                graphs=graphs == "on",
                graph_budgets=tuple(args.graph_budgets),
                profile=args.profile,
            )
            group = []
            for mode, extra in variants(args, runner):
                group.append(replace(base, label=f"{runner}/graphs-{graphs}/{mode}", **extra))
            groups.append(group)
    return groups


def memory_share(args: argparse.Namespace) -> float:
    if args.gpu_memory_utilization is not None:
        return args.gpu_memory_utilization
    import torch

    return 0.85 if torch.cuda.is_available() else 0.25


def variants(args: argparse.Namespace, runner: str) -> list[tuple[str, dict[str, Any]]]:
    """(mode label, ChildConfig fields) of each engine compared on ``runner``."""
    out: list[tuple[str, dict[str, Any]]] = []
    if "native" in args.modes:
        out.append(("native", {"engine": "native"}))
    if "vitbatch" in args.modes:
        for patches in args.max_patches:
            label = "vitbatch" if len(args.max_patches) == 1 else f"vitbatch p={patches or 'inf'}"
            options = {
                "max_batch_patches": patches or None,
                "host_cache_bytes": int(args.host_cache_gb * 2**30),
            }
            if getattr(args, "host_admission", "all") != "all":
                options["host_admission"] = args.host_admission
            out.append((label, {"engine": "vitbatch", "options": options}))
    if "eccpu" in args.modes and (runner == "v1" or v2_runner_takes_ec_connector()):
        out.append(
            ("vllm+eccpu", {"engine": "eccpu", "ec_transfer": ec_transfer_config(args.ec_cpu_gb)})
        )
    return out


def run_child(config: ChildConfig, timeout: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_USE_V2_MODEL_RUNNER": "1" if config.runner == "v2" else "0",
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "config.json", Path(tmp) / "out.json"
        spec.write_text(config.to_json())
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "vitbatch.bench.vllm_child", str(spec), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-5000:]
            raise RuntimeError(f"configuration {config.label} failed ({proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
        result["wall_seconds"] = time.perf_counter() - started
        result["log_lines"] = [
            line for line in (proc.stdout + proc.stderr).splitlines() if "vitbatch" in line
        ][:40]
        return result


def round_order(groups: list[list[ChildConfig]], index: int) -> list[ChildConfig]:
    """Round ``index``'s order: each group's engines rotated by ``index``, so each engine
    runs first, in the middle and last in turn."""
    return [c for g in groups for c in g[index % len(g) :] + g[: index % len(g)]]


def runner_refuses(error: str) -> bool:
    """Whether a child failed because its model runner does not take the EC connector
    (vLLM 0.26's V2: "does not yet support: EC transfer"; 0.32's V1: "ECCPUConnector
    requires the V2 model runner"): the probe by trying, where no file says so."""
    lowered = error.lower()
    return "ec transfer" in lowered or (
        "ecconnector" in lowered.replace("cpu", "") and "model runner" in lowered
    )


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.passes < 1:
        raise SystemExit("--rounds and --passes must be at least 1")
    started = time.perf_counter()
    refused: set[str] = set()  # configurations whose runner does not take the EC connector
    with tempfile.TemporaryDirectory() as tmp:
        model, dummy = args.model, False
        if model is None:
            from vitbatch.bench.qwen_vl_model import build_model_dir

            model = str(build_model_dir(Path(tmp) / f"qwen2.5-vl-{args.shape}", args.shape))
            dummy = True
        groups = configurations(args, model, dummy)
        rounds: list[dict[str, Any]] = []
        for index in range(args.rounds):
            elapsed = time.perf_counter() - started
            if rounds and args.time_budget and elapsed * (index + 1) / index > args.time_budget:
                print(
                    f"--time-budget {args.time_budget:g} s: stopping after {index} round(s)",
                    file=sys.stderr,
                )
                break
            order = round_order(groups, index)
            done: dict[str, Any] = {}
            for config in order:
                if config.label in refused:
                    continue
                print(
                    f"round {index + 1}/{args.rounds}: {config.label} ...",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    done[config.label] = run_child(config, args.timeout)
                    print(
                        f"  {done[config.label]['wall_seconds']:.0f} s "
                        f"(engine start {done[config.label]['startup_seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    if config.engine == "eccpu" and runner_refuses(str(error)):
                        refused.add(config.label)
                        print(f"{config.label}: this runner takes no EC connector", file=sys.stderr)
                        continue
                    print(
                        str(error)[:200] + " ... " + str(error)[-3000:], file=sys.stderr, flush=True
                    )
                    done[config.label] = {"error": str(error)}
            ran = [c.label for c in order if c.label not in refused]
            rounds.append({"round": index + 1, "order": ran, "results": done})
            complete = index + 1 == args.rounds
            write_json(args, groups, rounds, refused, complete=complete, started=started)
    rows = compare(rounds, groups)
    print(format_rows(rows))
    print(protocol_line(args, groups, rounds, refused, started))
    failed = [label for r in rounds for label, out in r["results"].items() if "error" in out]
    return 0 if not failed and all(row.get("mismatches", 0) == 0 for row in rows) else 1
