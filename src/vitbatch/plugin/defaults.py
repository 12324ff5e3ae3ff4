"""Default hook implementations, registered last and marked ``trylast``.

pluggy calls the last registered implementation first; ``trylast`` keeps these
behind every third-party encoder no matter the registration order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vitbatch.core.pieces import by_pieces, chunk_pieces, join_pieces
from vitbatch.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from vitbatch.core.items import EngineEncoder, Item, Window


@hookimpl(trylast=True)
def vitbatch_encode_batch(
    items: Sequence[Item], engine_encoder: EngineEncoder | None
) -> torch.Tensor | Sequence[torch.Tensor] | None:
    """Call the engine's own encoder on the whole micro-batch."""
    if engine_encoder is None:
        return None
    return engine_encoder(items)


@hookimpl(trylast=True)
@by_pieces
def vitbatch_assemble_chunk(
    window: Window, items: Sequence[Item], embeddings: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Each item's rows inside the window as one view, in position order; the item's own
    tensor when the window holds it whole; one ``torch.cat`` only for several items.

    Marked :func:`~vitbatch.core.pieces.by_pieces`: while no other implementation is
    registered the batcher takes these views unjoined, and the adapter makes the
    step's one concatenation (its engine's), or none.
    """
    return join_pieces(chunk_pieces(window, items, embeddings))
