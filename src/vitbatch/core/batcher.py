"""The step engine: plan → encode through the hooks → validate → cache → assemble.

:class:`VitBatcher` is the object an adapter keeps for the life of its process.
It owns the state that outlives a step (the embedding cache, the offload
bookkeeping, cumulative statistics); everything that can be a pure function
lives in :mod:`vitbatch.core.planner` and :mod:`vitbatch.core.validate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import pluggy
import torch

from vitbatch.core.agreement import (
    Agree,
    AgreedFallbackError,
    CapacityProbe,
    read_start,
    start_flags,
)
from vitbatch.core.cache import EmbeddingCache, tensor_bytes
from vitbatch.core.errors import AssemblyError, NoEncoderError, OutOfMemoryError
from vitbatch.core.hooks import call_first_result, default_plugin_manager
from vitbatch.core.items import EncoderOutput, EngineEncoder, Item, ItemKey, RequestChunk
from vitbatch.core.offload import HostReferenceOffload
from vitbatch.core.planner import Budget, MicroBatch, StepPlan, plan_needed, plan_step
from vitbatch.core.stats import StepStats, Totals
from vitbatch.core.validate import check_finite, split_encoder_output

__all__ = [
    "EncoderOutput",
    "EngineEncoder",
    "StepObserver",
    "StepResult",
    "StepStats",
    "VitBatcher",
]

DEFAULT_CACHE_BYTES = 4 << 30


class StepObserver(Protocol):
    """Something that watches a batcher (a metrics exporter): told after every step."""

    def on_step(self, batcher: VitBatcher, stats: StepStats) -> None: ...

    def on_fallback(self, batcher: VitBatcher, reason: str) -> None: ...


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
    :param hidden_size: the embedding width the engine's model produces (one int
        for every modality, or per modality). Every encoder output is checked
        against it. Adapters pass what the engine's model config says; where it
        is unknown, the width is learned, but only once two encoder calls agree:
        until then nothing is cached, so one malformed call cannot poison a
        modality for the life of the process.
    :param check_finite: also reject embeddings holding NaN/Inf (a debugging aid:
        it reads every value, so it costs a device sync per call).
    :param agree: at tensor-parallel world size > 1, the MAX all-reduce over the
        ranks sharing the vision tower (:func:`vitbatch.core.agreement.group_agree`):
        every decision that changes the sequence of encoder calls is then agreed
        (see :mod:`vitbatch.core.agreement`). ``None`` (world size 1): no agreement.
    :param capacity: optional probe of the most cost one call can take now on this
        rank; with ``agree`` the smallest over the ranks caps the step's calls.
    """

    def __init__(
        self,
        budget: Budget | None = None,
        cache: EmbeddingCache | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        *,
        hidden_size: int | Mapping[str, int] | None = None,
        check_finite: bool = False,
        agree: Agree | None = None,
        capacity: CapacityProbe | None = None,
    ) -> None:
        self.budget = budget or Budget()
        self.cache = cache if cache is not None else EmbeddingCache(DEFAULT_CACHE_BYTES)
        self.plugin_manager = (
            plugin_manager if plugin_manager is not None else default_plugin_manager()
        )
        self.offload = HostReferenceOffload()
        self.check_finite = check_finite
        self.agree = agree
        self.capacity = capacity
        self.totals = Totals()
        self.last_stats = StepStats()
        self.observers: list[StepObserver] = []
        self._default_width: int | None = None
        self._widths: dict[str, int] = {}
        self._candidates: dict[str, tuple[int, int]] = {}  # modality -> (width, agreeing calls)
        self.set_hidden_size(hidden_size)

    def set_hidden_size(self, hidden_size: int | Mapping[str, int] | None) -> None:
        """Set the engine's embedding width (see the class parameter), e.g. once the
        adapter first sees the engine's model. Widths learned so far are dropped."""
        if hidden_size is not None and not isinstance(hidden_size, Mapping):
            _check_width("hidden_size", hidden_size)
            self._default_width, self._widths = hidden_size, {}
        else:
            widths = dict(hidden_size or {})
            for modality, width in widths.items():
                _check_width(f"hidden_size[{modality!r}]", width)
            self._default_width, self._widths = None, widths
        self._candidates.clear()

    def expected_hidden_size(self, modality: str) -> int | None:
        """The width outputs of ``modality`` must have: configured, or learned and confirmed."""
        return self._widths.get(modality, self._default_width)

    def note_fallback(self, reason: str) -> None:
        """Count a step the adapter served with the engine's own path (``reason``: a short tag)."""
        self.totals.note_fallback(reason)
        for observer in self.observers:
            observer.on_fallback(self, reason)

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
        if self.agree is not None:
            return self._run_step_agreed(chunks, engine_encoder, self.agree)
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

    def _run_step_agreed(
        self, chunks: Sequence[RequestChunk], engine_encoder: EngineEncoder | None, agree: Agree
    ) -> StepResult:
        """:meth:`run_step` at world size > 1 (see :meth:`_agreed_embeddings`)."""
        stats, plan, embeddings, failure = self._agreed_embeddings(
            lambda is_cached, budget: plan_step(chunks, is_cached, budget),
            len(chunks),
            engine_encoder,
            agree,
        )
        chunk_embeddings: list[torch.Tensor | None] = []
        if failure is None:
            started = time.perf_counter()
            try:
                chunk_embeddings = [
                    self._assemble(chunk, items, embeddings) if items else None
                    for chunk, items in zip(chunks, plan.needed)
                ]
            except Exception as error:  # noqa: BLE001 - agreed below, never acted on alone
                failure = error
            stats.assemble_seconds = time.perf_counter() - started
        self._agree_outcome(agree, failure, stats)
        return StepResult(chunk_embeddings, stats)

    def _agreed_embeddings(
        self,
        planner: Callable[[Callable[[ItemKey], bool], Budget], StepPlan],
        requests: int,
        engine_encoder: EngineEncoder | None,
        agree: Agree,
    ) -> tuple[StepStats, StepPlan, dict[ItemKey, torch.Tensor], Exception | None]:
        """Agree what to encode and how big a call may be, then make every planned
        call — also after a failure, so the call sequence stays the same on every rank."""
        started = time.perf_counter()
        local = planner(self.cache.__contains__, self.budget)
        keys = list(dict.fromkeys(item.key for items in local.needed for item in items))
        usable: dict[ItemKey, torch.Tensor] = {}
        host_hits_before = self.cache.stats.host_hits
        with self.cache.hold(keys):
            for key in local.hits:
                try:
                    cached = self.cache.get(key)
                except Exception:  # noqa: BLE001 - a failed restore is a miss, agreed below
                    cached = None
                if cached is not None:
                    usable[key] = cached
            capacity = self.capacity() if self.capacity is not None else None
            to_encode, agreed_capacity = read_start(
                agree(start_flags(keys, set(usable), capacity)), keys
            )
            budget = self.budget
            if agreed_capacity is not None and (
                budget.max_cost is None or agreed_capacity < budget.max_cost
            ):
                budget = Budget(max(1, agreed_capacity), budget.max_items)
            plan = planner(lambda key: key not in to_encode, budget)
            stats = self._new_stats(plan, requests, time.perf_counter() - started)
            stats.agreements = 1
            stats.hits = len(plan.hits)
            stats.host_hits = self.cache.stats.host_hits - host_hits_before
            embeddings = {key: usable[key] for key in plan.hits}
            failure: Exception | None = None
            started = time.perf_counter()
            for batch in plan.batches:
                try:
                    encoded = self._encode_once(batch, engine_encoder, stats)
                except Exception as error:  # noqa: BLE001 - agreed after the calls
                    failure = failure or error
                    continue
                for item, embedding in encoded:
                    embeddings[item.key] = embedding
                    if item.cacheable and self.expected_hidden_size(item.modality) is not None:
                        self.cache.put(item.key, _own_storage(embedding))
            stats.encode_seconds = time.perf_counter() - started
        return stats, plan, embeddings, failure

    def _agree_outcome(self, agree: Agree, failure: Exception | None, stats: StepStats) -> None:
        """Agreement 2: if any rank failed, every rank raises (and the adapter falls back)."""
        stats.agreements += 1
        if agree([0 if failure is None else 1])[0]:
            if failure is not None:
                raise failure
            raise AgreedFallbackError(
                "another tensor-parallel rank failed this step; every rank falls back together"
            )
        self._finish(stats)

    def encode(
        self,
        items: Sequence[Item],
        engine_encoder: EngineEncoder | None = None,
    ) -> dict[ItemKey, torch.Tensor]:
        """Embeddings of ``items`` (deduplicated, cached, budgeted), without windows.

        For engines that schedule encoder inputs and assemble chunks themselves
        (vLLM). The result has one entry per distinct key.
        """
        if self.agree is not None:
            stats, _, embeddings, failure = self._agreed_embeddings(
                lambda is_cached, budget: plan_needed([items], is_cached, budget),
                1,
                engine_encoder,
                self.agree,
            )
            self._agree_outcome(self.agree, failure, stats)
            return embeddings
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
        for observer in self.observers:
            observer.on_step(self, stats)

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
                if item.cacheable and self.expected_hidden_size(item.modality) is not None:
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
        started = time.perf_counter()
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
            hidden_size=self.expected_hidden_size(batch.modality),
        )
        if self.check_finite:
            check_finite(per_item, batch.items, plugin_name=plugin_name, modality=batch.modality)
        self._learn_width(batch.modality, per_item[0].shape[-1])
        stats.encoder_calls += 1
        stats.tokens_per_call.append(batch.num_tokens)
        stats.cost_per_call.append(batch.cost)
        stats.items_per_call.append(len(batch.items))
        stats.seconds_per_call.append(time.perf_counter() - started)
        return list(zip(batch.items, per_item))

    def _learn_width(self, modality: str, width: int) -> None:
        """Confirm an unconfigured modality's width once two calls agree on it."""
        if self.expected_hidden_size(modality) is not None:
            return
        seen, calls = self._candidates.get(modality, (width, 0))
        calls = calls + 1 if seen == width else 1
        if calls >= 2:
            self._widths[modality] = width
            self._candidates.pop(modality, None)
        else:
            self._candidates[modality] = (width, calls)

    def _assemble(
        self,
        chunk: RequestChunk,
        items: Sequence[Item],
        embeddings: dict[ItemKey, torch.Tensor],
    ) -> torch.Tensor:
        answer = call_first_result(
            self.plugin_manager.hook.vitbatch_assemble_chunk,
            context=(
                f"request {chunk.request_id!r}, window [{chunk.window.start}, {chunk.window.end})"
            ),
            window=chunk.window,
            items=items,
            embeddings=[embeddings[item.key] for item in items],
        )
        expected = sum(rows for item in items for _, _, rows in item.rows_in(chunk.window))
        if answer is None:
            raise AssemblyError(
                f"no vitbatch_assemble_chunk implementation assembled request {chunk.request_id!r}"
            )
        result, plugin_name = answer
        if not isinstance(result, torch.Tensor) or result.dim() != 2 or result.shape[0] != expected:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise AssemblyError(
                f"assemble plugin {plugin_name!r} returned {got} for request {chunk.request_id!r} "
                f"window [{chunk.window.start}, {chunk.window.end}): expected {expected} rows "
                f"for items {[item.hash for item in items]}"
            )
        return result


def _check_width(name: str, width: object) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ValueError(f"VitBatcher {name} must be a positive int, got {width!r}")


def _own_storage(embedding: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes, so the cache's byte count is the truth.

    A per-item slice of a concatenated encoder output would keep the whole
    batch's storage alive for as long as the slice is cached.
    """
    if embedding.untyped_storage().nbytes() > tensor_bytes(embedding):
        return embedding.clone()
    return embedding
