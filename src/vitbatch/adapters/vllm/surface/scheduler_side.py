"""The scheduler side: vLLM's encoder-cache manager (the base of vitbatch's), the
scheduler's queues and config, its requests' inputs, and what its output carries
to the workers (private fields read here, and why: the package docstring)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from vitbatch.adapters.vllm.surface.completeness import ECM, SCHEDULER, uses


@uses("scheduler", ECM, *(f"{ECM}.{m}" for m in ("can_allocate", "allocate", "reset")))
@uses("scheduler", f"{ECM}.check_and_update_cache", f"{ECM}.get_freed_mm_hashes")
def manager_base() -> type:
    """vLLM's ``EncoderCacheManager``, which vitbatch's manager subclasses."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

    return EncoderCacheManager


@uses("scheduler", "vllm.v1.core.encoder_cache_manager:EncoderDecoderCacheManager")
def encoder_decoder_manager(cache_size: int) -> Any:
    from vllm.v1.core.encoder_cache_manager import EncoderDecoderCacheManager

    return EncoderDecoderCacheManager(cache_size=cache_size)


@uses("scheduler", f"{ECM}().cache_size")
def cache_size(manager: Any) -> int:
    return manager.cache_size


@uses("scheduler", f"{ECM}().num_free_slots", f"{ECM}().freeable")
def rows_to_evict_from(manager: Any, wanted: int) -> dict[str, int]:
    """What vLLM would evict from (mm hash -> rows, a copy) to fit ``wanted`` rows; ``{}``
    when they fit already."""
    return dict(manager.freeable) if wanted > manager.num_free_slots else {}


@uses("scheduler", f"{ECM}().freed")
def evicted(manager: Any) -> list[str]:
    """Hashes evicted since vLLM's last ``get_freed_mm_hashes`` (oldest first; read only)."""
    return manager.freed


@uses("scheduler", f"{ECM}().cached")
def is_cached(manager: Any, mm_hash: str) -> bool:
    return mm_hash in manager.cached


@uses("scheduler", "vllm.v1.request:Request().mm_features")
def request_input(request: Any, input_id: int) -> tuple[str, int]:
    """``(mm hash, embedding rows)`` of a request's encoder input."""
    feature = request.mm_features[input_id]
    return feature.identifier, feature.mm_position.get_num_embeds()


@uses("scheduler", f"{SCHEDULER}().encoder_cache_manager", f"{SCHEDULER}().vllm_config")
def scheduler_manager(scheduler: Any) -> Any:
    return getattr(scheduler, "encoder_cache_manager", None)


def set_scheduler_manager(scheduler: Any, manager: Any) -> None:
    scheduler.encoder_cache_manager = manager


def scheduler_config(scheduler: Any) -> Any:
    return getattr(scheduler, "vllm_config", None)


def bytes_per_embed(vllm_config: Any) -> int:
    """Bytes of one multimodal embedding row (the LLM's hidden size in its dtype)."""
    model_config = vllm_config.model_config
    element = torch.tensor([], dtype=model_config.dtype).element_size()
    return model_config.get_hidden_size() * element


@uses("scheduler", "vllm.config:VllmConfig().ec_transfer_config?")
def ec_connector_name(vllm_config: Any) -> str | None:
    """The EC connector configured by ``--ec-transfer-config`` (``ECCPUConnector``...),
    or ``None`` (none configured, or a vLLM without EC transfer)."""
    ec_config = getattr(vllm_config, "ec_transfer_config", None)
    name = getattr(ec_config, "ec_connector", None) if ec_config is not None else None
    return str(name) if name else None


@uses("scheduler", "vllm.config:VllmConfig().lora_config")
def lora_configured(vllm_config: Any) -> bool:
    """Whether LoRA is on (a tower LoRA needs per-request mappings a prefetch lacks)."""
    return getattr(vllm_config, "lora_config", None) is not None


_QUEUES = ("kv_holding_waiting", "skipped_waiting", "waiting")


@uses("scheduler", f"{SCHEDULER}().waiting", f"{SCHEDULER}().skipped_waiting?")
@uses("scheduler", f"{SCHEDULER}().kv_holding_waiting?")
def waiting_requests(scheduler: Any) -> Iterator[Any]:
    """The scheduler's waiting requests, lazily, in the order it admits them.

    0.32 drains ``kv_holding_waiting`` before ``waiting``; 0.26 keeps requests it
    skipped in ``skipped_waiting`` and (FCFS) takes them first. Each queue
    iterates in its policy's order (a priority queue: by priority, then arrival).
    """
    for name in _QUEUES:
        queue = getattr(scheduler, name, None)
        if queue:
            yield from queue


@uses("scheduler", "vllm.v1.request:Request().request_id", "vllm.v1.request:Request.is_finished")
def request_id(request: Any) -> str:
    return request.request_id


def request_finished(request: Any) -> bool:
    return bool(request.is_finished())


def prefetch_inputs(request: Any) -> Iterator[tuple[str, str, int, Any]]:
    """``(mm hash, modality, embedding rows, kwargs item)`` of each input whose data the
    scheduler holds: with the ``shm`` processor cache the scheduler holds an address
    into shared memory (only the workers' receiver resolves it), and a payload can
    be stripped (``None``); those are left out."""
    for feature in request.mm_features or ():
        data = feature.data
        if data is None or "address" in data:
            continue
        yield feature.identifier, feature.modality, feature.mm_position.get_num_embeds(), data


def is_encoder_decoder(config_owner: Any) -> bool:
    """For a ``VllmConfig`` or a model runner (both carry ``model_config``)."""
    return bool(config_owner.model_config.is_encoder_decoder)


@uses("scheduler", "vllm.v1.core.sched.output:SchedulerOutput().ec_manager_metadata?")
def carried_metadata(scheduler_output: Any) -> Any:
    """What vLLM carried for the manager (0.27+), or ``None``."""
    return getattr(scheduler_output, "ec_manager_metadata", None)


@uses("scheduler", "vllm.v1.core.sched.output:SchedulerOutput().free_encoder_mm_hashes")
def freed_hashes(scheduler_output: Any) -> list[str]:
    return scheduler_output.free_encoder_mm_hashes


@uses("runner_v1", "vllm.v1.core.sched.output:SchedulerOutput().scheduled_encoder_inputs")
def scheduled_encoder_inputs(scheduler_output: Any) -> Mapping[str, list[int]]:
    return scheduler_output.scheduled_encoder_inputs
