"""The benchmark's encoder: the bundled ViT exposed through the encode-batch hook.

It is a plugin like any third-party encoder, so the benchmark exercises the same
path an engine does: planner → hook → validation → cache → assembly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitbatch import hookimpl
from vitbatch.core import Item


class EmbeddedEncoder:
    """Encodes image items with a :class:`~vitbatch.encoders.qwen_vision.QwenVisionEncoder`.

    :param pinned: stage the micro-batch's features in pinned host memory and
        copy them with ``non_blocking=True`` (vitbatch's copy path); otherwise a
        plain pageable, blocking copy (the legacy path).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, pinned: bool) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pinned = pinned and device.type == "cuda"
        self.calls = 0

    @hookimpl
    def vitbatch_encode_batch(self, modality: str, items: Sequence[Item]) -> torch.Tensor | None:
        if modality != "image":
            return None
        self.calls += 1
        host = [item.features for item in items]
        rows = sum(f.shape[0] for f in host)
        if self.pinned:
            staged = torch.empty((rows, host[0].shape[1]), dtype=host[0].dtype, pin_memory=True)
            torch.cat(host, dim=0, out=staged)
            pixel_values = staged.to(self.device, dtype=self.dtype, non_blocking=True)
        else:
            pixel_values = torch.cat(host, dim=0).to(self.device).to(self.dtype)
        grids = [item.payload.grid for item in items]
        with torch.inference_mode():
            return self.model(pixel_values, grids)
