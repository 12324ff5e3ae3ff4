"""The one door to SGLang: every SGLang name vitbatch reads, writes, wraps or imports.

Why: these names are not SGLang's public API and move between releases. Each is
touched by exactly one accessor of this package, and each accessor is registered with the
names it needs (:func:`~.registry.needs`); :func:`names`, which the start-up check walks,
is generated from those registrations, so the check cannot drift from the code.
A rename becomes one clear log line ("vitbatch is off: SGLang X lacks Y") at
enable time instead of a failure inside the first multimodal step. No other
module of vitbatch imports ``sglang``.

Supported: SGLang 0.5.17 to 0.5.23 (docs/sglang.md, "Supported versions"). Names
every supported release has are required; ``optional`` ones are feature probes
for what differs inside that range, each named after what SGLang does. Where a
supported release keeps a required name somewhere else (the step's module, the
argument-resolution method), the name is written with a placeholder (``{step}``,
``{resolution}``) that a probe fills in: one accessor, never a copy per release.

One module per job (the rest of vitbatch reads them through this package only):

* :mod:`.registry` - :func:`~.registry.needs`, the registered names, the module names;
* :mod:`.releases` - where the installed release keeps things (the ``{step}`` and
  ``{resolution}`` probes), :func:`names`, the version;
* :mod:`.hooks` - the hooks on SGLang's CLI, argument resolution and step;
* :mod:`.step` - SGLang's multimodal step, its embedding cache, how releases choose its path;
* :mod:`.context` - the process's attention-TP group and metric labels;
* :mod:`.transport` - CUDA-IPC borrowing and the feature copy-back, where offered;
* :mod:`.loop` - the scheduler loop, for the encoder prefetch;
* :mod:`.check` - the start-up check, generated from the registrations.

The imports below run in that order on purpose: accessors register as their module
loads, :func:`names` lists each part's names in registration order, and
:func:`missing_piece` names the first missing one, so this order (the order of the
single module this package replaced) decides which name an unsupported release's log
line names. Each module imports only modules above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# isort: off
from vitbatch.adapters.sglang.surface.releases import (
    names,
    resolution_method,
    sglang_version,
    step_module_name,
)
from vitbatch.adapters.sglang.surface.hooks import (
    apply_hooks,
    chunked_prefill_function,
    hook_chunked_prefill,
    hook_cli,
    hook_server_args_resolution,
    set_chunked_prefill_function,
)
from vitbatch.adapters.sglang.surface.step import (
    _release as _release,
    audio_runs_per_image,
    borrow_feature,
    cache_capacity,
    cache_clear,
    cache_entries,
    cache_free,
    cache_store,
    cache_touch,
    cache_used,
    can_skip_feature_move,
    chunked_embedding_full,
    embedding_cache,
    entry_bytes,
    full_path_only_on_overlap,
    get_embedding_and_mask,
    image_item,
    new_embedding_cache,
    per_image_request,
    plain_embedding,
    runs_full_path,
    set_embedding_cache,
    sglang_bytes,
)
from vitbatch.adapters.sglang.surface.context import (
    attn_tp_cpu_group,
    load_multimodal_modules,
    metric_labels,
)
from vitbatch.adapters.sglang.surface.transport import (
    borrow_cuda_ipc_key,
    host_offload_event,
    set_host_offload_event,
)
from vitbatch.adapters.sglang.surface.loop import (
    copy_back_pending,
    hook_scheduler_loop,
    prefetchable,
    request_state,
    scheduler_loaded,
    waiting_requests,
)
from vitbatch.adapters.sglang.surface.check import (
    missing_piece,
    prefetch_problem,
    surface_problem,
)
# isort: on

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import MultimodalDataItem as MultimodalDataItem

__all__ = [
    "apply_hooks",
    "attn_tp_cpu_group",
    "audio_runs_per_image",
    "borrow_cuda_ipc_key",
    "borrow_feature",
    "cache_capacity",
    "cache_clear",
    "cache_entries",
    "cache_free",
    "cache_store",
    "cache_touch",
    "cache_used",
    "can_skip_feature_move",
    "chunked_embedding_full",
    "chunked_prefill_function",
    "copy_back_pending",
    "embedding_cache",
    "entry_bytes",
    "full_path_only_on_overlap",
    "get_embedding_and_mask",
    "hook_chunked_prefill",
    "hook_cli",
    "hook_scheduler_loop",
    "hook_server_args_resolution",
    "host_offload_event",
    "image_item",
    "load_multimodal_modules",
    "metric_labels",
    "missing_piece",
    "names",
    "new_embedding_cache",
    "per_image_request",
    "plain_embedding",
    "prefetch_problem",
    "prefetchable",
    "request_state",
    "resolution_method",
    "runs_full_path",
    "scheduler_loaded",
    "set_chunked_prefill_function",
    "set_embedding_cache",
    "set_host_offload_event",
    "sglang_bytes",
    "sglang_version",
    "step_module_name",
    "surface_problem",
    "waiting_requests",
]
