"""vitbatch's only door to vLLM: every vLLM name it imports, reads, writes or wraps.

vLLM has no plugin API for encoder batching, so the adapter wraps private
methods and reads internal fields, which move between releases. Each is used
in this package only, in an accessor (or wrap point) declaring the names it
relies on (syntax: :mod:`..probing`); :func:`check` probes that list at
start-up, so a missing name switches vitbatch off with one log line instead of
failing mid-step, and the list cannot drift from the code. Parts, checked each
on its own: ``config`` (options checked where vLLM builds its config, and
metrics collection set up in the serving process; without it, both happen
later in the engine), ``scheduler`` (without it vitbatch cannot run),
``runner_v1`` (``gpu_model_runner.py``: CPU, and GPU with
``VLLM_USE_V2_MODEL_RUNNER=0``), ``runner_v2`` (Model Runner V2, the GPU
default); ``bench`` (``vitbatch bench-vllm`` only) is not probed.

One module per job: :mod:`.completeness` (the declared names and the check),
:mod:`.wrap_points` (the methods wrapped, the prefetch's ``execute_model``
included), :mod:`.scheduler_side`, :mod:`.runners` (what both model runners
share), :mod:`.runner_v1`, :mod:`.runner_v2` and :mod:`.bench`. Callers use
this package's names (``surface.X``), never a module's, so a test can replace
an accessor here.

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

Importing this package imports no vLLM; the accessors do, when called. The
modules are imported in the order they declare their names, which is the order
the check reports missing ones in.
"""

from __future__ import annotations

from vitbatch.adapters.vllm.probing import SurfaceReport
from vitbatch.adapters.vllm.surface.completeness import PARTS, check, names, version
from vitbatch.adapters.vllm.surface.wrap_points import (
    CREATE_ENGINE_CONFIG,
    SCHEDULER_INIT,
    SCHEDULER_SCHEDULE,
    V1_EXECUTE_MM_ENCODER,
    V1_EXECUTE_MODEL,
    V1_UPDATE_STATES,
    V2_EXECUTE_MM_ENCODER,
    V2_EXECUTE_MODEL,
    V2_FREE_STATES,
    V2_PREPARE_MM_INPUTS,
    WrapPoint,
    unwrap,
    wrap,
)

# isort: split
from vitbatch.adapters.vllm.surface.scheduler_side import (
    bytes_per_embed,
    cache_size,
    carried_metadata,
    ec_connector_name,
    encoder_decoder_manager,
    evicted,
    freed_hashes,
    is_cached,
    is_encoder_decoder,
    lora_configured,
    manager_base,
    prefetch_inputs,
    request_finished,
    request_id,
    request_input,
    rows_to_evict_from,
    scheduled_encoder_inputs,
    scheduler_config,
    scheduler_manager,
    set_scheduler_manager,
    waiting_requests,
)

# isort: split
from vitbatch.adapters.vllm.surface.runners import (
    agree_group,
    device,
    embedding_dtype,
    first_pp_rank,
    hidden_size,
    metric_labels,
    tp_world_size,
    unreproduced_branch,
)

# isort: split
from vitbatch.adapters.vllm.surface.runner_v1 import (
    eager_encode,
    v1_encode,
    v1_encode_eagerly,
    v1_features,
    v1_outputs,
    v1_scheduled,
    v1_store,
)

# isort: split
from vitbatch.adapters.vllm.surface.runner_v2 import (
    v2_encode_eagerly,
    v2_encoder_runner,
    v2_features,
    v2_graphs_captured,
    v2_outputs,
)

# isort: split
from vitbatch.adapters.vllm.surface.bench import (
    count_qwen2_5_vl_encoder_calls,
    ec_transfer_config_class,
    offline_api,
    v2_runner_takes_ec_connector,
)

__all__ = [
    "CREATE_ENGINE_CONFIG",
    "PARTS",
    "SCHEDULER_INIT",
    "SCHEDULER_SCHEDULE",
    "V1_EXECUTE_MM_ENCODER",
    "V1_EXECUTE_MODEL",
    "V1_UPDATE_STATES",
    "V2_EXECUTE_MM_ENCODER",
    "V2_EXECUTE_MODEL",
    "V2_FREE_STATES",
    "V2_PREPARE_MM_INPUTS",
    "SurfaceReport",
    "WrapPoint",
    "agree_group",
    "bytes_per_embed",
    "cache_size",
    "carried_metadata",
    "check",
    "count_qwen2_5_vl_encoder_calls",
    "device",
    "eager_encode",
    "ec_connector_name",
    "ec_transfer_config_class",
    "embedding_dtype",
    "encoder_decoder_manager",
    "evicted",
    "first_pp_rank",
    "freed_hashes",
    "hidden_size",
    "is_cached",
    "is_encoder_decoder",
    "lora_configured",
    "manager_base",
    "metric_labels",
    "names",
    "offline_api",
    "prefetch_inputs",
    "request_finished",
    "request_id",
    "request_input",
    "rows_to_evict_from",
    "scheduled_encoder_inputs",
    "scheduler_config",
    "scheduler_manager",
    "set_scheduler_manager",
    "tp_world_size",
    "unreproduced_branch",
    "unwrap",
    "v1_encode",
    "v1_encode_eagerly",
    "v1_features",
    "v1_outputs",
    "v1_scheduled",
    "v1_store",
    "v2_encode_eagerly",
    "v2_encoder_runner",
    "v2_features",
    "v2_graphs_captured",
    "v2_outputs",
    "v2_runner_takes_ec_connector",
    "version",
    "waiting_requests",
    "wrap",
]
