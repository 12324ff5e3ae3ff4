"""The core's one seam to the plugin layer: the step engine calling hooks.

The core imports nothing of :mod:`vitbatch.plugin` at module level; the plugin
layer imports the core (items, errors). The step engine reaches the hooks only
through this module: :func:`default_plugin_manager` (the process-wide manager,
imported lazily) and :func:`call_first_result`.

pluggy's own call of a firstresult hook returns only the value. Error messages must name the plugin
that produced a bad embedding, so we walk the implementations in pluggy's
documented order (last registered first, ``tryfirst``/``trylast`` honoured) using
the public ``HookCaller.get_hookimpls()``.
"""

from __future__ import annotations

from typing import Any

import pluggy

from vitbatch.core.errors import OutOfMemoryError, PluginCallError, VitBatchError

_PASS_THROUGH: tuple[type[BaseException], ...] = (OutOfMemoryError, VitBatchError)
"""Errors the batcher handles itself (split on OOM; its own errors already name the plugin)."""


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (entry-point plugins + defaults), built on first use."""
    from vitbatch.plugin.manager import get_plugin_manager

    return get_plugin_manager()


def call_first_result(
    caller: pluggy.HookCaller, context: str = "", **kwargs: Any
) -> tuple[Any, str] | None:
    """Call ``caller``'s implementations until one returns non-None.

    :param context: what is being processed (modality, item hashes), for errors.
    :returns: ``(result, plugin_name)`` or ``None`` if every implementation declined.
    :raises PluginCallError: an implementation raised (device OOM passes through
        unchanged so the batcher can split the batch).
    :raises VitBatchError: if a wrapper is registered on this hook (unsupported).
    """
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:
            raise VitBatchError(
                f"plugin {impl.plugin_name!r} registers a wrapper on {caller.name}; "
                "vitbatch calls this hook implementation by implementation and supports no wrappers"
            )
        try:
            result = impl.function(*(kwargs[name] for name in impl.argnames))
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise PluginCallError(
                f"plugin {impl.plugin_name!r} raised {type(exc).__name__} in {caller.name}"
                f"{' for ' + context if context else ''}: {exc}"
            ) from exc
        if result is not None:
            return result, impl.plugin_name
    return None
