"""Scheduler side: the switch that puts vitbatch's manager into vLLM's ``Scheduler``.

vLLM builds its ``Scheduler`` (and the scheduler its ``EncoderCacheManager``)
before vitbatch sees any config, so :func:`install_scheduler_patch` (run by the
entry point in every vLLM process) wraps ``Scheduler.__init__``: when the
scheduler's config switches vitbatch on (:func:`~.options.configured_options`)
and the engine surface is complete, :func:`enable_on` swaps vLLM's manager for
:class:`~.scheduler.VitBatchEncoderCacheManager`. It wraps
``Scheduler.schedule`` to attach the step's metadata where vLLM does not ask
for it itself (0.26). On vLLM 0.27+ ``--ec-manager-config`` naming the manager
builds it directly; :func:`enable_on` then only binds it to the scheduler.

Apart from the manager's module so that the manager (what vLLM resolves by
qualified name) carries no patching, and the patching no accounting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from vitbatch.adapters.vllm import surface
from vitbatch.adapters.vllm.metadata import VitBatchStepMetadata, attach
from vitbatch.adapters.vllm.options import configured_options
from vitbatch.adapters.vllm.scheduler import EncoderCacheManager, VitBatchEncoderCacheManager

logger = logging.getLogger("vllm.vitbatch")


def enable_on(scheduler: Any) -> bool:
    """Swap ``scheduler``'s encoder cache manager for vitbatch's if its config asks for it.

    :raises ValueError: vitbatch's options are set to something invalid (vLLM
        then fails to start, with a message naming the option).
    :returns: whether vitbatch's manager is in charge now.
    """
    vllm_config = surface.scheduler_config(scheduler)
    options = configured_options(vllm_config)
    current = surface.scheduler_manager(scheduler)
    if options is None or isinstance(current, VitBatchEncoderCacheManager):
        if isinstance(current, VitBatchEncoderCacheManager):
            current.bind(scheduler)  # built by vLLM from --ec-manager-config
        return isinstance(current, VitBatchEncoderCacheManager)
    report = surface.check()
    if not report.ok("scheduler"):
        logger.warning("vitbatch: off, vLLM runs unchanged: %s", report.describe("scheduler"))
        return False
    if not (report.ok("runner_v1") or report.ok("runner_v2")):
        logger.warning(
            "vitbatch: off, vLLM runs unchanged: %s; %s",
            report.describe("runner_v1"),
            report.describe("runner_v2"),
        )
        return False
    if type(current) is not EncoderCacheManager:
        logger.warning(
            "vitbatch: off: vLLM's scheduler uses %s, not its EncoderCacheManager "
            "(encoder-decoder model, or another plugin's manager)",
            type(current).__name__,
        )
        return False
    manager = VitBatchEncoderCacheManager.create_manager(
        cache_size=surface.cache_size(current), vllm_config=vllm_config, options=options
    )
    surface.set_scheduler_manager(scheduler, manager)
    if isinstance(manager, VitBatchEncoderCacheManager):
        manager.bind(scheduler)
    return isinstance(manager, VitBatchEncoderCacheManager)


def _wrapped_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        enable_on(self)

    return __init__


def _wrapped_schedule(original: Callable[..., Any]) -> Callable[..., Any]:
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        manager = surface.scheduler_manager(self)
        if isinstance(manager, VitBatchEncoderCacheManager) and not isinstance(
            surface.carried_metadata(output), VitBatchStepMetadata
        ):
            attach(output, manager.get_manager_metadata())  # vLLM 0.26: no field for it
        return output

    return schedule


_PATCHES = (
    (surface.SCHEDULER_INIT, _wrapped_init),
    (surface.SCHEDULER_SCHEDULE, _wrapped_schedule),
)


def install_scheduler_patch() -> bool:
    """Wrap ``Scheduler`` so that its config can switch vitbatch on. Idempotent.

    Without vitbatch in the config the wrappers only call vLLM's methods
    (``schedule`` adds one isinstance check per step).
    """
    if not surface.check().ok("scheduler"):
        return False
    for point, factory in _PATCHES:
        surface.wrap(point, factory)
    return True
