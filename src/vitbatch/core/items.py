"""What a scheduler step hands the core: items, their placeholder spans, chunk windows.

An *item* is one image, video or audio input of one request. The core never looks
inside its features: it only needs to know how many embedding rows the encoder will
produce for it (``num_tokens``), where those rows go in the request's token
sequence (``spans``) and what makes two items interchangeable (``key``).
Engine objects travel along untouched in ``payload`` so the adapter can get them
back when the engine's own encoder is called.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch

Features = Union[torch.Tensor, Mapping[str, torch.Tensor], None]
"""An item's encoder input: one tensor, a dict of tensors, or nothing (the
engine's encoder finds the input through ``payload``)."""


@dataclass(frozen=True, order=True)
class ItemKey:
    """Identity of an encoder result: same content hash *and* same token count.

    The token count is part of the key because one image processed at two
    resolutions hashes the same in some engines yet yields different embeddings.
    """

    hash: Hashable
    num_tokens: int


@dataclass(frozen=True, order=True)
class Span:
    """``length`` placeholder tokens starting at position ``offset`` of a request."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Window:
    """The token positions ``[start, end)`` a prefill chunk computes in this step."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid chunk window [{self.start}, {self.end})")

    @classmethod
    def from_prefix(cls, prefix_len: int, extend_len: int) -> Window:
        """The window of a chunk that extends ``prefix_len`` cached tokens by ``extend_len``."""
        return cls(prefix_len, prefix_len + extend_len)


@dataclass(eq=False)
class Item:
    """One multimodal input of one request.

    :param hash: content hash given by the engine (int or str).
    :param modality: ``"image"``, ``"video"``, ``"audio"``... Only items of the same
        modality and ``group`` share an encoder call.
    :param num_tokens: embedding rows the encoder produces for this item.
    :param spans: placeholder spans in the request's token sequence, in increasing
        order; their lengths add up to ``num_tokens``. Embedding row ``r`` belongs
        to the ``r``-th placeholder position counted across the spans.
    :param features: encoder input (kept on the host until a micro-batch needs it).
    :param cost: encoder work for the token budget (e.g. patches before merging);
        defaults to ``num_tokens``.
    :param group: anything else the encoder needs shared inside one call (a dtype,
        a processor variant). ``None`` for most encoders.
    :param cacheable: ``False`` for items whose result must never be reused
        across steps (they are still encoded once per step).
    :param payload: the engine's own object, opaque to the core.
    """

    hash: Hashable
    modality: str
    num_tokens: int
    spans: tuple[Span, ...]
    features: Features = None
    cost: int | None = None
    group: Hashable = None
    cacheable: bool = True
    payload: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spans = tuple(self.spans)
        if self.num_tokens <= 0:
            raise ValueError(
                f"item {self.hash!r} ({self.modality}): num_tokens must be > 0, "
                f"got {self.num_tokens}"
            )
        if not self.spans:
            raise ValueError(
                f"item {self.hash!r} ({self.modality}): needs at least one placeholder span"
            )
        previous_end = -1
        for span in self.spans:
            if span.length <= 0 or span.offset < 0:
                raise ValueError(f"item {self.hash!r} ({self.modality}): invalid span {span}")
            if span.offset < previous_end:
                raise ValueError(
                    f"item {self.hash!r} ({self.modality}): spans must be sorted and disjoint, "
                    f"got {self.spans}"
                )
            previous_end = span.end
        total = sum(span.length for span in self.spans)
        if total != self.num_tokens:
            raise ValueError(
                f"item {self.hash!r} ({self.modality}): spans cover {total} placeholder tokens "
                f"but the item produces {self.num_tokens} embedding rows"
            )
        if self.cost is None:
            self.cost = self.num_tokens

    @property
    def key(self) -> ItemKey:
        return ItemKey(self.hash, self.num_tokens)

    @property
    def batch_group(self) -> tuple[str, Hashable]:
        """Items share an encoder call only when this is equal."""
        return (self.modality, self.group)

    def overlaps(self, window: Window) -> bool:
        """Whether any placeholder of this item lies inside ``window``."""
        return any(
            max(span.offset, window.start) < min(span.end, window.end) for span in self.spans
        )

    def rows_in(self, window: Window) -> list[tuple[int, int, int]]:
        """The parts of this item inside ``window``.

        :returns: ``(position, first_row, row_count)`` per overlapping span piece,
            where ``position`` is the first token position of the piece.
        """
        pieces = []
        row = 0
        for span in self.spans:
            lo = max(span.offset, window.start)
            hi = min(span.end, window.end)
            if lo < hi:
                pieces.append((lo, row + lo - span.offset, hi - lo))
            row += span.length
        return pieces


@dataclass
class RequestChunk:
    """One request's share of a scheduler step: its items and its chunk window.

    Items that lie entirely outside the window may be included (they are ignored),
    which lets an adapter pass a request's whole item list every step.
    """

    items: Sequence[Item]
    window: Window
    request_id: Hashable = None


EncoderOutput = Union[torch.Tensor, Sequence[torch.Tensor]]
"""What an encoder answers for a micro-batch: one tensor with the items' rows
concatenated in order, or one tensor per item."""

EngineEncoder = Callable[[Sequence[Item]], EncoderOutput]
"""The engine's own encoder, wrapped by the adapter: items in, embeddings out.
It is handed to the ``vitbatch_encode_batch`` hook; the default implementation
calls it on the whole micro-batch."""
