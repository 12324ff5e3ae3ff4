"""Check an encoder's answer and split it per item.

Encoders may answer with one concatenated tensor or one tensor per item; both
are normal. Anything else is a bug in the encoder, reported with enough detail
(plugin, modality, item hash, expected vs got) to fix it without a debugger.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitbatch.core.errors import EncoderOutputError
from vitbatch.core.items import Item


def _where(plugin_name: str, modality: str) -> str:
    return f"encoder plugin {plugin_name!r} (modality {modality!r})"


def split_encoder_output(
    output: object,
    items: Sequence[Item],
    *,
    plugin_name: str,
    modality: str,
    hidden_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """One ``[item.num_tokens, hidden]`` tensor per item of ``items``.

    :param output: the encoder's answer.
    :param hidden_size: the engine's hidden size, if known; every item must match
        it (else every item must match the first).
    :param dtype: the engine's embedding dtype, if known; likewise.
    :raises EncoderOutputError: on a wrong type, item count, row count, hidden size
        or dtype.
    """
    if isinstance(output, torch.Tensor):
        if output.dim() != 2:
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned a tensor of shape {tuple(output.shape)} "
                f"for items {[item.hash for item in items]}: expected 2 dims [tokens, hidden]"
            )
        expected = sum(item.num_tokens for item in items)
        if output.shape[0] != expected:
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned {output.shape[0]} rows for items "
                f"{[(item.hash, item.num_tokens) for item in items]}: expected {expected} "
                "(the sum of the items' num_tokens)"
            )
        per_item = list(torch.split(output, [item.num_tokens for item in items], dim=0))
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        per_item = list(output)
        if len(per_item) != len(items):
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned {len(per_item)} embeddings for "
                f"{len(items)} items {[item.hash for item in items]}"
            )
        for item, embedding in zip(items, per_item):
            if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
                got = (
                    tuple(embedding.shape)
                    if isinstance(embedding, torch.Tensor)
                    else type(embedding).__name__
                )
                raise EncoderOutputError(
                    f"{_where(plugin_name, modality)} returned {got} for item {item.hash!r}: "
                    f"expected a tensor [{item.num_tokens}, hidden]"
                )
            if embedding.shape[0] != item.num_tokens:
                raise EncoderOutputError(
                    f"{_where(plugin_name, modality)} returned {embedding.shape[0]} rows for item "
                    f"{item.hash!r}: expected {item.num_tokens}"
                )
    else:
        raise EncoderOutputError(
            f"{_where(plugin_name, modality)} returned {type(output).__name__} for items "
            f"{[item.hash for item in items]}: expected a tensor or a sequence of tensors"
        )
    reference = hidden_size if hidden_size is not None else per_item[0].shape[1]
    for item, embedding in zip(items, per_item):
        if embedding.shape[1] != reference:
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned hidden size {embedding.shape[1]} "
                "for item "
                f"{item.hash!r}: expected {reference}"
            )
    dtype_reference = dtype if dtype is not None else per_item[0].dtype
    for item, embedding in zip(items, per_item):
        if embedding.dtype != dtype_reference:
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned dtype {embedding.dtype} for item "
                f"{item.hash!r}: expected {dtype_reference}"
            )
    return per_item


def check_finite(
    per_item: Sequence[torch.Tensor],
    items: Sequence[Item],
    *,
    plugin_name: str,
    modality: str,
) -> None:
    """Reject NaN/Inf rows (opt-in debugging aid: it reads every value back).

    :raises EncoderOutputError: naming the first item whose embedding is not finite.
    """
    for item, embedding in zip(items, per_item):
        finite = torch.isfinite(embedding)
        if not bool(finite.all()):
            bad_rows = int((~finite).any(dim=-1).sum())
            raise EncoderOutputError(
                f"{_where(plugin_name, modality)} returned non-finite values (NaN/Inf) in "
                f"{bad_rows} of {embedding.shape[0]} rows for item {item.hash!r}: expected finite "
                "embeddings"
            )
