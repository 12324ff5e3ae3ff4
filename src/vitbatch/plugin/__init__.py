"""The pluggy layer: hook specifications, default implementations, the manager."""

from vitbatch.plugin.hookspecs import hookimpl, hookspec
from vitbatch.plugin.manager import (
    ALLOWLIST_ENV,
    ENTRY_POINT_GROUP,
    get_plugin_manager,
    make_plugin_manager,
)

__all__ = [
    "ALLOWLIST_ENV",
    "ENTRY_POINT_GROUP",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "make_plugin_manager",
]
