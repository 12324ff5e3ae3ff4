"""vitbatch's only door to vLLM: every vLLM name it imports, reads, writes or wraps.

vLLM has no plugin API for encoder batching, so the adapter wraps private
methods and reads internal fields, which move between releases. Each is used
here only, in an accessor (or wrap point) declaring the names it relies on
(syntax: :mod:`.probing`); :func:`check` probes that list at start-up, so a
missing name switches vitbatch off with one log line instead of failing
mid-step, and the list cannot drift from the code. Parts, checked each on its
own: ``config`` (options checked where vLLM builds its config, and metrics
collection set up in the serving process; without it, both happen later in the
engine), ``scheduler`` (without it vitbatch cannot run), ``runner_v1``
(``gpu_model_runner.py``: CPU, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``),
``runner_v2`` (Model Runner V2, the GPU default); ``bench`` (``vitbatch
bench-vllm`` only) is not probed.

Private fields that remain, and why:

* ``EncoderCacheManager().freeable`` / ``freed`` / ``num_free_slots`` / ``cached``
  (read only): vLLM forgets an entry's rows when it evicts it and reports
  evictions only at the end of the step, but the host tier must keep the rows
  of what was evicted during the pass; eviction and accounting themselves go
  through vLLM's ``can_allocate`` / ``allocate``.
* ``GPUModelRunner()._update_states`` / ``_execute_mm_encoder`` /
  ``_batch_mm_inputs_from_scheduler`` / ``encoder_cache`` / ``requests`` and
  ``_cache_encoder_output?`` (V1), ``EncoderRunner.prepare_mm_inputs`` /
  ``execute_mm_encoder`` and ``EncoderCache().mm_features`` / ``encoder_outputs``
  (V2): the per-step encoder path has no hook; these are where it runs.
* ``Scheduler.__init__`` / ``schedule`` and ``Scheduler().encoder_cache_manager``:
  the manager is swapped in when the config says so, and on 0.26 (no
  ``ec_manager_metadata``) the step's metadata is attached to its output.

Importing this module imports no vLLM; the accessors do, when called.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vitbatch.adapters.vllm import patching, probing
from vitbatch.adapters.vllm.probing import SurfaceReport

PARTS = ("config", "scheduler", "runner_v1", "runner_v2")
_registry = probing.Registry()
_uses = _registry.uses
_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_ECM = "vllm.v1.core.encoder_cache_manager:EncoderCacheManager"
_V1 = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_V2 = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
_ENCODER_RUNNER = "vllm.v1.worker.gpu.mm.encoder_runner:EncoderRunner"
_V2_CACHE = "vllm.v1.worker.gpu.mm.encoder_cache:EncoderCache"
_BOTH = ("runner_v1", "runner_v2")


def names(part: str | None = None) -> tuple[probing.EngineName, ...]:
    """Every declared vLLM name (of one part)."""
    return tuple(n for n in _registry.names if part is None or n.part == part)


@functools.lru_cache(maxsize=1)
def check() -> SurfaceReport:
    """Probe the installed vLLM once per process."""
    return probing.probe(version() or "(not importable)", _registry, PARTS)


def version() -> str | None:
    try:
        import vllm
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(vllm, "__version__", "?"))


# -- wrap points ---------------------------------------------------------------


@dataclass(frozen=True)
class WrapPoint:
    """A vLLM method vitbatch wraps."""

    module: str
    owner: str
    method: str

    def owner_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.owner)


def _point(part: str, spec: str) -> WrapPoint:
    _registry.declare(part, [spec])
    module, path = spec.split(":")
    owner, method = path.split(".")
    return WrapPoint(module, owner, method)


CREATE_ENGINE_CONFIG = _point("config", "vllm.engine.arg_utils:EngineArgs.create_engine_config")
SCHEDULER_INIT = _point("scheduler", f"{_SCHEDULER}.__init__")
SCHEDULER_SCHEDULE = _point("scheduler", f"{_SCHEDULER}.schedule")
V1_UPDATE_STATES = _point("runner_v1", f"{_V1}._update_states")
V1_EXECUTE_MM_ENCODER = _point("runner_v1", f"{_V1}._execute_mm_encoder")
V2_FREE_STATES = _point("runner_v2", f"{_V2}.free_states")
V2_PREPARE_MM_INPUTS = _point("runner_v2", f"{_ENCODER_RUNNER}.prepare_mm_inputs")
V2_EXECUTE_MM_ENCODER = _point("runner_v2", f"{_ENCODER_RUNNER}.execute_mm_encoder")
V1_EXECUTE_MODEL = _point("runner_v1", f"{_V1}.execute_model")
V2_EXECUTE_MODEL = _point("runner_v2", f"{_V2}.execute_model")


def wrap(point: WrapPoint, factory: patching.Factory) -> None:
    patching.wrap(point.owner_class(), point.method, factory)


def unwrap(point: WrapPoint) -> None:
    patching.unwrap(point.owner_class(), point.method)


# -- scheduler side ------------------------------------------------------------


@_uses("scheduler", _ECM, *(f"{_ECM}.{m}" for m in ("can_allocate", "allocate", "reset")))
@_uses("scheduler", f"{_ECM}.check_and_update_cache", f"{_ECM}.get_freed_mm_hashes")
def manager_base() -> type:
    """vLLM's ``EncoderCacheManager``, which vitbatch's manager subclasses."""
    from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

    return EncoderCacheManager


@_uses("scheduler", "vllm.v1.core.encoder_cache_manager:EncoderDecoderCacheManager")
def encoder_decoder_manager(cache_size: int) -> Any:
    from vllm.v1.core.encoder_cache_manager import EncoderDecoderCacheManager

    return EncoderDecoderCacheManager(cache_size=cache_size)


@_uses("scheduler", f"{_ECM}().cache_size")
def cache_size(manager: Any) -> int:
    return manager.cache_size


@_uses("scheduler", f"{_ECM}().num_free_slots", f"{_ECM}().freeable")
def rows_to_evict_from(manager: Any, wanted: int) -> dict[str, int]:
    """What vLLM would evict from (mm hash -> rows, a copy) to fit ``wanted`` rows; ``{}``
    when they fit already."""
    return dict(manager.freeable) if wanted > manager.num_free_slots else {}


@_uses("scheduler", f"{_ECM}().freed")
def evicted(manager: Any) -> list[str]:
    """Hashes evicted since vLLM's last ``get_freed_mm_hashes`` (oldest first; read only)."""
    return manager.freed


@_uses("scheduler", f"{_ECM}().cached")
def is_cached(manager: Any, mm_hash: str) -> bool:
    return mm_hash in manager.cached


@_uses("scheduler", "vllm.v1.request:Request().mm_features")
def request_input(request: Any, input_id: int) -> tuple[str, int]:
    """``(mm hash, embedding rows)`` of a request's encoder input."""
    feature = request.mm_features[input_id]
    return feature.identifier, feature.mm_position.get_num_embeds()


@_uses("scheduler", f"{_SCHEDULER}().encoder_cache_manager", f"{_SCHEDULER}().vllm_config")
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


@_uses("scheduler", "vllm.config:VllmConfig().ec_transfer_config?")
def ec_connector_name(vllm_config: Any) -> str | None:
    """The EC connector configured by ``--ec-transfer-config`` (``ECCPUConnector``...),
    or ``None`` (none configured, or a vLLM without EC transfer)."""
    ec_config = getattr(vllm_config, "ec_transfer_config", None)
    name = getattr(ec_config, "ec_connector", None) if ec_config is not None else None
    return str(name) if name else None


@_uses("scheduler", "vllm.config:VllmConfig().lora_config")
def lora_configured(vllm_config: Any) -> bool:
    """Whether LoRA is on (a tower LoRA needs per-request mappings a prefetch lacks)."""
    return getattr(vllm_config, "lora_config", None) is not None


_QUEUES = ("kv_holding_waiting", "skipped_waiting", "waiting")


@_uses("scheduler", f"{_SCHEDULER}().waiting", f"{_SCHEDULER}().skipped_waiting?")
@_uses("scheduler", f"{_SCHEDULER}().kv_holding_waiting?")
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


@_uses("scheduler", "vllm.v1.request:Request().request_id", "vllm.v1.request:Request.is_finished")
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


@_uses("scheduler", "vllm.v1.core.sched.output:SchedulerOutput().ec_manager_metadata?")
def carried_metadata(scheduler_output: Any) -> Any:
    """What vLLM carried for the manager (0.27+), or ``None``."""
    return getattr(scheduler_output, "ec_manager_metadata", None)


@_uses("scheduler", "vllm.v1.core.sched.output:SchedulerOutput().free_encoder_mm_hashes")
def freed_hashes(scheduler_output: Any) -> list[str]:
    return scheduler_output.free_encoder_mm_hashes


@_uses("runner_v1", "vllm.v1.core.sched.output:SchedulerOutput().scheduled_encoder_inputs")
def scheduled_encoder_inputs(scheduler_output: Any) -> Mapping[str, list[int]]:
    return scheduler_output.scheduled_encoder_inputs


# -- both model runners ----------------------------------------------------------------


@_uses("runner_v1", f"{_V1}().device", f"{_V1}().model_config")
@_uses("runner_v2", f"{_V2}().device", f"{_V2}().model_config")
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


@_uses(_BOTH, "vllm.distributed:get_tp_group?", "vllm.distributed:get_tensor_model_parallel_rank?")
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


@_uses(_BOTH, "vllm.config:ParallelConfig().data_parallel_rank?")
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


@_uses("runner_v1", *(f"{_V1}().{n}?" for n in ("lora_config", "lora_manager")))
@_uses("runner_v1", f"{_V1}().is_multimodal_pruning_enabled?", f"{_V1}().observability_config?")
@_uses("runner_v1", f"{_V1}().requires_sequential_video_encoding?")
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


# -- model runner V1 -----------------------------------------------------------------


@_uses("runner_v1", f"{_V1}().encoder_cache")
def v1_outputs(runner: Any) -> dict[str, Any]:
    """The runner's encoder outputs by mm hash (the device cache)."""
    return runner.encoder_cache


@_uses("runner_v1", f"{_V1}._batch_mm_inputs_from_scheduler")
def v1_scheduled(runner: Any, scheduler_output: Any) -> tuple[list, list, list]:
    """``(mm hashes, [(modality, kwargs)], [(request id, position)])`` of the step."""
    return runner._batch_mm_inputs_from_scheduler(scheduler_output)


@_uses("runner_v1", f"{_V1}().requests")
def v1_features(runner: Any) -> Iterable[tuple[str, Iterable[Any]]]:
    """``(request id, multimodal features)`` of every live request."""
    return ((rid, state.mm_features or ()) for rid, state in runner.requests.items())


@_uses("runner_v1", f"{_V1}().model", f"{_V1}().encoder_cudagraph_manager?")
def v1_encode(runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """vLLM's own encoding of a micro-batch: its batching, cudagraphs if any, embed_multimodal."""
    graphs = getattr(runner, "encoder_cudagraph_manager", None)
    return eager_encode(runner.model, runner.device, mm_kwargs, graphs)


def v1_encode_eagerly(runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """The runner's model on ``mm_kwargs``, eagerly (no captured graphs)."""
    return eager_encode(runner.model, runner.device, mm_kwargs)


@_uses(_BOTH, "vllm.multimodal.utils:group_and_batch_mm_kwargs")
@_uses(_BOTH, "vllm.v1.worker.utils:sanity_check_mm_encoder_outputs")
@_uses(_BOTH, "vllm.utils.torch_utils:PIN_MEMORY?")
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


@_uses("runner_v1", f"{_V1}()._cache_encoder_output?", f"{_V1}().maybe_save_ec_to_connector?")
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


# -- model runner V2 -----------------------------------------------------------------


@_uses("runner_v2", f"{_V2}().encoder_cache", f"{_V2}().model_state")
def v2_encoder_runner(model_runner: Any) -> Any:
    """The model runner's ``EncoderRunner``, or ``None`` (no multimodal encoder)."""
    if model_runner.encoder_cache is None:
        return None
    return getattr(getattr(model_runner, "model_state", None), "encoder_runner", None)


@_uses("runner_v2", f"{_V2_CACHE}().encoder_outputs", f"{_ENCODER_RUNNER}().encoder_cache")
def v2_outputs(runner: Any) -> dict[str, Any]:
    """Encoder outputs by mm hash (``runner``: the model runner or its encoder runner)."""
    return runner.encoder_cache.encoder_outputs


@_uses("runner_v2", f"{_ENCODER_RUNNER}().model", f"{_ENCODER_RUNNER}().device")
def v2_encode_eagerly(encoder_runner: Any, mm_kwargs: list[tuple[str, Any]]) -> list[Any]:
    """The encoder runner's model on ``mm_kwargs``, eagerly (no captured graphs)."""
    return eager_encode(encoder_runner.model, encoder_runner.device, mm_kwargs)


@_uses(_BOTH, "vllm.distributed:get_tp_group?")
def tp_world_size() -> int:
    """Tensor-parallel ranks of this worker's group (1 without distributed state)."""
    try:
        from vllm.distributed import get_tp_group

        return int(get_tp_group().world_size)
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return 1


@_uses(_BOTH, "vllm.distributed:get_pp_group?")
def first_pp_rank() -> bool:
    """Whether this worker runs the encoder (the first pipeline stage, or no pipeline)."""
    try:
        from vllm.distributed import get_pp_group

        return bool(get_pp_group().is_first_rank)
    except Exception:  # noqa: BLE001 - no distributed state: a single process
        return True


@_uses("runner_v2", f"{_V2_CACHE}().mm_features")
def v2_features(encoder_runner: Any) -> Mapping[str, list[Any]]:
    """Multimodal features by request id."""
    return encoder_runner.encoder_cache.mm_features


@_uses("runner_v2", f"{_ENCODER_RUNNER}().cudagraph_manager?")
def v2_graphs_captured(encoder_runner: Any) -> bool:
    manager = getattr(encoder_runner, "cudagraph_manager", None)
    if manager is None:
        return False
    is_captured = getattr(manager, "is_captured", None)
    return bool(is_captured()) if callable(is_captured) else True


# -- bench (vitbatch bench-vllm) ------------------------------------------------


@_uses("bench", "vllm:LLM", "vllm:SamplingParams")
def offline_api() -> tuple[type, type]:
    """``(LLM, SamplingParams)``."""
    from vllm import LLM, SamplingParams

    return LLM, SamplingParams


@_uses("bench", "vllm.config:ECTransferConfig")
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


@_uses("bench", f"{_QWEN}.embed_multimodal")
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
