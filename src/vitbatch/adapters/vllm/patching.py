"""The one way vitbatch wraps an engine method: once, under a lock, undoably.

Engine-free: :mod:`.surface` names the vLLM methods and calls these with the
owning class. A wrapper carries the method it replaced as
``__vitbatch_original__``, which is how a second install is recognised (and
what tests call to run the engine's own code).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()

#: ``factory(original) -> wrapper``; the wrapper receives ``self`` first, like the original.
Factory = Callable[[Callable[..., Any]], Callable[..., Any]]


def original_of(method: Any) -> Any:
    """The engine's method under vitbatch's wrapper, or ``None`` if ``method`` is not one."""
    return getattr(method, "__vitbatch_original__", None)


def wrap(owner: type, name: str, factory: Factory) -> None:
    """Replace ``owner.name`` by ``factory(owner.name)`` unless vitbatch already did."""
    with _lock:
        current = getattr(owner, name)
        if original_of(current) is not None:
            return
        wrapper = functools.wraps(current)(factory(current))
        wrapper.__vitbatch_original__ = current
        setattr(owner, name, wrapper)


def unwrap(owner: type, name: str) -> None:
    """Put the engine's own ``owner.name`` back (tests)."""
    with _lock:
        original = original_of(getattr(owner, name))
        if original is not None:
            setattr(owner, name, original)
