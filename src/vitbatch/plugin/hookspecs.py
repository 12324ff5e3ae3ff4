"""Hook specifications of vitbatch.

Each hook is called by :class:`vitbatch.core.batcher.VitBatcher` with keyword
arguments; an implementation may accept fewer arguments than the spec lists, so
specs can grow without breaking plugins. Implementations are found in, in
calling order: plugins registered with ``tryfirst=True``, third-party plugins
from the ``vitbatch`` entry-point group (last installed first), and the defaults
in :mod:`vitbatch.plugin.defaults` (``trylast=True``).

Both hooks are *firstresult* and are called from the process that runs the
vision encoder: SGLang's scheduler (TP worker) process, vLLM's worker process,
or ``vitbatch bench``. Hookwrappers are not supported on
``vitbatch_encode_batch``, because the batcher must know which plugin produced
an answer to name it in errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from vitbatch.core.items import EngineEncoder, Item, Window

PROJECT_NAME = "vitbatch"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Encoding
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def vitbatch_encode_batch(
    modality: str,
    items: Sequence[Item],
    engine_encoder: EngineEncoder | None,
) -> torch.Tensor | Sequence[torch.Tensor] | None:
    """Encode one micro-batch of items that the planner grouped together.

    Called once per encoder call the plan makes: every item of ``items`` missed
    the embedding cache, is unique in the step, shares ``modality`` and
    ``Item.group``, and the batch respects the configured token budget. Return
    ``None`` to decline (e.g. a modality or model you do not handle): the next
    implementation is asked, and the default calls the engine's own encoder.

    :param modality: the items' modality (``"image"``, ``"video"``, ``"audio"``...).
    :param items: the items to encode, in plan order. Their ``features`` hold the
        encoder input as the adapter built it (host tensors unless the engine
        already moved them); ``payload`` holds the engine's own object.
    :param engine_encoder: the engine's own encoder for this modality, as a
        callable taking the items and returning embeddings in one of the forms
        below; ``None`` outside an engine (then a plugin must encode).
    :returns: one tensor ``[sum(item.num_tokens), hidden]`` with the items' rows
        concatenated in order, or a sequence of one ``[item.num_tokens, hidden]``
        tensor per item; ``None`` to pass. The batcher validates the shape and
        raises :class:`vitbatch.core.errors.EncoderOutputError` naming your plugin,
        the modality and the item if it is wrong.

    Stops at first non-None result.
    """


# -------------------------------------------------------------------------
# Assembly
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def vitbatch_assemble_chunk(
    window: Window,
    items: Sequence[Item],
    embeddings: Sequence[torch.Tensor],
) -> torch.Tensor | None:
    """Build one request's embedding rows for the positions of its chunk window.

    Called once per request of the step whose window overlaps at least one item,
    after every needed embedding is available (from the cache or just encoded).

    :param window: the request's chunk window ``[prefix_len, prefix_len + extend_len)``.
    :param items: the request's items that overlap ``window``, in request order.
    :param embeddings: the full embedding of each item of ``items`` (same order),
        ``[item.num_tokens, hidden]``.
    :returns: ``[n, hidden]`` where ``n`` is the number of placeholder positions
        of ``items`` inside ``window``; row ``i`` is the embedding of the ``i``-th
        such position in increasing position order. The batcher checks ``n``.
        ``None`` to pass.

    Stops at first non-None result.
    """
