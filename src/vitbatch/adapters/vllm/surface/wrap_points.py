"""The vLLM methods vitbatch wraps: the config, the scheduler, both model runners'
encoder paths, and their ``execute_model`` (where the prefetch launches)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from vitbatch.adapters.vllm import patching
from vitbatch.adapters.vllm.surface.completeness import ENCODER_RUNNER, REGISTRY, SCHEDULER, V1, V2


@dataclass(frozen=True)
class WrapPoint:
    """A vLLM method vitbatch wraps."""

    module: str
    owner: str
    method: str

    def owner_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.owner)


def _point(part: str, spec: str) -> WrapPoint:
    REGISTRY.declare(part, [spec])
    module, path = spec.split(":")
    owner, method = path.split(".")
    return WrapPoint(module, owner, method)


CREATE_ENGINE_CONFIG = _point("config", "vllm.engine.arg_utils:EngineArgs.create_engine_config")
SCHEDULER_INIT = _point("scheduler", f"{SCHEDULER}.__init__")
SCHEDULER_SCHEDULE = _point("scheduler", f"{SCHEDULER}.schedule")
V1_UPDATE_STATES = _point("runner_v1", f"{V1}._update_states")
V1_EXECUTE_MM_ENCODER = _point("runner_v1", f"{V1}._execute_mm_encoder")
V2_FREE_STATES = _point("runner_v2", f"{V2}.free_states")
V2_PREPARE_MM_INPUTS = _point("runner_v2", f"{ENCODER_RUNNER}.prepare_mm_inputs")
V2_EXECUTE_MM_ENCODER = _point("runner_v2", f"{ENCODER_RUNNER}.execute_mm_encoder")
V1_EXECUTE_MODEL = _point("runner_v1", f"{V1}.execute_model")
V2_EXECUTE_MODEL = _point("runner_v2", f"{V2}.execute_model")


def wrap(point: WrapPoint, factory: patching.Factory) -> None:
    patching.wrap(point.owner_class(), point.method, factory)


def unwrap(point: WrapPoint) -> None:
    patching.unwrap(point.owner_class(), point.method)
