"""The interception: SGLang's step embedding served by the core, same inputs, same outputs.

The AROUND hook on ``_get_chunked_prefill_embedding`` turns the step's
``MultimodalDataItem``s into core items, lets the core plan, encode
(``vitbatch_encode_batch``, default: SGLang's own ``data_embedding_func``), cache
and assemble, and returns the tensor SGLang expects, joined as SGLang joins it:
the core hands each request's rows as views of the item embeddings, and the step
makes one ``torch.cat`` over all of them, none for a single view. Requests SGLang sends
through its per-request "full" path (multi-run non-audio items, EVS) keep that
native path. Any exception: log once, run SGLang's own function for that step.

One cache: vitbatch's device tier *is* SGLang's ``embedding_cache``
(:mod:`.cache`), so what either side encodes is a hit for the other, memory
stays within what SGLang reserved, and ``init_mm_embedding_cache()`` resets what
vitbatch sees. ``--vit-batch-host-cache-mb`` adds a pinned host tier below it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vitbatch.adapters.sglang import surface
from vitbatch.adapters.sglang.items import core_item, flat_rows
from vitbatch.adapters.sglang.state import AdapterState, get_state, log_state_error
from vitbatch.core import Item, RequestChunk, Window

if TYPE_CHECKING:
    from vitbatch.adapters.sglang.surface import MultimodalDataItem

__all__ = ["Unsupported", "around_chunked_prefill", "chunked_prefill_embedding", "core_item"]


class Unsupported(Exception):
    """A step the core cannot reproduce exactly; SGLang's native path serves it."""


def around_chunked_prefill(
    original: Callable[..., tuple[torch.Tensor | None, torch.Tensor]], *args: Any, **kwargs: Any
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The AROUND hook: SGLang's arguments pass through unchanged to
    :func:`chunked_prefill_embedding`, or to ``original`` if vitbatch cannot serve the step."""
    if kwargs:  # SGLang passes all seven positionally; anything else is not ours to guess
        return original(*args, **kwargs)
    state: AdapterState | None = None
    try:
        state = get_state()  # inside the try: a state that cannot be built costs speed only
        state.see_model(args[0])
        if state.prefetcher is not None:  # before anything reads the cache, native path too
            state.prefetcher.before_step(args[1], args[0], args[6].device)
        return chunked_prefill_embedding(state, original, *args)
    except Unsupported as reason:
        state.batcher.note_fallback("unsupported")
        state.log_once(
            f"unsupported:{reason}", "vitbatch: SGLang's native path serves steps with %s", reason
        )
    except Exception as error:  # a plugin bug must cost speed, never a request
        if state is None:  # vitbatch could not even start: say so once, serve natively
            log_state_error(error)
            return original(*args)
        state.batcher.note_fallback("error")
        state.log_once(
            f"error:{type(error).__name__}",
            "vitbatch failed on a step (%s: %s); SGLang's native path serves it "
            "(logged once per error type)",
            type(error).__name__,
            error,
            exc_info=True,
        )
    return original(*args)


def _check_order(items: Sequence[Item]) -> None:
    """SGLang assembles item by item; the core by position. They agree unless items interleave."""
    previous_end = -1
    for item in items:
        for span in item.spans:
            if span.offset < previous_end:
                raise Unsupported("interleaved multimodal items")
            previous_end = span.end


def chunked_prefill_embedding(
    state: AdapterState,
    original: Callable[..., tuple[torch.Tensor | None, torch.Tensor]],
    data_embedding_func: Callable,
    embedding_items: list[MultimodalDataItem],
    items_size: list[int],
    prefix_length: list[int],
    extend_length: list[int],
    items_offset_list: list[list[tuple[int, int]]],
    input_ids: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """vitbatch's version of ``_get_chunked_prefill_embedding``: same inputs, same outputs."""
    device = input_ids.device
    last = min(len(items_size) - 1, len(prefix_length))  # SGLang's eagle3 workaround, kept
    chunks: list[RequestChunk] = []
    full_path: list[int] = []
    for index in range(last):
        if items_size[index] == items_size[index + 1]:
            continue
        extend = extend_length[index] if index < len(extend_length) else 0
        if extend <= 0:
            continue
        window = Window.from_prefix(prefix_length[index], extend)
        offsets = items_offset_list[index]
        request_items = embedding_items[items_size[index] : items_size[index + 1]]
        if not surface.per_image_request(request_items):  # multi-run items / EVS
            if surface.runs_full_path(offsets, window.start, window.end):
                full_path.append(index)  # SGLang's own per-request path
            continue
        if not any(end >= window.start and start < window.end for start, end in offsets):
            continue
        items = [core_item(item) for item in request_items]
        _check_order(items)
        chunks.append(RequestChunk(items, window, request_id=index))

    borrowable = {
        id(item.payload)
        for chunk in chunks
        for item in chunk.items
        if item.spans[0].offset >= chunk.window.start and item.spans[-1].end <= chunk.window.end
    }
    moved: list[MultimodalDataItem] = []
    encoder = _engine_encoder(state, data_embedding_func, device, borrowable, moved)
    pieces: list[tuple[int, torch.Tensor]] = []  # (request index, rows), joined once below
    try:
        if chunks:
            result = state.batcher.run_step(chunks, encoder)
            pieces.extend(
                (chunk.request_id, piece)
                for chunk, request_pieces in zip(chunks, result.pieces)
                for piece in request_pieces
            )
    finally:
        _release_features(state, moved)

    for index in full_path:
        embedding, input_ids = surface.chunked_embedding_full(
            data_embedding_func,
            embedding_items[items_size[index] : items_size[index + 1]],
            items_offset_list[index],
            prefix_length[index],
            extend_length[index],
            input_ids,
            device,
        )
        if embedding is not None:
            pieces.append((index, embedding))

    # Like SGLang: every slice of every request in request order (a stable sort keeps
    # each request's own order), then one concatenation for the step, none for one slice.
    pieces.sort(key=lambda piece: piece[0])
    if not pieces:
        return None, input_ids
    if len(pieces) == 1:
        return pieces[0][1], input_ids
    return torch.cat([embedding for _, embedding in pieces], dim=0), input_ids


def _engine_encoder(
    state: AdapterState,
    data_embedding_func: Callable,
    device: torch.device,
    borrowable: set[int],
    moved: list[MultimodalDataItem],
) -> Callable[[Sequence[Item]], list[torch.Tensor] | torch.Tensor]:
    """SGLang's ``data_embedding_func`` as an engine encoder over core items.

    Features go to the device through the batcher's CPU-reference offload so
    that releasing them later hands the host tensor back instead of copying.
    """
    borrow_key = surface.borrow_cuda_ipc_key()
    defer_move = surface.can_skip_feature_move(data_embedding_func)

    def encode(items: Sequence[Item]) -> list[torch.Tensor] | torch.Tensor:
        engine_items = [item.payload for item in items]
        for engine_item in engine_items:
            if id(engine_item) in borrowable:
                surface.borrow_feature(engine_item, borrow_key)
        _wait_for_native_offload(engine_items, device, defer_move)
        if not defer_move:
            for engine_item in engine_items:
                feature = engine_item.feature
                if isinstance(feature, torch.Tensor) and feature.device != device:
                    engine_item.feature = state.offload.to_device(feature, device)
                    moved.append(engine_item)
        return flat_rows(data_embedding_func(engine_items))  # anything else: native fallback

    return encode


def _wait_for_native_offload(
    items: Sequence[MultimodalDataItem], device: torch.device, defer_move: bool
) -> None:
    """Host features may still be arriving from SGLang's own async copy-back of a previous step."""
    event = surface.host_offload_event()
    if event is None or not any(
        isinstance(i.feature, torch.Tensor) and i.feature.is_cpu for i in items
    ):
        return
    if defer_move or device.type != "cuda":
        event.synchronize()
    else:
        torch.cuda.current_stream(device).wait_event(event)


def _release_features(state: AdapterState, moved: Sequence[MultimodalDataItem]) -> None:
    """Hand the host tensors back now: SGLang's post-forward copy-back then finds
    host features and copies nothing. Safe without a sync: the device copies
    were only used on the current stream, which orders their reuse."""
    offload = state.offload
    for engine_item in moved:
        feature = engine_item.feature
        if isinstance(feature, torch.Tensor) and offload.host_reference(feature) is not None:
            engine_item.feature = offload.release(feature)
