"""Runs in processes started the way SGLang starts its scheduler (spawn + load_plugins)."""

from __future__ import annotations

import json
import sys


def probe(queue) -> None:
    """What a scheduler process sees after loading plugins itself."""
    from sglang.srt.managers import mm_schedule
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from vitbatch.adapters import sglang as adapter

    state = adapter.get_state()
    queue.put(
        {
            "patched": hasattr(mm_schedule._get_chunked_prefill_embedding, "__wrapped__"),
            "enabled": state.settings.enabled,
            "max_patches": state.settings.max_patches,
            "host_cache_mb": state.settings.host_cache_mb,
            "budget_patches": state.batcher.budget.max_cost,
            "prefetch": [
                state.prefetcher is not None,
                state.settings.prefetch_limits().max_pool_bytes,
            ],
        }
    )


def launcher(argv: list[str]) -> dict:
    """What ``python -m sglang.launch_server`` does before it starts the scheduler."""
    import multiprocessing

    from sglang.srt.managers import mm_schedule
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.server_args import prepare_server_args

    prepare_server_args(argv)
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=probe, args=(queue,))
    process.start()
    child = queue.get(timeout=300)
    process.join(timeout=60)
    return {
        "launcher_patched": hasattr(mm_schedule._get_chunked_prefill_embedding, "__wrapped__"),
        "scheduler": child,
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(launcher(sys.argv[1:])))
