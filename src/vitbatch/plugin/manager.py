"""The one place that builds vitbatch's plugin manager.

Order matters: specs first, then third-party plugins from the ``vitbatch``
entry-point group, then the defaults, then ``check_pending()`` so a plugin that
misspells a hook name fails at start-up instead of silently never being called.
Nothing is loaded at import time; :func:`get_plugin_manager` builds the shared
manager on first use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import pluggy

from vitbatch.plugin import defaults, hookspecs

ENTRY_POINT_GROUP = "vitbatch"
ALLOWLIST_ENV = "VITBATCH_PLUGINS"
"""Comma-separated entry-point names to load. Unset: load all; empty: load none
(mirrors ``VLLM_PLUGINS`` / ``SGLANG_PLUGINS``)."""

DEFAULTS_NAME = "vitbatch.defaults"


def allowed_plugin_names() -> list[str] | None:
    """Names allowed by ``VITBATCH_PLUGINS``, or ``None`` when every plugin may load."""
    value = os.environ.get(ALLOWLIST_ENV)
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def make_plugin_manager(
    load_entry_points: bool = True, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """Build a fresh plugin manager.

    :param load_entry_points: load third-party plugins from the ``vitbatch``
        entry-point group (filtered by ``VITBATCH_PLUGINS``).
    :param plugins: extra plugin objects to register before the defaults
        (tests, ``vitbatch bench``'s embedded encoder).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        allowed = allowed_plugin_names()
        if allowed is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            for name in allowed:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    for plugin in plugins:
        pm.register(plugin)
    pm.register(defaults, name=DEFAULTS_NAME)
    pm.check_pending()
    return pm


@functools.lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager with entry-point plugins, built on first use."""
    return make_plugin_manager()
