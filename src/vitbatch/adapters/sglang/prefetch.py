"""Encoder prefetch for SGLang: waiting requests' items encoded before their admission.

Why: under load a request waits in ``Scheduler.waiting_queue`` for steps with its
images already preprocessed, while the GPU runs decode steps that leave it idle
most of the time. Encoding them then, on a side stream overlapping the step's
forward, takes the vision encoder off the step that admits the request.

How, per scheduler iteration (:meth:`Prefetcher.tick`, an AFTER hook on
``Scheduler.run_batch``: the forward is launched, its results not yet processed):

1. requests that left the queue without consuming what was prefetched for them
   (aborted) release it (:class:`~vitbatch.core.prefetch.PrefetchLedger`);
2. the first waiting requests' items are chosen by the core's
   :func:`~vitbatch.core.prefetch.select_prefetch` (queue order, bounded, known
   keys skipped, deduplicated);
3. they are encoded by the function the step itself last called for that modality
   (learned in :meth:`learn`, never guessed), through the same ``vitbatch_encode_batch``
   hook, checked against the signature the step trusts, on the side stream
   (:mod:`.side_stream`), into a pool of pending embeddings bounded in bytes.

At the step (:meth:`before_step`, before anything reads the cache), a pending item of the
step is handed to SGLang's ``embedding_cache`` under the key the step looks up;
only there does the step's stream wait for the prefetch's event.

Why a pool and not the cache at once: what is in the cache may be read by SGLang's
own path or copied to the host tier on eviction, on the step's stream, with no
knowledge of the side stream; and SGLang's small cache would evict prefetched
entries, or entries running requests still need, before the step. In the pool the
embedding is read by nobody until the consuming stream has waited for it.

Faults: an encoder call that raises (out of memory included) cancels that prefetch
(the step encodes the items as without prefetch); anything else unexpected turns
the prefetch off for that iteration, logged once. Outputs never change.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters.sglang import side_stream, surface
from vitbatch.adapters.sglang.items import core_item, flat_rows, item_key, modality_name
from vitbatch.core.cache import tensor_bytes
from vitbatch.core.calls import encode_batch
from vitbatch.core.errors import EncoderOutputError
from vitbatch.core.items import Item, ItemKey
from vitbatch.core.planner import MicroBatch
from vitbatch.core.prefetch import Candidate, PrefetchLedger, PrefetchLimits, select_prefetch
from vitbatch.core.signature import Signature

if TYPE_CHECKING:
    from vitbatch.adapters.sglang.surface import MultimodalDataItem
    from vitbatch.core.batcher import VitBatcher

LogOnce = Callable[..., None]


@dataclass
class Pending:
    """A prefetched embedding waiting for its step, and the event its encoding completes."""

    embedding: torch.Tensor
    event: Any


@dataclass(frozen=True)
class StepEncoder:
    """What the step called for one modality: SGLang's ``data_embedding_func`` and device."""

    function: Callable
    device: torch.device
    defer_move: bool


class Prefetcher:
    """The prefetch of one scheduler process: its pool, its ledger, its side stream."""

    def __init__(self, batcher: VitBatcher, limits: PrefetchLimits, log_once: LogOnce) -> None:
        self.batcher = batcher
        self.limits = limits
        self.ledger = PrefetchLedger()
        self.pending: dict[ItemKey, Pending] = {}
        self._log_once = log_once
        self._encoders: dict[str, StepEncoder] = {}
        self._owners: set[Hashable] = set()  # request ids the ledger may hold keys for
        self._stream = side_stream.SideStream()

    # -- the step's side ---------------------------------------------------------
    def before_step(
        self, items: Sequence[MultimodalDataItem], function: Callable, device: Any
    ) -> None:
        """At the step, before anything reads the cache: learn what the step calls for this
        modality, and hand the step's pending items to the cache. Never raises."""
        try:
            self.learn(items, function, device)
            self.claim(items)
        except Exception as error:  # noqa: BLE001 - the step goes on without prefetch
            self._unexpected("step", error)

    def learn(self, items: Sequence[MultimodalDataItem], function: Callable, device: Any) -> None:
        """Remember what the step calls for these items' modality (one per call)."""
        if items:
            self._encoders[modality_name(items[0])] = StepEncoder(
                function, torch.device(device), surface.can_skip_feature_move(function)
            )

    def claim(self, items: Iterable[MultimodalDataItem]) -> None:
        """Hand the step's pending items to the cache, the step's stream waiting for each."""
        keys = list(dict.fromkeys(item_key(i) for i in items if i.hash is not None))
        if not any(self.ledger.owns(key) for key in keys):
            return
        cache = self.batcher.cache
        with cache.hold(keys):  # a claimed entry must not push out a hit of this step
            for key in keys:
                pending = self.pending.pop(key, None)
                if pending is None:
                    if self.ledger.owns(key):  # started, never finished: the step encodes it
                        self.ledger.evicted(key)
                    continue
                side_stream.consume(pending.event, pending.embedding)
                if cache.put(key, pending.embedding):
                    self.ledger.consumed(key)
                else:  # SGLang's cache has no room: the step encodes it
                    self.ledger.evicted(key)

    # -- the scheduler loop's side ------------------------------------------------
    def tick(self, scheduler: Any) -> None:
        """One scheduler iteration: release what aborted requests held, start new prefetches."""
        try:
            waiting = surface.waiting_requests(scheduler)
            if self._owners:
                self._release_gone({surface.request_state(r)[0] for r in waiting})
            if surface.copy_back_pending():
                return
            requests = [self._candidates(r) for r in islice(waiting, self.limits.max_requests)]
            for modality, group in _by_modality(self._select(requests)).items():
                self._start(modality, group)
            self._adopt(requests)
        except Exception as error:  # noqa: BLE001 - prefetch off for this iteration
            self._unexpected("tick", error)

    def _release_gone(self, waiting: set[Hashable]) -> None:
        """Requests that left the queue: an admitted one consumed its keys at its step
        (the same iteration, before this hook); what is left was prefetched for nobody."""
        for request_id in sorted(self._owners - waiting, key=repr):
            self._owners.discard(request_id)
            for key in self.ledger.release_request(request_id):
                self.pending.pop(key, None)

    def _adopt(self, requests: Sequence[Sequence[Candidate]]) -> None:
        """Every request in the look-ahead that needs a held key owns it too (the same image
        in two prompts): the first one's abort then leaves it to the other."""
        for request in requests:
            for candidate in request:
                if self.ledger.owns(candidate.key):
                    self.ledger.adopt(candidate.request_id, candidate.key)
                    self._owners.add(candidate.request_id)

    def _select(self, requests: Sequence[Sequence[Candidate]]) -> list[Candidate]:
        row_bytes = max(
            (s.width * s.dtype.itemsize for m in self._encoders if (s := self._trusted(m))),
            default=0,
        )
        cache = self.batcher.cache
        return select_prefetch(
            requests,
            self.limits,
            lambda key: self.ledger.owns(key) or key in cache,
            pool_bytes_free=self.limits.max_pool_bytes - self.ledger.stats.bytes_held,
            row_bytes=row_bytes,
        )

    def _candidates(self, request: Any) -> list[Candidate]:
        """A waiting request's items the step will look up by key and that can be encoded
        now: modalities the step has served (their encoder and signature are known), on
        SGLang's per-image path, host features (see :func:`surface.prefetchable`)."""
        request_id, finished, items = surface.request_state(request)
        if finished:
            return []
        by_modality: dict[str, list[MultimodalDataItem]] = {}
        for item in items:
            by_modality.setdefault(modality_name(item), []).append(item)
        candidates = []
        for modality, group in by_modality.items():
            if self._trusted(modality) is None or not surface.per_image_request(group):
                continue
            for item in group:
                if surface.prefetchable(item) and item.feature.device.type == "cpu":
                    core = core_item(item)
                    candidates.append(Candidate(request_id, core.key, core.cost or 0, core))
        return candidates

    def _trusted(self, modality: str) -> Signature | None:
        return self.batcher.signatures.trusted(modality) if modality in self._encoders else None

    def _start(self, modality: str, picked: list[Candidate]) -> None:
        """Encode ``picked`` (one modality) in calls within the batcher's budget."""
        signature = self._trusted(modality)
        assert signature is not None  # _candidates admits trusted modalities only
        row_bytes = signature.width * signature.dtype.itemsize
        self.ledger.started(picked, {c.key: c.key.num_tokens * row_bytes for c in picked})
        self._owners.update(c.request_id for c in picked)
        for call in _calls(picked, self.batcher.budget.max_cost, self.batcher.budget.max_items):
            try:
                embeddings, event = self._encode(modality, [c.payload for c in call], signature)
            except Exception as error:  # noqa: BLE001 - OOM or any encoder fault: cancelled
                for candidate in call:
                    self.ledger.cancelled(candidate.key)
                self._log_once(
                    f"prefetch-cancel:{type(error).__name__}",
                    "vitbatch: a prefetch encoder call failed (%s: %s); its items are encoded "
                    "when their request is admitted (logged once per error type)",
                    type(error).__name__,
                    error,
                )
                continue
            for candidate, embedding in zip(call, embeddings):
                if self.ledger.owns(candidate.key):
                    self.pending[candidate.key] = Pending(embedding, event)

    def _encode(
        self, modality: str, items: list[Item], signature: Signature
    ) -> tuple[list[torch.Tensor], Any]:
        encoder = self._encoders[modality]
        batch = MicroBatch(modality, None, tuple(items))
        with self._stream.launch(encoder.device) as launch:
            encoded = encode_batch(
                self.batcher.plugin_manager,
                batch,
                _engine_encoder(encoder),
                hidden_size=signature.width,
                dtype=signature.dtype,
                check_finite=self.batcher.check_finite,
            )
            embeddings = [_owned(output.embedding) for output in encoded]
        for output, embedding in zip(encoded, embeddings):
            if Signature.of(embedding) != signature:
                raise EncoderOutputError(
                    f"prefetch of item {output.item.hash!r}: {Signature.of(embedding)}, "
                    f"expected {signature}"
                )
        return embeddings, launch.event

    def _unexpected(self, where: str, error: Exception) -> None:
        self._log_once(
            f"prefetch-{where}:{type(error).__name__}",
            "vitbatch: the encoder prefetch failed in its %s (%s: %s) and is off for this "
            "scheduler iteration; outputs are unchanged (logged once per error type)",
            where,
            type(error).__name__,
            error,
            exc_info=True,
        )


def _engine_encoder(encoder: StepEncoder) -> Callable[[Sequence[Item]], Any]:
    """The step's ``data_embedding_func`` over core items, with the step's feature move; the
    items' host features are put back afterwards (the request's step reads them as before)."""

    def encode(items: Sequence[Item]) -> Any:
        engine_items = [item.payload for item in items]
        saved = [(engine_item, engine_item.feature) for engine_item in engine_items]
        try:
            if not encoder.defer_move:
                for engine_item, feature in saved:
                    if isinstance(feature, torch.Tensor) and feature.device != encoder.device:
                        engine_item.feature = feature.to(encoder.device, non_blocking=True)
            return flat_rows(encoder.function(engine_items))
        finally:
            for engine_item, feature in saved:
                engine_item.feature = feature

    return encode


def _owned(embedding: torch.Tensor) -> torch.Tensor:
    """A per-item slice of a call's output would keep the whole output alive in the pool."""
    if embedding.untyped_storage().nbytes() > tensor_bytes(embedding):
        return embedding.clone()
    return embedding


def _by_modality(picked: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    groups: dict[str, list[Candidate]] = {}
    for candidate in picked:
        groups.setdefault(candidate.payload.modality, []).append(candidate)
    return groups


def _calls(
    picked: Sequence[Candidate], max_cost: int | None, max_items: int | None
) -> Iterator[list[Candidate]]:
    """``picked`` in order, cut into calls within the step's own per-call budget."""
    call: list[Candidate] = []
    cost = 0
    for candidate in picked:
        full = max_items is not None and len(call) >= max_items
        if call and (full or (max_cost is not None and cost + candidate.cost > max_cost)):
            yield call
            call, cost = [], 0
        call.append(candidate)
        cost += candidate.cost
    if call:
        yield call
