"""The registry of SGLang names: which accessor touches which name, for which part.

Why: these names are not SGLang's public API and move between releases. Each is
touched by exactly one accessor of this package, and each accessor is registered with the
names it needs (:func:`needs`); :func:`~.releases.names`, which the start-up check walks,
is generated from those registrations, so the check cannot drift from the code. Names
every supported release has are required; ``optional`` ones are feature probes for what
differs inside that range, each named after what SGLang does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Name = tuple[str, "str | None"]  # (module, dotted attribute or None: "the module imports")

MM_SCHEDULE = "sglang.srt.managers.mm_schedule"  # the multimodal step, 0.5.18+
MM_UTILS = "sglang.srt.managers.mm_utils"  # the multimodal step, 0.5.17 (and the embed routine)
STEP = "{step}"  # whichever of the two holds the step: step_module_name()
MM_CACHE = "sglang.srt.mem_cache.multimodal_cache"
HOOKS = "sglang.srt.plugins.hook_registry"
ITEM = "sglang.srt.managers.schedule_batch"
ARGS = "sglang.srt.server_args"
SCHEDULER = "sglang.srt.managers.scheduler"

# part -> accessor -> names: "required" (every supported release; the start-up check),
# "optional" (probes and best-effort reads that cope without), "bench" (vitbatch bench only),
# "prefetch" (the encoder prefetch's own check, made only when it is switched on)
PARTS: dict[str, dict[str, tuple[Name, ...]]] = {
    "required": {},
    "optional": {},
    "bench": {},
    "prefetch": {},
}
CACHE_FIELDS: list[str] = []  # instance attributes of MultiModalStaticCache, checked live


def needs(
    *names: str, part: str = "required", cache_fields: Sequence[str] = ()
) -> Callable[[F], F]:
    """Register an accessor with the SGLang names (``"module:Attr.path"``) it touches; a
    ``{probe}`` placeholder is filled in by that probe when the names are read
    (:func:`.releases.names`)."""

    def record(accessor: F) -> F:
        parsed = tuple((m, a or None) for m, _, a in (name.partition(":") for name in names))
        PARTS[part][accessor.__name__] = parsed
        CACHE_FIELDS.extend(f for f in cache_fields if f not in CACHE_FIELDS)
        return accessor

    return record


def _module(name: str) -> Any:
    return importlib.import_module(name)
