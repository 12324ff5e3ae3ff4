"""Process context: the attention-TP group, the metric labels, loading the step's modules."""

from __future__ import annotations

from typing import Any

from vitbatch.adapters.sglang.surface.registry import ARGS, _module, needs
from vitbatch.adapters.sglang.surface.releases import _mm


@needs("sglang.srt.distributed.parallel_state:get_attn_tp_group", part="optional")
def attn_tp_cpu_group() -> Any:
    """The CPU group of the attention-TP ranks, or ``None`` (size 1, or no distributed state)."""
    try:
        group = _module("sglang.srt.distributed.parallel_state").get_attn_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return None
    if group is None or group.world_size <= 1:
        return None
    return group.cpu_group


@needs(
    f"{ARGS}:get_global_server_args",
    "sglang.srt.distributed:get_tensor_model_parallel_rank",
    part="optional",
)
def metric_labels() -> dict[str, str]:
    """Prometheus labels of this scheduler process, as far as SGLang tells them."""
    labels: dict[str, str] = {}
    try:
        args = _module(ARGS).get_global_server_args()
        labels["model_name"] = str(args.served_model_name or args.model_path)
    except Exception:
        pass
    try:
        labels["tp_rank"] = str(_module("sglang.srt.distributed").get_tensor_model_parallel_rank())
    except Exception:
        pass
    return labels


def load_multimodal_modules() -> None:
    """Import SGLang's multimodal step modules (fails here when SGLang is missing)."""
    _mm()
