"""``vitbatch info``: what is installed and what would run."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util

import torch

import vitbatch
from vitbatch.plugin.manager import (
    ALLOWLIST_ENV,
    ENTRY_POINT_GROUP,
    allowed_plugin_names,
    make_plugin_manager,
)

ENGINES = {"sglang": "sglang.srt.plugins", "vllm": "vllm.general_plugins"}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def collect_info() -> dict:
    """Everything ``vitbatch info`` prints, as data (tests read this)."""
    engines = {}
    for name, group in ENGINES.items():
        installed = importlib.util.find_spec(name) is not None
        version = (_version(name) or _version(f"{name}-cpu")) if installed else None
        hooked = any(ep.value.startswith("vitbatch.") for ep in metadata.entry_points(group=group))
        engines[name] = {
            "installed": installed,
            "version": version,
            "entry_point": hooked,
            "group": group,
        }
    pm = make_plugin_manager()
    hooks = {}
    for hook_name in sorted(name for name in dir(pm.hook) if name.startswith("vitbatch_")):
        caller = getattr(pm.hook, hook_name)
        hooks[hook_name] = [impl.plugin_name for impl in reversed(caller.get_hookimpls())]
    plugins = []
    for plugin, dist in pm.list_plugin_distinfo():
        name = pm.get_name(plugin)
        plugins.append(
            {
                "name": name,
                "distribution": dist.project_name
                if hasattr(dist, "project_name")
                else dist.metadata["name"],
                "version": dist.version,
                "hooks": sorted(c.name for c in pm.get_hookcallers(plugin) or []),
            }
        )
    return {
        "vitbatch": vitbatch.__version__,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "engines": engines,
        "allowlist": allowed_plugin_names(),
        "hooks": hooks,
        "plugins": plugins,
    }


def print_info() -> None:
    info = collect_info()
    print(
        f"vitbatch {info['vitbatch']}  torch {info['torch']}  device {info['cuda'] or 'cpu only'}"
    )
    for name, engine in info["engines"].items():
        state = f"{engine['version']}" if engine["installed"] else "not installed"
        hook = "entry point registered" if engine["entry_point"] else "no entry point"
        print(f"engine {name}: {state} ({engine['group']}: {hook})")
    allow = info["allowlist"]
    print(
        f"{ALLOWLIST_ENV}: "
        + ("unset (all plugins load)" if allow is None else ",".join(allow) or "(none)")
    )
    print(
        f"plugins from entry-point group '{ENTRY_POINT_GROUP}':"
        + ("" if info["plugins"] else " none")
    )
    for plugin in info["plugins"]:
        print(
            f"  {plugin['name']} ({plugin['distribution']} {plugin['version']}): "
            f"{', '.join(plugin['hooks'])}"
        )
    print("hook implementations, in calling order:")
    for hook, impls in info["hooks"].items():
        print(f"  {hook}: {', '.join(impls)}")
