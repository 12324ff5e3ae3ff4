"""The start-up check, generated from the registrations of this package's accessors."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from vitbatch.adapters.sglang.surface.registry import ARGS, CACHE_FIELDS, MM_CACHE, Name
from vitbatch.adapters.sglang.surface.releases import names, sglang_version
from vitbatch.adapters.sglang.surface.step import new_embedding_cache


def missing_piece(surface: Sequence[Name] | None = None) -> str | None:
    """The first missing name as ``module.attribute``, or None when the whole surface is there
    (default: every required name, :func:`names`)."""
    if surface is None:
        try:
            surface = names("required")
        except Exception:  # noqa: BLE001 - a probe that cannot run: no usable server_args
            return ARGS
    for module_name, attribute in surface:
        try:
            target: Any = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - any import failure means the piece is unusable
            return module_name
        for part in attribute.split(".") if attribute else ():
            if not hasattr(target, part):
                return f"{module_name}.{attribute}"
            target = getattr(target, part)
    return None


def embedding_cache_problem() -> str | None:
    """The first instance attribute the adapter reads that a ``MultiModalStaticCache``
    lacks (checked on a throwaway instance), or None."""
    instance = new_embedding_cache(0)
    for attribute in CACHE_FIELDS:
        if not hasattr(instance, attribute):
            return f"{MM_CACHE}.MultiModalStaticCache().{attribute}"
    return None


def prefetch_problem() -> str | None:
    """One log line naming what the encoder prefetch lacks in this SGLang, or None."""
    missing = missing_piece(names("prefetch"))
    if missing is None:
        return None
    return (
        f"vitbatch: the encoder prefetch is off: SGLang {sglang_version()} lacks {missing}; "
        "vitbatch's step still serves every multimodal step"
    )


def surface_problem(surface: Sequence[Name] | None = None) -> str | None:
    """One log line naming the missing piece and the SGLang version, or None when all is there
    (default: every required name and the embedding cache's fields)."""
    missing = missing_piece(surface)
    if missing is None and surface is None:
        try:
            missing = embedding_cache_problem()
        except Exception as error:  # noqa: BLE001 - an unusable cache class is a missing piece
            missing = f"a usable MultiModalStaticCache ({error})"
    if missing is None:
        return None
    return (
        f"vitbatch is off: SGLang {sglang_version()} lacks {missing}, which the adapter needs "
        "(supported: SGLang 0.5.17 to 0.5.23); SGLang's native multimodal path serves every step"
    )
