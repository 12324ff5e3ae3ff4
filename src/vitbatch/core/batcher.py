"""The step engine: plan → encode through the hooks → validate → cache → assemble.

:class:`VitBatcher` is the object an adapter keeps for the life of its process.
It owns the state that outlives a step (the embedding cache, the output
signatures, cumulative statistics); everything that can be a pure function
lives in :mod:`vitbatch.core.planner` and :mod:`vitbatch.core.validate`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy
import torch

from vitbatch.core.agreement import Agree, Agreement, CapacityProbe, GroupAgreement, LocalAgreement
from vitbatch.core.cache import EmbeddingCache, tensor_bytes
from vitbatch.core.calls import Encoded, assemble_pieces, encode_batch, join_pieces
from vitbatch.core.errors import (
    EncoderOutputError,
    OutOfMemoryError,
)
from vitbatch.core.hooks import default_plugin_manager
from vitbatch.core.items import EncoderOutput, EngineEncoder, Item, ItemKey, RequestChunk
from vitbatch.core.offload import HostReferenceOffload
from vitbatch.core.planner import Budget, MicroBatch, StepPlan, plan_needed, plan_step
from vitbatch.core.signature import OutputSignatures, Signature, Verdict
from vitbatch.core.stats import StepStats, Totals

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
    """Per request (step order) its chunk rows, as pieces and as one tensor.

    ``pieces[i]`` is request ``i``'s rows as tensors to be joined in order (views of
    the items' embeddings with the default assembly, the assembly plugin's one
    tensor otherwise; empty where no item overlaps the window): an adapter that
    concatenates the whole step anyway joins these, copying every row once.
    ``embeddings[i]`` is the same rows as one tensor (``None`` where no item
    overlaps), joined on first access: a single piece as is, else one ``torch.cat``.
    """

    pieces: list[list[torch.Tensor]]
    stats: StepStats

    @functools.cached_property
    def embeddings(self) -> list[torch.Tensor | None]:
        return [join_pieces(pieces) if pieces else None for pieces in self.pieces]


class VitBatcher:
    """Cross-request vision-encoder batching for one engine process.

    :param budget: limits of one encoder call.
    :param cache: embedding cache; a 4 GiB device tier without host tier by default.
    :param plugin_manager: the pluggy manager whose hooks encode and assemble;
        the process-wide one (entry-point plugins + defaults) by default.
    :param hidden_size: the embedding width the engine's model produces (one int
        for every modality, or per modality). Every encoder output is checked
        against it. Adapters pass what the engine's model config says.
    :param dtype: the embedding dtype the engine's encoder produces (one, or per
        modality); checked like ``hidden_size``. Where either is unknown it is
        learned (:mod:`vitbatch.core.signature`): trusted once two calls in a row
        agree, nothing cached before that, and replaced when more calls in a row
        agree on another one, so one malformed call can neither poison a
        modality nor lock it out for good.
    :param check_finite: also reject embeddings holding NaN/Inf (a debugging aid:
        it reads every value, so it costs a device sync per call).
    :param agree: at tensor-parallel world size > 1, the MAX all-reduce over the
        ranks sharing the vision tower (:func:`vitbatch.core.agreement.group_agree`):
        every decision that changes the sequence of encoder calls is then agreed
        (see :mod:`vitbatch.core.agreement`). ``None`` (world size 1): no agreement.
    :param capacity: optional probe of the most cost one call can take now on this
        rank; with ``agree`` the smallest over the ranks caps the step's calls.
    :param offload: the adapter's :class:`~vitbatch.core.offload.HostReferenceOffload`,
        if it uses one: the batcher only reads its counters into each step's stats.
    """

    def __init__(
        self,
        budget: Budget | None = None,
        cache: EmbeddingCache | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        *,
        hidden_size: int | Mapping[str, int] | None = None,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        check_finite: bool = False,
        agree: Agree | None = None,
        capacity: CapacityProbe | None = None,
        offload: HostReferenceOffload | None = None,
    ) -> None:
        self.budget = budget or Budget()
        self.cache = cache if cache is not None else EmbeddingCache(DEFAULT_CACHE_BYTES)
        self.plugin_manager = (
            plugin_manager if plugin_manager is not None else default_plugin_manager()
        )
        self.offload = offload
        self.check_finite = check_finite
        self.agreement: Agreement = LocalAgreement()
        self.agree = agree
        self.capacity = capacity
        self.totals = Totals()
        self.last_stats = StepStats()
        self.observers: list[StepObserver] = []
        self.signatures = OutputSignatures(hidden_size, dtype)

    @property
    def agree(self) -> Agree | None:
        """The TP agreement's all-reduce (see the class parameter); ``None`` at world size 1."""
        return self.agreement.agree if isinstance(self.agreement, GroupAgreement) else None

    @agree.setter
    def agree(self, agree: Agree | None) -> None:
        self.agreement = GroupAgreement(agree) if agree is not None else LocalAgreement()

    def set_hidden_size(
        self,
        hidden_size: int | Mapping[str, int] | None,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    ) -> None:
        """Set the engine's embedding width and dtype (see the class parameters), e.g.
        once the adapter first sees the engine's model. What was learned is dropped."""
        self.signatures = OutputSignatures(hidden_size, dtype)

    def expected_hidden_size(self, modality: str) -> int | None:
        """The width outputs of ``modality`` must have: configured, or learned and trusted."""
        return self.signatures.expected_width(modality)

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

        def assemble(plan: StepPlan, embeddings: dict[ItemKey, torch.Tensor]) -> list:
            return [
                assemble_pieces(self.plugin_manager, chunk, items, embeddings) if items else []
                for chunk, items in zip(chunks, plan.needed)
            ]

        chunk_pieces, stats = self._step(
            lambda is_cached, budget: plan_step(chunks, is_cached, budget),
            len(chunks),
            engine_encoder,
            assemble,
        )
        return StepResult(chunk_pieces, stats)

    def encode(
        self,
        items: Sequence[Item],
        engine_encoder: EngineEncoder | None = None,
    ) -> dict[ItemKey, torch.Tensor]:
        """Embeddings of ``items`` (deduplicated, cached, budgeted), without windows.

        For engines that schedule encoder inputs and assemble chunks themselves
        (vLLM). The result has one entry per distinct key.
        """
        embeddings, _ = self._step(
            lambda is_cached, budget: plan_needed([items], is_cached, budget),
            1,
            engine_encoder,
            None,
        )
        return embeddings

    # -- the one step pipeline ------------------------------------------------
    def _step(
        self,
        planner: Callable[[Callable[[ItemKey], bool], Budget], StepPlan],
        requests: int,
        engine_encoder: EngineEncoder | None,
        assemble: Callable[[StepPlan, dict[ItemKey, torch.Tensor]], Any] | None,
    ) -> tuple[Any, StepStats]:
        """Plan, agree (:attr:`agreement`), encode, validate, cache, assemble.

        At world size 1 the agreement is trivial and a failure raises at once; at
        world size > 1 a failure is deferred, the remaining planned calls are still
        made (the call sequence stays the same on every rank), and every rank
        raises together after them.
        """
        agreement = self.agreement
        started = time.perf_counter()
        local = planner(self.cache.__contains__, self.budget)
        keys = list(dict.fromkeys(item.key for items in local.needed for item in items))
        host_hits_before = self.cache.stats.host_hits
        failure: Exception | None = None
        result: Any = None
        with self.cache.hold(keys):
            usable = self._lookup(local.hits)
            capacity = self.capacity() if self.capacity is not None else None
            to_encode, agreed_capacity, collectives = agreement.start(keys, set(usable), capacity)
            budget = self._call_budget(agreed_capacity)
            if budget is self.budget and len(usable) == len(local.hits) == len(keys) - len(
                to_encode
            ):
                plan = local  # every planned hit was usable and no rank asked for more
            else:
                plan = planner(lambda key: key not in to_encode, budget)
            stats = self._new_stats(plan, requests, time.perf_counter() - started)
            stats.agreements = collectives
            stats.hits = len(plan.hits)
            stats.host_hits = self.cache.stats.host_hits - host_hits_before
            embeddings = {key: usable[key] for key in plan.hits}
            started = time.perf_counter()
            encoded: list[Encoded] = []
            for batch in plan.batches:
                try:
                    encoded += self._encode_batch(batch, engine_encoder, stats)
                except Exception as error:
                    if not agreement.defers_failures:
                        raise
                    failure = failure or error
            if failure is None:
                try:
                    self._keep(encoded, embeddings)
                except Exception as error:
                    if not agreement.defers_failures:
                        raise
                    failure = error
            stats.encode_seconds = time.perf_counter() - started
            if failure is None:
                started = time.perf_counter()
                try:
                    result = embeddings if assemble is None else assemble(plan, embeddings)
                except Exception as error:
                    if not agreement.defers_failures:
                        raise
                    failure = error
                stats.assemble_seconds = time.perf_counter() - started
        stats.agreements += agreement.outcome(failure)
        self._finish(stats)
        return result, stats

    def _lookup(self, hits: Sequence[ItemKey]) -> dict[ItemKey, torch.Tensor]:
        """The planned hits that can really be served; a failed restore is a miss."""
        usable: dict[ItemKey, torch.Tensor] = {}
        for key in hits:
            try:
                cached = self.cache.get(key)
            except Exception:  # noqa: BLE001 - a lost entry is re-encoded (agreed at TP > 1)
                cached = None
            if cached is not None:
                usable[key] = cached
        return usable

    def _call_budget(self, capacity: int | None) -> Budget:
        budget = self.budget
        if capacity is not None and (budget.max_cost is None or capacity < budget.max_cost):
            return Budget(max(1, capacity), budget.max_items)
        return budget

    def _keep(self, encoded: Sequence[Encoded], embeddings: dict[ItemKey, torch.Tensor]) -> None:
        """Check every output of the step against the signature trusted *now*, then cache.

        Now, not when the call was made: calls later in the step (the halves of an
        OOM split, say) may have made a width trusted that an earlier call
        contradicts. Without a trusted signature the step's outputs must still agree
        with each other. Nothing is cached unless every output agrees, and nothing
        under a signature that is not trusted.
        """
        first: dict[str, Signature] = {}
        for output in encoded:
            modality = output.item.modality
            seen = Signature.of(output.embedding)
            expected = self.signatures.trusted(modality) or first.setdefault(modality, seen)
            if seen != expected:
                raise EncoderOutputError(
                    f"encoder plugin {output.plugin_name!r} (modality {modality!r}) "
                    f"returned {seen} for item {output.item.hash!r}: expected {expected}, "
                    "which the other calls of this step agreed on"
                )
        for output in encoded:
            embeddings[output.item.key] = output.embedding
            if output.item.cacheable and self.signatures.trusted(output.item.modality):
                self.cache.put(output.item.key, _own_storage(output.embedding))

    def _new_stats(self, plan: StepPlan, requests: int, plan_seconds: float) -> StepStats:
        return StepStats(
            requests=requests,
            items=sum(len(items) for items in plan.needed),
            misses=plan.misses,
            deduplicated=plan.deduplicated,
            plan_seconds=plan_seconds,
        )

    def _finish(self, stats: StepStats) -> None:
        if self.offload is not None:
            offload = self.offload.stats
            stats.d2h_copies_avoided = offload.d2h_copies_avoided - self.totals.d2h_copies_avoided
            stats.d2h_bytes_avoided = offload.d2h_bytes_avoided - self.totals.d2h_bytes_avoided
        self.last_stats = stats
        self.totals.add(stats)
        for observer in self.observers:
            observer.on_step(self, stats)

    # -- encoder calls --------------------------------------------------------
    def _encode_batch(
        self, batch: MicroBatch, engine_encoder: EngineEncoder | None, stats: StepStats
    ) -> list[Encoded]:
        """Encode ``batch``; only a local agreement may halve it after a device OOM."""
        if self.agreement.defers_failures:
            return self._encode_once(batch, engine_encoder, stats)
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
                out.extend(self._encode_batch(sub, engine_encoder, stats))
            return out

    def _encode_once(
        self, batch: MicroBatch, engine_encoder: EngineEncoder | None, stats: StepStats
    ) -> list[Encoded]:
        started = time.perf_counter()
        encoded = encode_batch(
            self.plugin_manager,
            batch,
            engine_encoder,
            hidden_size=self.signatures.configured_width(batch.modality),
            dtype=self.signatures.configured_dtype(batch.modality),
            check_finite=self.check_finite,
        )
        self._vote(batch, encoded[0].embedding, encoded[0].plugin_name)
        stats.encoder_calls += 1
        stats.tokens_per_call.append(batch.num_tokens)
        stats.cost_per_call.append(batch.cost)
        stats.items_per_call.append(len(batch.items))
        stats.seconds_per_call.append(time.perf_counter() - started)
        return encoded

    def _vote(self, batch: MicroBatch, first: torch.Tensor, plugin_name: str) -> None:
        """Count the call's signature; refuse one the trusted signature contradicts."""
        before = self.signatures.trusted(batch.modality)
        seen = Signature.of(first)
        verdict = self.signatures.observe(batch.modality, seen)
        if verdict is Verdict.REJECTED:
            raise EncoderOutputError(
                f"encoder plugin {plugin_name!r} (modality {batch.modality!r}) returned {seen} "
                f"for items {[item.hash for item in batch.items]}: expected {before} "
                "(learned from earlier calls; give the batcher the engine's hidden_size and dtype)"
            )
        if verdict is Verdict.RELEARNED and before is not None:
            for key, tensor in self.cache.peek_all():
                if Signature.of(tensor) == before:
                    self.cache.discard(key)


def _own_storage(embedding: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes, so the cache's byte count is the truth.

    A per-item slice of a concatenated encoder output would keep the whole
    batch's storage alive for as long as the slice is cached.
    """
    if embedding.untyped_storage().nbytes() > tensor_bytes(embedding):
        return embedding.clone()
    return embedding
