"""Serve precomputed vision embeddings through vitbatch's encode-batch hook."""

from vitbatch_embedding_store.store import STORE_ENV, EmbeddingStore

__all__ = ["STORE_ENV", "EmbeddingStore"]
