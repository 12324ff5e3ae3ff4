"""``vitbatch bench-agree``: what tensor-parallel agreement costs per step (CPU, gloo).

At world size > 1 the step engine makes two small MAX all-reduces per step
(:mod:`vitbatch.core.agreement`): a vector of 3 + distinct-items integers
before the encoder calls and one integer after. This spawns ``--ranks`` local
gloo processes and times exactly those two calls, as a scheduler step makes
them. At world size 1 nothing is agreed, so the cost there is zero by
construction (``StepStats.agreements`` counts them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes")
    parser.add_argument("--items", type=int, default=64, help="distinct items per step")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per world size")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")


def _rank(rank: int, world: int, init: str, items: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from vitbatch.core.agreement import group_agree, start_flags
    from vitbatch.core.items import ItemKey

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    agree = group_agree(dist.new_group(backend="gloo"))
    assert agree is not None
    keys = [ItemKey(f"image-{i}", 256) for i in range(items)]
    usable = set(keys[: items // 2])
    times = []
    for step in range(steps + 100):
        dist.barrier()
        started = time.perf_counter()
        agree(start_flags(keys, usable, None))
        agree([0])
        if step >= 100:  # warm-up
            times.append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure(world: int, items: int, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/times.json"
        mp.start_processes(
            _rank,
            args=(world, f"{tmp}/init", items, steps, out),
            nprocs=world,
            start_method="spawn",
        )
        times = json.loads(Path(out).read_text())
    return {
        "ranks": world,
        "items": items,
        "all_reduces_per_step": 2,
        "median_us_per_step": statistics.median(times) * 1e6,
        "p99_us_per_step": sorted(times)[int(0.99 * (len(times) - 1))] * 1e6,
    }


def run(args: argparse.Namespace) -> int:
    rows = [measure(world, args.items, args.steps) for world in args.ranks]
    print(f"tensor-parallel agreement cost, CPU gloo, {args.items} distinct items per step")
    print("| ranks | all-reduces / step | median µs / step | p99 µs / step |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['ranks']} | {row['all_reduces_per_step']} | "
            f"{row['median_us_per_step']:.0f} | {row['p99_us_per_step']:.0f} |"
        )
    print("| 1 | 0 | 0 | 0 |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0
