"""Per-process state of the SGLang adapter: this scheduler process's batcher.

Counters come from the batcher's :class:`~vitbatch.core.stats.Totals` (one
count, which the metrics export too): steps SGLang's own path served because
vitbatch failed (``fallbacks``) or cannot reproduce them (``unsupported``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from vitbatch.adapters.sglang import surface
from vitbatch.adapters.sglang.cache import SGLangDeviceTier
from vitbatch.adapters.sglang.prefetch import Prefetcher
from vitbatch.adapters.sglang.settings import Settings
from vitbatch.core import EmbeddingCache, HostReferenceOffload, VitBatcher
from vitbatch.core.agreement import group_agree
from vitbatch.metrics import export_batcher

logger = logging.getLogger("vitbatch.sglang")

MB = 1 << 20


class AdapterState:
    """The batcher of this scheduler process, and what went wrong so far."""

    def __init__(self, settings: Settings) -> None:
        cache = EmbeddingCache(
            device_tier=SGLangDeviceTier(), host_capacity_bytes=settings.host_cache_mb * MB
        )
        self.settings = settings
        self.offload = HostReferenceOffload()  # features moved to the device keep their host copy
        self.batcher = VitBatcher(
            settings.budget(),
            cache,
            check_finite=settings.check_finite,
            offload=self.offload,
            agree=group_agree(group) if (group := _agree_group()) is not None else None,
        )
        self._logged: set[str] = set()
        if (warning := settings.deprecation()) is not None:
            self.log_once("deprecated", "%s", warning)
        self._model_seen = False
        self.prefetcher = self._prefetcher(settings)
        export_batcher(
            self.batcher,
            surface.metric_labels(),
            prefetch=(lambda: self.prefetcher.ledger.stats) if self.prefetcher else None,
        )

    def _prefetcher(self, settings: Settings) -> Prefetcher | None:
        """The encoder prefetch, when switched on and safe here: at attention-TP size 1 only.
        Above it every encoder call is a collective over the ranks; a side-stream call
        beside the step's own collectives could order them differently per rank."""
        if not (settings.enabled and settings.prefetch):
            return None
        if self.batcher.agree is not None:
            self.log_once(
                "prefetch-tp",
                "vitbatch: the encoder prefetch is off at attention-TP size > 1 (encoder calls "
                "are collectives there); vitbatch's step still serves every multimodal step",
            )
            return None
        return Prefetcher(self.batcher, settings.prefetch_limits(), self.log_once)

    @property
    def fallbacks(self) -> int:
        """Steps SGLang's own path served because vitbatch failed on them."""
        return self.batcher.totals.fallbacks.get("error", 0)

    @property
    def unsupported(self) -> int:
        """Steps SGLang's own path served because vitbatch cannot reproduce them exactly."""
        return self.batcher.totals.fallbacks.get("unsupported", 0)

    def see_model(self, data_embedding_func: Callable) -> None:
        """Take the embedding width from the model the first time a step names it."""
        if not self._model_seen:
            self._model_seen = True
            width = _expected_hidden_size(data_embedding_func)
            if width is not None:
                self.batcher.set_hidden_size(width, _expected_dtype(data_embedding_func))

    def log_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning(message, *args, exc_info=exc_info)


def _expected_hidden_size(data_embedding_func: Callable) -> int | None:
    """The LLM's hidden size (what every multimodal embedding row must have), read from the
    model that owns ``data_embedding_func`` (a bound method of the model, or a callable
    model); ``None`` when no config says it."""
    owner = getattr(data_embedding_func, "__self__", data_embedding_func)
    config = getattr(owner, "config", None)
    for candidate in (getattr(config, "text_config", None), config):
        width = getattr(candidate, "hidden_size", None)
        if isinstance(width, int) and width > 0:
            return width
    return None


def _expected_dtype(data_embedding_func: Callable) -> torch.dtype | None:
    """The dtype SGLang's own encoder outputs have: its vision tower's parameters'; ``None``
    when the model has no tower to read (the core then adopts the first output's)."""
    owner = getattr(data_embedding_func, "__self__", data_embedding_func)
    for name in ("visual", "vision_tower", "vision_model"):
        tower = getattr(owner, name, None)
        parameters = getattr(tower, "parameters", None)
        if callable(parameters):
            first = next(iter(parameters()), None)
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                return first.dtype
    return None


def _agree_group() -> Any:
    """The CPU group of the attention-TP ranks, or ``None`` at attention-TP size 1.

    Every encoder call at attention-TP > 1 is a collective: the tower is sharded
    over the group, and with ``--mm-enable-dp-encoder`` each call's items are
    split over the ranks and all-gathered. Each rank has its own copy of
    SGLang's embedding cache (a per-process global), and the caches drift apart
    (a step served natively on one rank's terms, an eviction order changed by a
    failed restore), so a hit on one rank may be a miss on another. SGLang after
    0.5.23 agrees its cache misses over this group before encoding (a SUM
    all-reduce of per-item miss flags; an item missed anywhere is encoded
    everywhere); vitbatch's agreement 1 (``vitbatch.core.agreement``) does the
    same for its own plan — per distinct item "no usable cached embedding",
    MAX-reduced — plus a step checksum and the call capacity, so its micro-batches
    are identical on every rank whatever each rank's cache holds."""
    return surface.attn_tp_cpu_group()


_state: AdapterState | None = None
_state_error_logged = False


def log_state_error(error: Exception) -> None:
    global _state_error_logged
    if not _state_error_logged:
        _state_error_logged = True
        logger.error("vitbatch could not start (%s); SGLang's native path serves every step", error)


def get_state() -> AdapterState:
    global _state
    if _state is None:
        _state = AdapterState(Settings.from_env())
    return _state


def reset_state(settings: Settings | None = None) -> AdapterState:
    """A fresh batcher (tests; or after changing the settings)."""
    global _state
    _state = AdapterState(settings or Settings.from_env())
    return _state
