"""Hooks: where vitbatch plugs into SGLang (its CLI, its argument resolution, its step).

Registered through SGLang's ``HookRegistry``; the scheduler-loop hooks of the encoder
prefetch are :mod:`.loop`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from vitbatch.adapters.sglang.surface.registry import ARGS, HOOKS, STEP, _module, needs
from vitbatch.adapters.sglang.surface.releases import _mm, resolution_method, step_module_name


def _register(target: str, hook: Callable, kind: str) -> None:
    registry = _module(HOOKS)
    registry.HookRegistry.register(target, hook, getattr(registry.HookType, kind))


@needs(
    f"{HOOKS}:HookRegistry.register",
    f"{HOOKS}:HookType.AFTER",
    f"{ARGS}:ServerArgs.add_cli_args",
    f"{ARGS}:ServerArgs.from_cli_args",
)
def hook_cli(after_add_cli_args: Callable, after_from_cli_args: Callable) -> None:
    """AFTER hooks on ``ServerArgs.add_cli_args`` (parser) and ``from_cli_args`` (parsed)."""
    _register(f"{ARGS}.ServerArgs.add_cli_args", after_add_cli_args, "AFTER")
    _register(f"{ARGS}.ServerArgs.from_cli_args", after_from_cli_args, "AFTER")


@needs(f"{HOOKS}:HookType.BEFORE", f"{ARGS}:ServerArgs.{{resolution}}")
def hook_server_args_resolution(before: Callable) -> None:
    """A BEFORE hook on where ``ServerArgs`` resolves (:func:`resolution_method`), which every
    launch route goes through before any model or process starts, outside the plugin loader
    (that swallows what a plugin raises)."""
    _register(f"{ARGS}.ServerArgs.{resolution_method()}", before, "BEFORE")


@needs(f"{HOOKS}:HookType.AROUND", f"{STEP}:_get_chunked_prefill_embedding")
def hook_chunked_prefill(around: Callable) -> None:
    """An AROUND hook on SGLang's step embedding of every request's multimodal items."""
    _register(f"{step_module_name()}._get_chunked_prefill_embedding", around, "AROUND")


@needs(f"{HOOKS}:HookRegistry.apply_hooks")
def apply_hooks() -> None:
    """Patch this process now (its plugins already ran)."""
    _module(HOOKS).HookRegistry.apply_hooks()


@needs(f"{STEP}:_get_chunked_prefill_embedding")
def chunked_prefill_function() -> Callable:
    """What the step module's ``_get_chunked_prefill_embedding`` names now (patched or not)."""
    return _mm()._get_chunked_prefill_embedding


@needs(f"{STEP}:_get_chunked_prefill_embedding", part="bench")
def set_chunked_prefill_function(function: Callable) -> None:
    """Make the step module's ``_get_chunked_prefill_embedding`` name ``function`` (the bench)."""
    _mm()._get_chunked_prefill_embedding = function
