"""vLLM adapter: vitbatch behind vLLM's encoder cache manager and both model runners.

Switch it on with ``--additional-config '{"vitbatch": {...options...}}'`` (any
supported vLLM, 0.26+), ``VITBATCH_VLLM=1`` in the engine's environment, or, on
0.27+, ``--ec-manager-config`` naming :data:`MANAGER_QUALNAME`. The options are
:class:`~.options.VllmOptions`; a bad value stops vLLM at start-up.

This package is the role-routed shell; the modules, top to bottom:

* :mod:`.scheduler` - the manager subclass (vLLM's accounting, per-step
  metadata), :mod:`.host_index` - its host-tier index and moves, and
  :mod:`.scheduler_patch` - the ``Scheduler`` wrapper that installs it;
* :mod:`.worker` - the worker side's installer, the only module that knows both
  model runners; :mod:`.worker_v1` and :mod:`.worker_v2` - their wrappers;
* :mod:`.worker_state` - vitbatch's per-runner state; :mod:`.worker_host_tier` -
  the host-tier moves applied to it; :mod:`.worker_items` - encoder inputs as items;
* encoder prefetch: :mod:`.prefetch_plan` (scheduler side: what to encode ahead),
  :mod:`.prefetch_pool` (worker side: the pool and its side stream) and
  :mod:`.worker_prefetch` (both runners' prefetch steps);
* :mod:`.metadata` - the per-step message from scheduler to workers (shared);
* :mod:`.options` - the options and where vLLM's config carries them;
* :mod:`.surface` - the only package that touches vLLM (one module per job):
  every vLLM name used, behind accessors, and the start-up check generated from them
  (:mod:`.probing` and :mod:`.patching`, engine-free, do the probing and wrapping).

Importing this package imports no vLLM: :func:`register` and the lazy
attributes below do, when vLLM calls them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from vitbatch.adapters.vllm import metadata
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata
from vitbatch.adapters.vllm.options import (
    CONFIG_KEY,
    ENV_VAR,
    MANAGER_CLASS_NAME,
    MANAGER_QUALNAME,
    VllmOptions,
    check_config,
    configured_options,
)

__all__ = [
    "CONFIG_KEY",
    "ENV_VAR",
    "MANAGER_CLASS_NAME",
    "MANAGER_QUALNAME",
    "VitBatchStepMetadata",
    "VllmOptions",
    "configured_options",
    "register",
    "stats",
]

logger = logging.getLogger("vllm.vitbatch")
_registered = False


def _install_worker_side() -> None:
    from vitbatch.adapters.vllm.worker import install_worker_patches

    install_worker_patches()


# Step metadata arriving in a worker process means vitbatch is on there.
metadata.on_arrival(_install_worker_side)


def _on_config_built(vllm_config: Any) -> None:
    """Where vLLM first builds its config (the serving process, before any engine
    process starts or any model loads): check vitbatch's options, and if it is on,
    set up the collection of its engine-side metrics for this process's ``/metrics``."""
    if check_config(vllm_config) is None:
        return
    from vitbatch.metrics import serve_engine_metrics

    try:
        serve_engine_metrics()
    except Exception:  # noqa: BLE001 - metrics are never worth a failed start
        logger.warning("vitbatch: metrics collection not set up", exc_info=True)


def _wrapped_create_engine_config(original: Any) -> Any:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        vllm_config = original(self, *args, **kwargs)
        _on_config_built(vllm_config)  # a ValueError stops vLLM here, naming the option
        return vllm_config

    return create_engine_config


def register() -> None:
    """``vllm.general_plugins`` entry point: loaded in every vLLM process. Idempotent.

    vLLM loads general plugins before any config is visible, so this only wraps
    ``EngineArgs.create_engine_config`` (options checked as soon as the config
    exists) and the ``Scheduler`` (pass-through unless its config switches
    vitbatch on). The model-runner wrappers are installed where vitbatch is
    known to be on: where the manager is built, and in a worker process when
    vitbatch's metadata first arrives.
    """
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from vitbatch.adapters.vllm import surface

        if surface.check().ok("config"):
            surface.wrap(surface.CREATE_ENGINE_CONFIG, _wrapped_create_engine_config)
    except Exception:  # noqa: BLE001 - the scheduler still checks the options
        logger.debug("vitbatch: could not hook vLLM's config building", exc_info=True)
    try:
        from vitbatch.adapters.vllm.scheduler_patch import install_scheduler_patch

        installed = install_scheduler_patch()
    except Exception:  # noqa: BLE001 - a plugin must never stop vLLM
        logger.warning("vitbatch: could not hook vLLM's scheduler; stays off", exc_info=True)
        return
    if not installed:
        from vitbatch.adapters.vllm import surface

        report = surface.check()
        logger.warning("vitbatch: off, vLLM runs unchanged: %s", report.describe("scheduler"))


def stats() -> dict[str, Any]:
    """This process's vitbatch counters: scheduler manager(s) and model runner(s).

    ``worker.batcher`` is the core's :class:`~vitbatch.core.stats.Totals` summed
    over the runners (encoder calls, items, cost-per-call histogram...);
    ``worker.steps_by_runner`` says which model runner (V1, V2) ran them.
    """
    from vitbatch.core import Totals

    scheduler_totals: dict[str, int] = {}
    try:
        from vitbatch.adapters.vllm.scheduler import SchedulerStats, managers
    except ImportError:  # no vLLM here: nothing ran
        return {"scheduler": {}, "worker": {}}
    from vitbatch.core.prefetch import PrefetchStats

    total = asdict(SchedulerStats())
    planned = asdict(PrefetchStats())
    for manager in list(managers):
        for name, value in asdict(manager.stats).items():
            total[name] += value
        if manager.prefetch is not None:
            for name, value in asdict(manager.prefetch.ledger.stats).items():
                planned[name] += value
    scheduler_totals = {**total, "prefetch": planned}
    from vitbatch.adapters.vllm.worker_state import merged_stats, states

    all_states = list(states)
    worker, kinds = merged_stats(all_states)
    batcher = Totals()
    pools = asdict(PrefetchStats())
    for state in all_states:
        batcher.merge(state.batcher.totals)
        if state.prefetch is not None:
            for name, value in asdict(state.prefetch.stats).items():
                pools[name] += value
    return {
        "scheduler": scheduler_totals,
        "worker": {
            **asdict(worker),
            "steps_by_runner": dict(kinds),
            "host_entries": sum(len(state.host) for state in all_states),
            "prefetch": pools,
            "prefetch_entries": sum(len(s.prefetch) for s in all_states if s.prefetch is not None),
            "batcher": batcher.as_dict(),
        },
    }


def __getattr__(name: str) -> Any:
    # vLLM resolves --ec-manager-config's class by qualified name (getattr on this
    # package); importing the scheduler module imports vLLM, so only on demand.
    if name == MANAGER_CLASS_NAME:
        from vitbatch.adapters.vllm.scheduler import VitBatchEncoderCacheManager

        return VitBatchEncoderCacheManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
