"""Engine-agnostic core: items, planning, caching, offload, the step engine. Torch only."""

from vitbatch.core.batcher import StepObserver, StepResult, VitBatcher
from vitbatch.core.cache import CacheStats, DeviceTier, EmbeddingCache
from vitbatch.core.errors import (
    AssemblyError,
    EncoderOutputError,
    NoEncoderError,
    PluginCallError,
    VitBatchError,
)
from vitbatch.core.items import (
    EncoderOutput,
    EngineEncoder,
    Item,
    ItemKey,
    RequestChunk,
    Span,
    Window,
)
from vitbatch.core.offload import HostReferenceOffload, OffloadStats
from vitbatch.core.planner import (
    Budget,
    MicroBatch,
    StepPlan,
    plan_needed,
    plan_step,
    split_into_batches,
)
from vitbatch.core.stats import Histogram, StepStats, Totals

__all__ = [
    "AssemblyError",
    "Budget",
    "CacheStats",
    "DeviceTier",
    "EmbeddingCache",
    "EncoderOutput",
    "EncoderOutputError",
    "EngineEncoder",
    "Histogram",
    "HostReferenceOffload",
    "Item",
    "ItemKey",
    "MicroBatch",
    "NoEncoderError",
    "OffloadStats",
    "PluginCallError",
    "RequestChunk",
    "Span",
    "StepObserver",
    "StepPlan",
    "StepResult",
    "StepStats",
    "Totals",
    "VitBatchError",
    "VitBatcher",
    "Window",
    "plan_needed",
    "plan_step",
    "split_into_batches",
]
