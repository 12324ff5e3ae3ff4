"""Model Runner V2 (the GPU default): its ``EncoderRunner`` and ``EncoderCache``
(private names used here, and why: the package docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vitbatch.adapters.vllm.surface.completeness import ENCODER_RUNNER, V2, V2_CACHE, uses
from vitbatch.adapters.vllm.surface.runner_v1 import eager_encode


@uses("runner_v2", f"{V2}().encoder_cache", f"{V2}().model_state")
def v2_encoder_runner(model_runner: Any) -> Any:
    """The model runner's ``EncoderRunner``, or ``None`` (no multimodal encoder)."""
    if model_runner.encoder_cache is None:
        return None
    return getattr(getattr(model_runner, "model_state", None), "encoder_runner", None)


@uses("runner_v2", f"{V2_CACHE}().encoder_outputs", f"{ENCODER_RUNNER}().encoder_cache")
def v2_outputs(runner: Any) -> dict[str, Any]:
    """Encoder outputs by mm hash (``runner``: the model runner or its encoder runner)."""
    return runner.encoder_cache.encoder_outputs


@uses("runner_v2", f"{ENCODER_RUNNER}().model", f"{ENCODER_RUNNER}().device")
def v2_encode_eagerly(encoder_runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """The encoder runner's model on ``mm_kwargs``, eagerly (no captured graphs)."""
    return eager_encode(encoder_runner.model, encoder_runner.device, mm_kwargs)


@uses("runner_v2", f"{V2_CACHE}().mm_features")
def v2_features(encoder_runner: Any) -> Mapping[str, list[Any]]:
    """Multimodal features by request id."""
    return encoder_runner.encoder_cache.mm_features


@uses("runner_v2", f"{ENCODER_RUNNER}().cudagraph_manager?")
def v2_graphs_captured(encoder_runner: Any) -> bool:
    manager = getattr(encoder_runner, "cudagraph_manager", None)
    if manager is None:
        return False
    is_captured = getattr(manager, "is_captured", None)
    return bool(is_captured()) if callable(is_captured) else True
