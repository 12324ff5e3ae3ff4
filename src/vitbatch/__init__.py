"""vitbatch: cross-request vision-encoder batching for SGLang and vLLM.

A plugin author writes ``from vitbatch import hookimpl``.
"""

from vitbatch.core import (
    Budget,
    EmbeddingCache,
    HostReferenceOffload,
    Item,
    ItemKey,
    RequestChunk,
    Span,
    StepResult,
    StepStats,
    VitBatcher,
    Window,
)
from vitbatch.plugin.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "EmbeddingCache",
    "HostReferenceOffload",
    "Item",
    "ItemKey",
    "RequestChunk",
    "Span",
    "StepResult",
    "StepStats",
    "VitBatcher",
    "Window",
    "__version__",
    "hookimpl",
]
