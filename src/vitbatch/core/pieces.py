"""A request's rows as views of its items' embeddings, and the mark that allows it.

Apart from :mod:`vitbatch.core.calls` so the default hook implementations
(:mod:`vitbatch.plugin.defaults`) can use these without importing the module that
calls the hooks: torch and the core's items only, no plugin manager.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from vitbatch.core.items import Item, Window

_BY_PIECES = "_vitbatch_assembles_by_pieces"

F = TypeVar("F", bound=Callable[..., object])


def by_pieces(function: F) -> F:
    """Mark a ``vitbatch_assemble_chunk`` implementation that returns exactly
    ``join_pieces(chunk_pieces(window, items, embeddings))``: while every implementation
    on the hook is so marked, the batcher makes the pieces itself and skips the join."""
    setattr(function, _BY_PIECES, True)
    return function


def chunk_pieces(
    window: Window, items: Sequence[Item], embeddings: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """One request's rows inside ``window``, in position order, as views of ``embeddings``.

    Consecutive pieces of one item whose rows follow each other (an item's runs
    inside the window always do) are one view; an item the window holds whole is
    its embedding itself.
    """
    spans: list[tuple[int, int, int, int]] = []  # (position, item index, first row, rows)
    for index, item in enumerate(items):
        spans.extend((position, index, row, rows) for position, row, rows in item.rows_in(window))
    spans.sort(key=lambda span: span[0])
    merged: list[list[int]] = []
    for _, index, row, rows in spans:
        last = merged[-1] if merged else None
        if last is not None and last[0] == index and last[1] + last[2] == row:
            last[2] += rows
        else:
            merged.append([index, row, rows])
    pieces = []
    for index, row, rows in merged:
        embedding = embeddings[index]
        whole = row == 0 and rows == embedding.shape[0]
        pieces.append(embedding if whole else embedding[row : row + rows])
    return pieces


def join_pieces(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """The pieces as one tensor: the piece itself when there is one, else one ``torch.cat``."""
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=0)


def assembles_by_pieces(function: Callable[..., object]) -> bool:
    """True for an implementation marked with :func:`by_pieces`."""
    return bool(getattr(function, _BY_PIECES, False))
