"""The step engine: plan → encode through the hooks → validate → cache → assemble.

:class:`VitBatcher` is the object an adapter keeps for the life of its process.
It owns the state that outlives a step (the embedding cache, the offload
bookkeeping, cumulative statistics); everything that can be a pure function
lives in :mod:`vitbatch.core.planner` and :mod:`vitbatch.core.validate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Union

import pluggy
import torch

from vitbatch.core.cache import EmbeddingCache, tensor_bytes
from vitbatch.core.errors import AssemblyError, NoEncoderError, OutOfMemoryError
from vitbatch.core.items import Item, ItemKey, RequestChunk
from vitbatch.core.offload import HostReferenceOffload
from vitbatch.core.planner import Budget, MicroBatch, StepPlan, plan_needed, plan_step
from vitbatch.core.validate import split_encoder_output
from vitbatch.plugin.calls import call_first_result

EncoderOutput = Union[torch.Tensor, Sequence[torch.Tensor]]
EngineEncoder = Callable[[Sequence[Item]], EncoderOutput]
"""The engine's own encoder, wrapped by the adapter: items in, embeddings out
(one concatenated tensor or one tensor per item)."""

DEFAULT_CACHE_BYTES = 4 << 30


@dataclass
class StepStats:
    """What one step did. ``*_seconds`` are host wall-clock times (no device sync)."""

    requests: int = 0
    items: int = 0
    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    deduplicated: int = 0
    encoder_calls: int = 0
    tokens_per_call: list[int] = field(default_factory=list)
    cost_per_call: list[int] = field(default_factory=list)
    oom_splits: int = 0
    plan_seconds: float = 0.0
    encode_seconds: float = 0.0
    assemble_seconds: float = 0.0
    d2h_copies_avoided: int = 0
    d2h_bytes_avoided: int = 0

    def add(self, other: StepStats) -> None:
        """Accumulate ``other`` into ``self`` (for totals over many steps)."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, list):
                mine.extend(getattr(other, f.name))
            else:
                setattr(self, f.name, mine + getattr(other, f.name))


@dataclass
class StepResult:
    """Per request (step order) its chunk embedding, ``None`` where no item overlaps."""

    embeddings: list[torch.Tensor | None]
    stats: StepStats

    def concatenated(self) -> torch.Tensor | None:
        """All requests' rows in step order, the layout SGLang's forward expects."""
        parts = [e for e in self.embeddings if e is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class VitBatcher:
    """Cross-request vision-encoder batching for one engine process.

    :param budget: limits of one encoder call.
    :param cache: embedding cache; a 4 GiB device tier without host tier by default.
    :param plugin_manager: the pluggy manager whose hooks encode and assemble;
        the process-wide one (entry-point plugins + defaults) by default.
    """

    def __init__(
        self,
        budget: Budget | None = None,
        cache: EmbeddingCache | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        if plugin_manager is None:
            from vitbatch.plugin.manager import get_plugin_manager

            plugin_manager = get_plugin_manager()
        self.budget = budget or Budget()
        self.cache = cache if cache is not None else EmbeddingCache(DEFAULT_CACHE_BYTES)
        self.plugin_manager = plugin_manager
        self.offload = HostReferenceOffload()
        self.totals = StepStats()
        self.last_stats = StepStats()
        self._hidden_size: dict[str, int] = {}

    # -- public entry points ---------------------------------------------------
    def run_step(
        self,
        chunks: Sequence[RequestChunk],
        engine_encoder: EngineEncoder | None = None,
    ) -> StepResult:
        """Produce every request's embedding rows for its chunk window.

        :param chunks: all requests of the scheduler step, in step order.
        :param engine_encoder: the engine's encoder, passed to the encode hook.
        """
        started = time.perf_counter()
        plan = plan_step(chunks, self.cache.__contains__, self.budget)
        stats = self._new_stats(plan, len(chunks), time.perf_counter() - started)
        with self.cache.hold(item.key for items in plan.needed for item in items):
            embeddings = self._execute(plan, engine_encoder, stats)
            started = time.perf_counter()
            chunk_embeddings = [
                self._assemble(chunk, items, embeddings) if items else None
                for chunk, items in zip(chunks, plan.needed)
            ]
            stats.assemble_seconds = time.perf_counter() - started
        self._finish(stats)
        return StepResult(chunk_embeddings, stats)

    def encode(
        self,
        items: Sequence[Item],
        engine_encoder: EngineEncoder | None = None,
    ) -> dict[ItemKey, torch.Tensor]:
        """Embeddings of ``items`` (deduplicated, cached, budgeted), without windows.

        For engines that schedule encoder inputs and assemble chunks themselves
        (vLLM). The result has one entry per distinct key.
        """
        started = time.perf_counter()
        plan = plan_needed([items], self.cache.__contains__, self.budget)
        stats = self._new_stats(plan, 1, time.perf_counter() - started)
        with self.cache.hold(item.key for item in items):
            embeddings = self._execute(plan, engine_encoder, stats)
        self._finish(stats)
        return embeddings

    def plan(self, chunks: Sequence[RequestChunk]) -> StepPlan:
        """The plan :meth:`run_step` would execute now (for inspection and tests)."""
        return plan_step(chunks, self.cache.__contains__, self.budget)

    # -- steps -------------------------------------------------------------------
    def _new_stats(self, plan: StepPlan, requests: int, plan_seconds: float) -> StepStats:
        return StepStats(
            requests=requests,
            items=sum(len(items) for items in plan.needed),
            misses=plan.misses,
            deduplicated=plan.deduplicated,
            plan_seconds=plan_seconds,
        )

    def _finish(self, stats: StepStats) -> None:
        offload = self.offload.stats
        stats.d2h_copies_avoided = offload.d2h_copies_avoided - self.totals.d2h_copies_avoided
        stats.d2h_bytes_avoided = offload.d2h_bytes_avoided - self.totals.d2h_bytes_avoided
        self.last_stats = stats
        self.totals.add(stats)

    def _execute(
        self, plan: StepPlan, engine_encoder: EngineEncoder | None, stats: StepStats
    ) -> dict[ItemKey, torch.Tensor]:
        embeddings: dict[ItemKey, torch.Tensor] = {}
        host_hits_before = self.cache.stats.host_hits
        for key in plan.hits:
            cached = self.cache.get(key)
            if cached is None:  # cannot happen while the key is held; never guess
                raise AssertionError(f"planned cache hit {key} vanished")
            embeddings[key] = cached
        stats.hits = len(plan.hits)
        stats.host_hits = self.cache.stats.host_hits - host_hits_before
        started = time.perf_counter()
        for batch in plan.batches:
            for item, embedding in self._encode_with_backoff(batch, engine_encoder, stats):
                embeddings[item.key] = embedding
                if item.cacheable:
                    self.cache.put(item.key, _own_storage(embedding))
        stats.encode_seconds = time.perf_counter() - started
        return embeddings

    def _encode_with_backoff(
        self, batch: MicroBatch, engine_encoder: EngineEncoder | None, stats: StepStats
    ) -> list[tuple[Item, torch.Tensor]]:
        """Encode ``batch``; on device OOM, halve it and retry, down to one item."""
        try:
            return self._encode_once(batch, engine_encoder, stats)
        except OutOfMemoryError:
            if len(batch.items) == 1:
                raise
            stats.oom_splits += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch.items) // 2
            out = []
            for part in (batch.items[:half], batch.items[half:]):
                sub = MicroBatch(batch.modality, batch.group, part)
                out.extend(self._encode_with_backoff(sub, engine_encoder, stats))
            return out

    def _encode_once(
        self, batch: MicroBatch, engine_encoder: EngineEncoder | None, stats: StepStats
    ) -> list[tuple[Item, torch.Tensor]]:
        answer = call_first_result(
            self.plugin_manager.hook.vitbatch_encode_batch,
            context=f"modality {batch.modality!r}, items {[item.hash for item in batch.items]}",
            modality=batch.modality,
            items=batch.items,
            engine_encoder=engine_encoder,
        )
        if answer is None:
            raise NoEncoderError(
                f"no encoder for modality {batch.modality!r}: every vitbatch_encode_batch "
                f"implementation declined items {[item.hash for item in batch.items]} "
                "and the engine gave no encoder of its own"
            )
        output, plugin_name = answer
        per_item = split_encoder_output(
            output,
            batch.items,
            plugin_name=plugin_name,
            modality=batch.modality,
            hidden_size=self._hidden_size.get(batch.modality),
        )
        self._hidden_size.setdefault(batch.modality, per_item[0].shape[-1])
        stats.encoder_calls += 1
        stats.tokens_per_call.append(batch.num_tokens)
        stats.cost_per_call.append(batch.cost)
        return list(zip(batch.items, per_item))

    def _assemble(
        self,
        chunk: RequestChunk,
        items: Sequence[Item],
        embeddings: dict[ItemKey, torch.Tensor],
    ) -> torch.Tensor:
        answer = call_first_result(
            self.plugin_manager.hook.vitbatch_assemble_chunk,
            context=f"request {chunk.request_id!r}, window [{chunk.window.start}, {chunk.window.end})",
            window=chunk.window,
            items=items,
            embeddings=[embeddings[item.key] for item in items],
        )
        expected = sum(rows for item in items for _, _, rows in item.rows_in(chunk.window))
        if answer is None:
            raise AssemblyError(f"no vitbatch_assemble_chunk implementation assembled request {chunk.request_id!r}")
        result, plugin_name = answer
        if not isinstance(result, torch.Tensor) or result.dim() != 2 or result.shape[0] != expected:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise AssemblyError(
                f"assemble plugin {plugin_name!r} returned {got} for request {chunk.request_id!r} "
                f"window [{chunk.window.start}, {chunk.window.end}): expected {expected} rows "
                f"for items {[item.hash for item in items]}"
            )
        return result


def _own_storage(embedding: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes, so the cache's byte count is the truth.

    A per-item slice of a concatenated encoder output would keep the whole
    batch's storage alive for as long as the slice is cached.
    """
    if embedding.untyped_storage().nbytes() > tensor_bytes(embedding):
        return embedding.clone()
    return embedding
