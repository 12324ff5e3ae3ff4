"""The ``sglang.srt.plugins`` entry point and the hooks it registers.

SGLang calls :func:`register` in the launcher (before parsing arguments), in
``Engine.__init__`` and in every scheduler / DP-controller / detokenizer process.
It is idempotent and always:

- adds the ``--enable-vit-batching`` option group to SGLang's parser and, when
  the flag is given, copies the settings into ``VITBATCH_*`` variables for the
  scheduler processes (:mod:`.settings`);
- checks the ``VITBATCH_*`` settings where SGLang resolves its arguments
  (``ServerArgs.resolve_once``) on every launch route: SGLang's plugin loader
  logs and swallows what a plugin raises, so a bad value raised in
  :func:`register` alone would leave vitbatch off without stopping anything.

Only when enabled (flag or ``VITBATCH_ENABLE=1``) does it wrap SGLang's step
function (:mod:`.step`), after the surface check; otherwise SGLang's multimodal
path is untouched. Only with the encoder prefetch on as well (``--vit-batch-prefetch``,
``VITBATCH_PREFETCH=1``) does it wrap ``Scheduler.run_batch`` and ``on_idle`` (:mod:`.loop`), after
the prefetch's own surface check.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from vitbatch.adapters.sglang import surface
from vitbatch.adapters.sglang.settings import Settings, add_cli_args, settings_from_args

logger = logging.getLogger("vitbatch.sglang")

_registered = False
_mm_hook_registered = False
_loop_hook_registered = False


def register() -> None:
    """``sglang.srt.plugins`` entry point: cheap, idempotent, patches the mm path only when
    enabled."""
    global _registered
    if _registered:
        return
    _registered = True
    surface.hook_cli(_after_add_cli_args, _after_from_cli_args)
    surface.hook_server_args_resolution(_before_resolution)
    try:
        settings = Settings.from_env()
    except ValueError as error:  # SGLang's loader would swallow it: _before_resolution raises it
        logger.error("vitbatch is off in this process: %s", error)
        return
    if settings.enabled:
        _register_mm_hook(prefetch=settings.prefetch)


def _after_add_cli_args(_result: None, parser: argparse.ArgumentParser) -> None:
    add_cli_args(parser)


def _after_from_cli_args(_result: Any, _cls: type, args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    if not settings.enabled:
        return
    os.environ.update(settings.to_env())  # spawned scheduler processes read these
    if (warning := settings.deprecation()) is not None:
        logger.warning("%s", warning)
    _register_mm_hook(prefetch=settings.prefetch)
    surface.apply_hooks()  # this process's plugins already ran: patch it now too (fork)


def _before_resolution(*_args: Any, **_kwargs: Any) -> None:
    """Raise a bad ``VITBATCH_*`` value to the caller of ``ServerArgs.resolve_once``."""
    Settings.from_env()


def _register_mm_hook(prefetch: bool = False) -> None:
    global _mm_hook_registered
    if _mm_hook_registered:
        return
    _mm_hook_registered = True
    problem = surface.surface_problem()
    if problem is not None:  # one line, and SGLang runs untouched
        logger.error("%s", problem)
        return
    from vitbatch.adapters.sglang.step import around_chunked_prefill

    surface.hook_chunked_prefill(around_chunked_prefill)
    if prefetch:
        _register_loop_hook()


def _register_loop_hook() -> None:
    """Only where SGLang's scheduler module is loaded already (its scheduler processes,
    which import it before loading plugins): elsewhere (the detokenizer) the hook would
    import the whole scheduler for nothing; SGLang spawns its schedulers, never forks."""
    global _loop_hook_registered
    if _loop_hook_registered or not surface.scheduler_loaded():
        return
    _loop_hook_registered = True
    problem = surface.prefetch_problem()
    if problem is not None:  # the step is still vitbatch's; only the prefetch is off
        logger.error("%s", problem)
        return
    from vitbatch.adapters.sglang.loop import after_iteration

    surface.hook_scheduler_loop(after_iteration, after_iteration)
