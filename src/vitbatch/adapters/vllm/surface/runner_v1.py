"""Model runner V1 (``gpu_model_runner.py``: CPU, and GPU with
``VLLM_USE_V2_MODEL_RUNNER=0``), and the eager encode both runners' prefetches use
(private names used here, and why: the package docstring)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from vitbatch.adapters.vllm.surface.completeness import BOTH, V1, uses
from vitbatch.adapters.vllm.surface.scheduler_side import carried_metadata, freed_hashes


@uses("runner_v1", f"{V1}().encoder_cache")
def v1_outputs(runner: Any) -> dict[str, Any]:
    """The runner's encoder outputs by mm hash (the device cache)."""
    return runner.encoder_cache


@uses("runner_v1", f"{V1}._batch_mm_inputs_from_scheduler")
def v1_scheduled(runner: Any, scheduler_output: Any) -> tuple[list, list, list]:
    """``(mm hashes, [(modality, kwargs)], [(request id, position)])`` of the step."""
    return runner._batch_mm_inputs_from_scheduler(scheduler_output)


@uses("runner_v1", f"{V1}().requests")
def v1_features(runner: Any) -> Iterable[tuple[str, Iterable[Any]]]:
    """``(request id, multimodal features)`` of every live request."""
    return ((rid, state.mm_features or ()) for rid, state in runner.requests.items())


@uses("runner_v1", f"{V1}().model", f"{V1}().encoder_cudagraph_manager?")
def v1_encode(runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """vLLM's own encoding of a micro-batch: its batching, cudagraphs if any, embed_multimodal."""
    graphs = getattr(runner, "encoder_cudagraph_manager", None)
    return eager_encode(runner.model, runner.device, mm_kwargs, graphs)


def v1_encode_eagerly(runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """The runner's model on ``mm_kwargs``, eagerly (no captured graphs)."""
    return eager_encode(runner.model, runner.device, mm_kwargs)


@uses(BOTH, "vllm.multimodal.utils:group_and_batch_mm_kwargs")
@uses(BOTH, "vllm.v1.worker.utils:sanity_check_mm_encoder_outputs")
@uses(BOTH, "vllm.utils.torch_utils:PIN_MEMORY?")
def eager_encode(
    model: Any, device: Any, mm_kwargs: list[tuple[str, Any]], graphs: Any = None
) -> list[Any]:
    """vLLM's batching and the model's ``embed_multimodal`` (``graphs``: V1's encoder
    CUDA-graph manager, tried first for the modalities it supports).

    Prefetches pass no graphs: a captured graph writes static buffers that the
    step's own encoder call would share from the other stream."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs
    from vllm.v1.worker.utils import sanity_check_mm_encoder_outputs

    try:
        from vllm.utils.torch_utils import PIN_MEMORY as pin_memory
    except ImportError:  # moved: pinning is only a speed-up
        pin_memory = torch.cuda.is_available()
    outputs: list[Any] = []
    for modality, num_items, batch in group_and_batch_mm_kwargs(
        mm_kwargs, device=device, pin_memory=pin_memory
    ):
        result = None
        if graphs is not None and graphs.supports_modality(modality):
            result = graphs.execute(batch)
        if result is None:
            result = model.embed_multimodal(**batch)
        sanity_check_mm_encoder_outputs(result, expected_num_items=num_items)
        outputs.extend(result)
    return outputs


@uses("runner_v1", f"{V1}()._cache_encoder_output?", f"{V1}().maybe_save_ec_to_connector?")
def v1_store(runner: Any, mm_hash: str, output: Any, scheduler_output: Any) -> None:
    """Cache one output as vLLM's own ``_execute_mm_encoder`` would (EC connectors see it)."""
    store = getattr(runner, "_cache_encoder_output", None)  # vLLM 0.27+
    if store is not None:
        store(mm_hash, output, carried_metadata(scheduler_output), freed_hashes(scheduler_output))
        return
    runner.encoder_cache[mm_hash] = output
    save = getattr(runner, "maybe_save_ec_to_connector", None)
    if save is not None:
        save(runner.encoder_cache, mm_hash)
