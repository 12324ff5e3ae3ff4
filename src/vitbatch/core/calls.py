"""The two hook calls a step makes, each answer checked before the step uses it.

:func:`encode_batch` asks the ``vitbatch_encode_batch`` hook for one micro-batch
and splits the answer per item (rows, width and dtype checked); and
:func:`assemble_chunk` asks ``vitbatch_assemble_chunk`` for one request's window
(row count checked). Plain functions: the state they need (the plugin manager,
the expected signature) is the batcher's, passed in.

Assembly copies nothing it does not have to: :func:`chunk_pieces` gives a
request's rows as views of its items' embeddings, one per item (an item's runs
inside the window are consecutive rows of its embedding), and while the default
implementation is the only one on the hook (:func:`by_pieces`) the batcher hands
these views on unjoined, so an adapter can make the one concatenation its engine
makes for the whole step, or none for a single view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pluggy
import torch

from vitbatch.core.errors import AssemblyError, NoEncoderError
from vitbatch.core.hooks import call_first_result
from vitbatch.core.items import EngineEncoder, Item, ItemKey, RequestChunk
from vitbatch.core.pieces import assembles_by_pieces, by_pieces, chunk_pieces, join_pieces
from vitbatch.core.planner import MicroBatch
from vitbatch.core.validate import check_finite as check_all_finite
from vitbatch.core.validate import split_encoder_output

__all__ = [  # the piece helpers live in core/pieces.py; named here for existing imports
    "Encoded",
    "assemble_chunk",
    "assemble_pieces",
    "by_pieces",
    "chunk_pieces",
    "encode_batch",
    "join_pieces",
]


@dataclass
class Encoded:
    """One item's output of an encoder call, with the plugin that answered."""

    item: Item
    embedding: torch.Tensor
    plugin_name: str


def encode_batch(
    plugin_manager: pluggy.PluginManager,
    batch: MicroBatch,
    engine_encoder: EngineEncoder | None,
    *,
    hidden_size: int | None,
    dtype: torch.dtype | None,
    check_finite: bool,
) -> list[Encoded]:
    """Encode ``batch`` through the hooks; one :class:`Encoded` per item, in order.

    :raises NoEncoderError: every implementation declined.
    :raises EncoderOutputError: the answer has the wrong shape, width or dtype
        (``hidden_size`` / ``dtype``: the engine's, where known), or NaN/Inf with
        ``check_finite``.
    """
    hashes = [item.hash for item in batch.items]
    answer = call_first_result(
        plugin_manager.hook.vitbatch_encode_batch,
        context=f"modality {batch.modality!r}, items {hashes}",
        modality=batch.modality,
        items=batch.items,
        engine_encoder=engine_encoder,
    )
    if answer is None:
        raise NoEncoderError(
            f"no encoder for modality {batch.modality!r}: every vitbatch_encode_batch "
            f"implementation declined items {hashes} "
            "and the engine gave no encoder of its own"
        )
    output, plugin_name = answer
    per_item = split_encoder_output(
        output,
        batch.items,
        plugin_name=plugin_name,
        modality=batch.modality,
        hidden_size=hidden_size,
        dtype=dtype,
    )
    if check_finite:
        check_all_finite(per_item, batch.items, plugin_name=plugin_name, modality=batch.modality)
    return [Encoded(item, embedding, plugin_name) for item, embedding in zip(batch.items, per_item)]


def assemble_pieces(
    plugin_manager: pluggy.PluginManager,
    chunk: RequestChunk,
    items: Sequence[Item],
    embeddings: dict[ItemKey, torch.Tensor],
) -> list[torch.Tensor]:
    """One request's rows for its window as pieces to be joined in order.

    The views of :func:`chunk_pieces` while only implementations marked
    :func:`by_pieces` are registered (the default); else the one tensor the
    hook answers (:func:`assemble_chunk`).
    """
    impls = plugin_manager.hook.vitbatch_assemble_chunk.get_hookimpls()
    if not impls or not all(assembles_by_pieces(impl.function) for impl in impls):
        return [assemble_chunk(plugin_manager, chunk, items, embeddings)]
    pieces = chunk_pieces(chunk.window, items, [embeddings[item.key] for item in items])
    expected = sum(rows for item in items for _, _, rows in item.rows_in(chunk.window))
    got = sum(int(piece.shape[0]) for piece in pieces)
    if got != expected or any(piece.dim() != 2 for piece in pieces):
        raise AssemblyError(
            f"request {chunk.request_id!r} window [{chunk.window.start}, {chunk.window.end}): "
            f"its items' embeddings give {got} rows, expected {expected} "
            f"for items {[item.hash for item in items]}"
        )
    return pieces


def assemble_chunk(
    plugin_manager: pluggy.PluginManager,
    chunk: RequestChunk,
    items: Sequence[Item],
    embeddings: dict[ItemKey, torch.Tensor],
) -> torch.Tensor:
    """One request's rows for its window, from its items' whole embeddings.

    :raises AssemblyError: no implementation answered, or with the wrong row count.
    """
    answer = call_first_result(
        plugin_manager.hook.vitbatch_assemble_chunk,
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
