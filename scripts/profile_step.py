"""Profile one vitbatch step of a GPU workload: where the time goes, and host syncs.

    PYTHONPATH=src python3 scripts/profile_step.py --workload small --max-tokens 16384

Prints the top CUDA kernels by time, the host-side share (planning, assembly,
Python), and every device→host synchronisation the step made.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vitbatch.bench.encoder_plugin import EmbeddedEncoder
from vitbatch.bench.workload import WORKLOADS, chunked_steps, draw_requests
from vitbatch.core import Budget, EmbeddingCache, VitBatcher
from vitbatch.encoders.qwen_vision import build_encoder
from vitbatch.plugin import make_plugin_manager


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="small")
    parser.add_argument("--encoder", default="qwen2.5-vl-7b")
    parser.add_argument("--max-tokens", type=int, default=Budget().max_tokens)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_encoder(args.encoder, device, torch.bfloat16)
    c = model.config
    requests = draw_requests(
        WORKLOADS[args.workload],
        patch_size=c.patch_size,
        merge_size=c.spatial_merge_size,
        patch_dim=c.patch_dim,
    )
    (step,) = chunked_steps(requests, 0)
    pins: dict[int, torch.Tensor] = {}

    def batcher() -> VitBatcher:
        encoder = EmbeddedEncoder(model, device, torch.bfloat16, pinned=True, pinned_cache=pins)
        return VitBatcher(
            Budget(max_tokens=args.max_tokens),
            EmbeddingCache(8 << 30),
            make_plugin_manager(False, [encoder]),
        )

    batcher().run_step(step)  # warm-up, pins features
    torch.cuda.synchronize()
    b = batcher()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        result = b.run_step(step)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    stats = result.stats
    print(
        f"step wall {wall * 1e3:.1f} ms; encoder calls {stats.encoder_calls}; "
        f"plan {stats.plan_seconds * 1e3:.2f} ms, assemble {stats.assemble_seconds * 1e3:.2f} ms "
        f"({(stats.plan_seconds + stats.assemble_seconds) / wall * 100:.2f}% of the step)"
    )
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    )
    syncs = [
        e
        for e in prof.events()
        if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
        or (e.name == "cudaMemcpyAsync" and "DtoH" in str(getattr(e, "input_shapes", "")))
    ]
    print(
        f"host synchronisations inside the step: {len(syncs)} -> {sorted({e.name for e in syncs})}"
    )


if __name__ == "__main__":
    main()
