"""A directory of embeddings, one ``<hash>-<num_tokens>.pt`` file per item."""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path

import torch

STORE_ENV = "VITBATCH_EMBEDDING_STORE"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class EmbeddingStore:
    """Read and write precomputed embeddings keyed like vitbatch's cache (hash, tokens)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, hash_: Hashable, num_tokens: int) -> Path:
        return self.root / f"{_SAFE.sub('_', str(hash_))}-{num_tokens}.pt"

    def put(self, hash_: Hashable, embedding: torch.Tensor) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(hash_, embedding.shape[0])
        torch.save(embedding.detach().cpu().contiguous(), path)
        return path

    def get(self, hash_: Hashable, num_tokens: int) -> torch.Tensor | None:
        path = self.path(hash_, num_tokens)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
