"""The declared vLLM names and the start-up check over them.

Every module of this package declares the names its accessors (or wrap points)
rely on with :func:`uses` (syntax: :mod:`..probing`), into the one
:data:`REGISTRY`; :func:`check` probes that list once per process, part by part
(:data:`PARTS`), so a missing name switches vitbatch off with one log line
instead of failing mid-step. ``bench`` (``vitbatch bench-vllm`` only) is
declared but not probed.
"""

from __future__ import annotations

import functools

from vitbatch.adapters.vllm import probing
from vitbatch.adapters.vllm.probing import SurfaceReport

PARTS = ("config", "scheduler", "runner_v1", "runner_v2")
REGISTRY = probing.Registry()
uses = REGISTRY.uses

# the vLLM classes most names live on (``module:Class``)
SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
ECM = "vllm.v1.core.encoder_cache_manager:EncoderCacheManager"
V1 = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
V2 = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
ENCODER_RUNNER = "vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner"
V2_CACHE = "vllm.v1.worker.gpu.mm.encoder_cache:EncoderCache"
BOTH = ("runner_v1", "runner_v2")


def names(part: str | None = None) -> tuple[probing.EngineName, ...]:
    """Every declared vLLM name (of one part)."""
    return tuple(n for n in REGISTRY.names if part is None or n.part == part)


@functools.lru_cache(maxsize=1)
def check() -> SurfaceReport:
    """Probe the installed vLLM once per process."""
    return probing.probe(version() or "(not importable)", REGISTRY, PARTS)


def version() -> str | None:
    try:
        import vllm
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(vllm, "__version__", "?"))
