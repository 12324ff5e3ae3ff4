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

    :param pinned: vitbatch's copy path: features live in pinned host memory
        (pinned once per distinct image, as :class:`~vitbatch.core.HostReferenceOffload`
        leaves them) and each one is copied by DMA straight into its slice of the
        device batch with ``non_blocking=True`` — no host-side concatenation, no
        wait. Otherwise the legacy path: concatenate on the host, one pageable,
        blocking copy.
    :param pinned_cache: shared map from a host feature to its pinned twin, so a
        mode pins each image once across passes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        pinned: bool,
        pinned_cache: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.pinned = pinned  # the copy path; actual pinning needs CUDA (see pinned_features)
        self.pinned_cache = pinned_cache if pinned_cache is not None else {}
        self.calls = 0

    def pinned_features(self, item: Item) -> torch.Tensor:
        features = item.features
        if self.device.type != "cuda":
            return features  # same copy path, nothing to pin without CUDA
        twin = self.pinned_cache.get(id(features))
        if twin is None:
            twin = features.pin_memory()
            self.pinned_cache[id(features)] = twin
        return twin

    @hookimpl
    def vitbatch_encode_batch(self, modality: str, items: Sequence[Item]) -> torch.Tensor | None:
        if modality != "image":
            return None
        self.calls += 1
        host = [item.features for item in items]
        rows = sum(f.shape[0] for f in host)
        if self.pinned:
            batch = torch.empty((rows, host[0].shape[1]), dtype=host[0].dtype, device=self.device)
            offset = 0
            for item in items:
                features = self.pinned_features(item)
                batch[offset : offset + features.shape[0]].copy_(features, non_blocking=True)
                offset += features.shape[0]
            pixel_values = batch.to(self.dtype)
        else:
            pixel_values = torch.cat(host, dim=0).to(self.device).to(self.dtype)
        grids = [item.payload.grid for item in items]
        with torch.inference_mode():
            return self.model(pixel_values, grids)
