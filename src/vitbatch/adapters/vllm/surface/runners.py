"""What both model runners (V1 and V2) share: device, model width and dtype, the
worker's place in tensor and pipeline parallelism, metric labels, and the runner
branches vitbatch does not reproduce."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vitbatch.adapters.vllm.surface.completeness import BOTH, V1, V2, uses


@uses("runner_v1", f"{V1}().device", f"{V1}().model_config")
@uses("runner_v2", f"{V2}().device", f"{V2}().model_config")
def device(runner: Any) -> Any:
    return runner.device


def hidden_size(runner: Any) -> int | None:
    """The LLM's hidden size: the width of every multimodal embedding vLLM merges."""
    try:
        width = runner.model_config.get_hidden_size()
    except Exception:  # noqa: BLE001 - unknown: the core learns it, carefully
        return None
    return width if isinstance(width, int) and width > 0 else None


def embedding_dtype(runner: Any) -> torch.dtype | None:
    """The dtype vLLM's own encoder outputs have: the model's."""
    dtype = getattr(getattr(runner, "model_config", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


@uses(BOTH, "vllm.distributed:get_tp_group?", "vllm.distributed:get_tensor_model_parallel_rank?")
def agree_group(runner: Any) -> Any:
    """The CPU group of the TP ranks that share a sharded vision tower, or ``None``
    (TP 1, or ``mm_encoder_tp_mode="data"``: each rank encodes its own share)."""
    try:
        if runner.model_config.multimodal_config.mm_encoder_tp_mode == "data":
            return None
    except Exception:  # noqa: BLE001 - no such option: the tower follows TP
        pass
    try:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return None
    return group.cpu_group if group.world_size > 1 else None


@uses(BOTH, "vllm.config:ParallelConfig().data_parallel_rank?")
def metric_labels(runner: Any) -> dict[str, str]:
    """Prometheus labels like vLLM's own (``model_name``; ``engine``: the engine index,
    its data-parallel rank) plus the worker's TP rank."""
    labels: dict[str, str] = {"engine": "0"}
    try:
        labels["engine"] = str(int(runner.vllm_config.parallel_config.data_parallel_rank))
    except Exception:  # noqa: BLE001 - no data parallelism known: engine 0
        pass
    try:
        labels["model_name"] = str(runner.model_config.served_model_name)
    except Exception:  # noqa: BLE001
        pass
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        labels["tp_rank"] = str(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001
        pass
    return labels


@uses("runner_v1", *(f"{V1}().{n}?" for n in ("lora_config", "lora_manager")))
@uses("runner_v1", f"{V1}().is_multimodal_pruning_enabled?", f"{V1}().observability_config?")
@uses("runner_v1", f"{V1}().requires_sequential_video_encoding?")
def unreproduced_branch(runner: Any, modalities: Iterable[str]) -> str | None:
    """A runner branch vitbatch does not reproduce (LoRA tower, EVS video, timing)."""
    lora_manager = getattr(runner, "lora_manager", None)
    if getattr(runner, "lora_config", None) and (
        lora_manager is None
        or not hasattr(lora_manager, "supports_tower_connector_lora")
        or lora_manager.supports_tower_connector_lora()
    ):
        return "LoRA on the vision tower/connector"
    if "video" in modalities and (
        getattr(runner, "is_multimodal_pruning_enabled", False)
        or getattr(runner, "requires_sequential_video_encoding", False)
    ):
        return "EVS / sequential video encoding"
    observability = getattr(runner, "observability_config", None)
    if observability is not None and getattr(observability, "enable_mm_processor_stats", False):
        return "per-item encoder timing (enable_mm_processor_stats)"
    return None


@uses(BOTH, "vllm.distributed:get_tp_group?")
def tp_world_size() -> int:
    """Tensor-parallel ranks of this worker's group (1 without distributed state)."""
    try:
        from vllm.distributed import get_tp_group

        return int(get_tp_group().world_size)
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return 1


@uses(BOTH, "vllm.distributed:get_pp_group?")
def first_pp_rank() -> bool:
    """Whether this worker runs the encoder (the first pipeline stage, or no pipeline)."""
    try:
        from vllm.distributed import get_pp_group

        return bool(get_pp_group().is_first_rank)
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return True
