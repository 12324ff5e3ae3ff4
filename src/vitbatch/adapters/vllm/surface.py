"""Every vLLM name vitbatch relies on, in one place, checked before vitbatch switches on.

vLLM's scheduler and model runners have no public plugin API for encoder
batching, so the adapter wraps private methods and reads private attributes.
They move between releases. Listing them here means one check, at start-up,
names exactly what a new (or old) vLLM lacks, and vitbatch stays off with one
log line instead of failing in the middle of a step. Feature probes, not
version numbers: a part that is present is used, whatever the version.

Three parts, each checked on its own:

* ``scheduler`` - without it vitbatch cannot run at all;
* ``runner_v1`` - ``GPUModelRunner`` of ``vllm/v1/worker/gpu_model_runner.py``
  (CPU, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``);
* ``runner_v2`` - Model Runner V2 (``vllm/v1/worker/gpu/``), the GPU default.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

#: module -> class -> methods the adapter wraps or calls (``None``: the module attribute itself).
SURFACE: dict[str, dict[str, dict[str | None, tuple[str, ...]]]] = {
    "scheduler": {
        "vllm.v1.core.sched.scheduler": {"Scheduler": ("__init__", "schedule")},
        "vllm.v1.core.encoder_cache_manager": {
            "EncoderCacheManager": (
                "can_allocate",
                "allocate",
                "check_and_update_cache",
                "get_freed_mm_hashes",
                "reset",
            ),
        },
    },
    "runner_v1": {
        "vllm.v1.worker.gpu_model_runner": {
            "GPUModelRunner": (
                "_update_states",
                "_execute_mm_encoder",
                "_batch_mm_inputs_from_scheduler",
            ),
        },
        "vllm.multimodal.utils": {None: ("group_and_batch_mm_kwargs",)},
        "vllm.v1.worker.utils": {None: ("sanity_check_mm_encoder_outputs",)},
    },
    "runner_v2": {
        "vllm.v1.worker.gpu.model_runner": {"GPUModelRunner": ("free_states",)},
        "vllm.v1.worker.gpu.mm.encoder_runner": {
            "EncoderRunner": ("prepare_mm_inputs", "execute_mm_encoder"),
        },
    },
}

#: Attributes of a fresh ``EncoderCacheManager`` the manager subclass reads and writes.
MANAGER_ATTRIBUTES = (
    "cache_size",
    "num_free_slots",
    "num_freeable_slots",
    "cached",
    "freeable",
    "freed",
)


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


def _probe_part(modules: dict[str, dict[str | None, tuple[str, ...]]]) -> list[str]:
    missing: list[str] = []
    for module_name, owners in modules.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure means "absent here"
            missing.append(f"{module_name} ({type(error).__name__})")
            continue
        for owner_name, names in owners.items():
            owner = module if owner_name is None else getattr(module, owner_name, None)
            if owner is None:
                missing.append(f"{module_name}.{owner_name}")
                continue
            prefix = module_name if owner_name is None else f"{module_name}.{owner_name}"
            missing.extend(f"{prefix}.{name}" for name in names if not hasattr(owner, name))
    return missing


@functools.lru_cache(maxsize=1)
def check() -> SurfaceReport:
    """Probe the installed vLLM once per process."""
    try:
        import vllm

        version = str(getattr(vllm, "__version__", "?"))
    except Exception:  # noqa: BLE001
        version = "(not importable)"
    missing = {part: tuple(_probe_part(modules)) for part, modules in SURFACE.items()}
    if not missing["scheduler"]:
        from vllm.v1.core.encoder_cache_manager import EncoderCacheManager

        manager = EncoderCacheManager(cache_size=0)
        missing["scheduler"] = tuple(
            f"EncoderCacheManager().{name}"
            for name in MANAGER_ATTRIBUTES
            if not hasattr(manager, name)
        )
    return SurfaceReport(version, missing)
