"""Where the installed SGLang release keeps things, and the names as that release spells them.

Supported: SGLang 0.5.17 to 0.5.23 (docs/sglang.md, "Supported versions"). Where a
supported release keeps a required name somewhere else (the step's module, the
argument-resolution method), the name is written with a placeholder (``{step}``,
``{resolution}``) that a probe here fills in: one accessor, never a copy per release.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from functools import cache
from importlib import metadata
from typing import Any

from vitbatch.adapters.sglang.surface.registry import (
    ARGS,
    MM_SCHEDULE,
    MM_UTILS,
    PARTS,
    Name,
    _module,
)


def _mm() -> Any:
    """The module that holds SGLang's multimodal step in the installed release."""
    return _module(step_module_name())


@cache
def step_module_name() -> str:
    """Where SGLang keeps its multimodal step (``get_embedding_and_mask``,
    ``_get_chunked_prefill_embedding``, ``embedding_cache``...): ``mm_schedule`` where that
    module exists (0.5.18+), else ``mm_utils`` (0.5.17, before the step was split out; there
    ``mm_utils`` defines the same functions). Only the module's presence is probed: whether
    it has every name is the start-up check's job."""
    try:
        split_out = importlib.util.find_spec(MM_SCHEDULE) is not None
    except ImportError:  # no SGLang at all: the check then names the newer module as missing
        split_out = True
    return MM_SCHEDULE if split_out else MM_UTILS


@cache
def resolution_method() -> str:
    """Where SGLang resolves its arguments before any model or process starts:
    ``ServerArgs.resolve_once`` (0.5.19+, where constructing ``ServerArgs`` leaves them
    unresolved), else the dataclass's ``__post_init__`` (0.5.17, 0.5.18: constructing
    resolves them). Every launch route goes through it."""
    server_args = _module(ARGS).ServerArgs
    return "resolve_once" if hasattr(server_args, "resolve_once") else "__post_init__"


PROBES: dict[str, Callable[[], str]] = {"step": step_module_name, "resolution": resolution_method}


def _filled(text: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: PROBES[match.group(1)](), text)


def names(part: str = "required") -> tuple[Name, ...]:
    """The SGLang names one part touches in the installed release (placeholders filled in),
    each once, in registration order."""
    return tuple(
        dict.fromkeys(
            (_filled(module), _filled(attribute) if attribute else None)
            for registered in PARTS[part].values()
            for module, attribute in registered
        )
    )


def sglang_version() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return "unknown"
