"""What ``vitbatch bench-vllm`` uses of vLLM (declared, not probed at start-up)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitbatch.adapters.vllm import patching
from vitbatch.adapters.vllm.surface.completeness import uses


@uses("bench", "vllm:LLM", "vllm:SamplingParams")
def offline_api() -> tuple[type, type]:
    """``(LLM, SamplingParams)``."""
    from vllm import LLM, SamplingParams

    return LLM, SamplingParams


@uses("bench", "vllm.config:ECTransferConfig")
def ec_transfer_config_class() -> type:
    """vLLM's ``ECTransferConfig`` (its own encoder-cache connectors' configuration)."""
    from vllm.config import ECTransferConfig

    return ECTransferConfig


def v2_runner_takes_ec_connector() -> bool:
    """Whether the installed vLLM's Model Runner V2 has EC-connector support (its
    ``v1/worker/gpu/ec_connector.py``; without it vLLM refuses EC transfer on V2).
    Probed from the installed files, not from a version number."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm.v1.worker.gpu.ec_connector") is not None
    except ModuleNotFoundError:  # no vLLM, or no V2 runner package at all
        return False


_QWEN = "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration"


@uses("bench", f"{_QWEN}.embed_multimodal")
def count_qwen2_5_vl_encoder_calls() -> dict[str, int]:
    """Count Qwen2.5-VL's ``embed_multimodal`` calls in this process: ``{"calls": n}``."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as cls

    counter = {"calls": 0}

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def embed_multimodal(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter["calls"] += 1
            return original(self, *args, **kwargs)

        return embed_multimodal

    patching.unwrap(cls, "embed_multimodal")  # one counter at a time
    patching.wrap(cls, "embed_multimodal", counted)
    return counter
