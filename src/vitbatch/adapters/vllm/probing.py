"""The engine names an adapter declares, and the start-up probe over them. Engine-free.

:mod:`.surface` declares each vLLM name next to the accessor that uses it
(:meth:`Registry.uses`); :func:`probe` checks the declared list against the
installed engine, so the check is generated from the code that needs it.

A name is ``module:path``: ``path`` is ``Owner.name`` (a class or module
attribute), ``Owner().field`` (an instance attribute: present when the class
or its bases name it in their code, since it exists only on instances) or a
plain ``name``. A trailing ``?`` marks a name used where present (one release
added it): declared, listed, not probed.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class EngineName:
    part: str
    module: str
    path: str
    optional: bool = False

    def __str__(self) -> str:
        return f"{self.module}.{self.path}"


class Registry:
    """The names one adapter relies on, in declaration order."""

    def __init__(self) -> None:
        self.names: list[EngineName] = []

    def declare(self, parts: str | tuple[str, ...], specs: Iterable[str]) -> None:
        for part in (parts,) if isinstance(parts, str) else parts:
            for spec in specs:
                module, path = spec.split(":")
                name = EngineName(part, module, path.rstrip("?"), path.endswith("?"))
                if name not in self.names:
                    self.names.append(name)

    def uses(self, parts: str | tuple[str, ...], *specs: str) -> Callable[[F], F]:
        """Decorator: the accessor below relies on ``specs`` (for ``parts``)."""

        def declare(accessor: F) -> F:
            self.declare(parts, specs)
            return accessor

        return declare


@dataclass(frozen=True)
class SurfaceReport:
    """What is missing, per part; empty tuples where a part is complete."""

    vllm_version: str
    missing: dict[str, tuple[str, ...]]

    def ok(self, part: str) -> bool:
        return not self.missing.get(part)

    def describe(self, part: str) -> str:
        return (
            f"vLLM {self.vllm_version} lacks {', '.join(self.missing[part])} "
            f"(needed for vitbatch's {part.replace('_', ' ')})"
        )


def _code_names(cls: type) -> set[str]:
    """Attribute names the functions of ``cls`` and its bases mention."""
    found: set[str] = set()

    def walk(code: types.CodeType) -> None:
        found.update(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)

    for klass in cls.__mro__:
        for value in vars(klass).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            code = getattr(value, "__code__", None)
            if code is not None:
                walk(code)
    return found


def missing_reason(name: EngineName) -> str | None:
    """Why ``name`` is absent (as the report says it), or ``None`` when present."""
    try:
        owner: Any = importlib.import_module(name.module)
    except Exception as error:  # noqa: BLE001 - any import failure means "absent here"
        return f"{name.module} ({type(error).__name__})"
    *owners, last = name.path.split(".")
    for step in owners:
        owner = getattr(owner, step.removesuffix("()"), None)
        if owner is None:
            return f"{name.module}.{step.removesuffix('()')}"
        if step.endswith("()"):
            present = (
                hasattr(owner, last)
                or last in getattr(owner, "__dataclass_fields__", {})
                or last in _code_names(owner)
            )
            return None if present else str(name)
    return None if hasattr(owner, last) else str(name)


def probe(version: str, registry: Registry, parts: Iterable[str]) -> SurfaceReport:
    """Probe every required name of ``parts``."""
    missing: dict[str, list[str]] = {part: [] for part in parts}
    for name in registry.names:
        if name.part in missing and not name.optional:
            why = missing_reason(name)
            if why is not None and why not in missing[name.part]:
                missing[name.part].append(why)
    return SurfaceReport(version, {part: tuple(found) for part, found in missing.items()})
