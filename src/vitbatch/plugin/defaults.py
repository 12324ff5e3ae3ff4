"""Default hook implementations, registered last and marked ``trylast``.

pluggy calls the last registered implementation first; ``trylast`` keeps these
behind every third-party encoder no matter the registration order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

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
def vitbatch_assemble_chunk(
    window: Window, items: Sequence[Item], embeddings: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Slice each item to its rows inside the window, order the pieces by position, concatenate."""
    pieces: list[tuple[int, torch.Tensor]] = []
    for item, embedding in zip(items, embeddings):
        for position, first_row, rows in item.rows_in(window):
            pieces.append((position, embedding[first_row : first_row + rows]))
    pieces.sort(key=lambda piece: piece[0])
    if len(pieces) == 1:
        return pieces[0][1]
    return torch.cat([piece for _, piece in pieces], dim=0)
