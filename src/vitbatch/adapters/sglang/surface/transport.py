"""How item features travel, where a supported release offers it: borrowing CUDA-IPC
features (0.5.20+) and SGLang's asynchronous post-forward copy-back (0.5.21+). Each probe
copes without: nothing to borrow, nothing to wait for."""

from __future__ import annotations

from typing import Any

from vitbatch.adapters.sglang.surface.registry import STEP, _module, needs
from vitbatch.adapters.sglang.surface.releases import _mm


@needs("sglang.srt.multimodal.transport.cuda_ipc:BORROW_CUDA_IPC_FEATURE_KEY", part="optional")
def borrow_cuda_ipc_key() -> str | None:
    """The ``model_specific_data`` key that lets a CUDA-IPC feature be borrowed rather than
    rebuilt (SGLang 0.5.20+); None where SGLang has no such transport (nothing to borrow)."""
    try:
        module = _module("sglang.srt.multimodal.transport.cuda_ipc")
    except ImportError:
        return None
    return getattr(module, "BORROW_CUDA_IPC_FEATURE_KEY", None)


@needs(f"{STEP}:host_offload_event", part="optional")
def host_offload_event() -> Any:
    """SGLang's pending post-forward feature copy-back (``mm_schedule.host_offload_event``,
    0.5.21+, never in 0.5.17's ``mm_utils``; reassigned by SGLang every step, so read it each
    time); None where SGLang has no asynchronous copy-back."""
    return getattr(_mm(), "host_offload_event", None)


@needs(f"{STEP}:host_offload_event", part="bench")
def set_host_offload_event(event: Any) -> None:
    """Make the step module's ``host_offload_event`` name ``event`` (the bench's copy-back)."""
    _mm().host_offload_event = event
