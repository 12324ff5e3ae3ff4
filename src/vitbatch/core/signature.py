"""Which embedding width and dtype an encoder's outputs must have, per modality.

Why a vote: an engine knows its model's width and dtype and the adapters pass
them (then every output is checked against them, strictly). Used without an
engine, the core has to learn them from the outputs themselves, and a single
call is not evidence: a malformed first call must not poison the modality.
So a signature (width, dtype) is *trusted* only once two calls in a row agree
on it, and nothing is cached before that — unless the width is configured:
then the first output of that width has passed an independent check and its
dtype is adopted (pass the dtype too for a strict check of both). A learned signature can also be
wrong (the first two calls were the malformed ones); it is replaced when more
calls in a row agree on another signature than ever agreed on it (counted up
to :data:`MAX_SUPPORT`), so a process is never locked out for good. The caller
then drops what it cached under the old signature.

Configured fields never change by vote: an output that contradicts one is
rejected, always.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

MAX_SUPPORT = 8
"""Most agreeing calls a learned signature counts: a challenger replaces it after
at most ``MAX_SUPPORT + 1`` calls in a row that agree with each other."""


@dataclass(frozen=True)
class Signature:
    """The shape-independent part of an embedding: its width and dtype."""

    width: int
    dtype: torch.dtype

    @classmethod
    def of(cls, embedding: torch.Tensor) -> Signature:
        return cls(int(embedding.shape[-1]), embedding.dtype)

    def __str__(self) -> str:
        return f"hidden size {self.width}, {self.dtype}"


class Verdict(Enum):
    """What a call's signature means for its outputs."""

    TRUSTED = "trusted"
    """Agrees with the trusted signature: serve and cache."""
    UNTRUSTED = "untrusted"
    """No signature is trusted yet: serve, do not cache."""
    RELEARNED = "relearned"
    """Replaced a learned signature: serve and cache; drop entries of the old one."""
    REJECTED = "rejected"
    """Contradicts the trusted signature: the call's outputs must not be served."""


@dataclass
class _Vote:
    learned: Signature | None = None
    support: int = 0
    candidate: Signature | None = None
    streak: int = 0


class OutputSignatures:
    """Configured and learned output signatures of every modality of one batcher.

    :param hidden_size: the engine's width, one for every modality or per modality.
    :param dtype: the engine's embedding dtype, likewise.
    """

    def __init__(
        self,
        hidden_size: int | Mapping[str, int] | None = None,
        dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    ) -> None:
        self._width_default, self._widths = _split("hidden_size", hidden_size, _check_width)
        self._dtype_default, self._dtypes = _split("dtype", dtype, _check_dtype)
        self._votes: dict[str, _Vote] = {}

    def configured_width(self, modality: str) -> int | None:
        return self._widths.get(modality, self._width_default)

    def configured_dtype(self, modality: str) -> torch.dtype | None:
        return self._dtypes.get(modality, self._dtype_default)

    def trusted(self, modality: str) -> Signature | None:
        """The signature outputs of ``modality`` must have, once it is known in full."""
        width, dtype = self.configured_width(modality), self.configured_dtype(modality)
        if width is not None and dtype is not None:
            return Signature(width, dtype)
        vote = self._votes.get(modality)
        if vote is None or vote.learned is None:
            return None
        return Signature(
            width if width is not None else vote.learned.width,
            dtype if dtype is not None else vote.learned.dtype,
        )

    def expected_width(self, modality: str) -> int | None:
        """The width outputs must have: configured, or learned and trusted."""
        trusted = self.trusted(modality)
        if trusted is not None:
            return trusted.width
        return self.configured_width(modality)

    def contradiction(self, modality: str, seen: Signature) -> str | None:
        """What of ``seen`` contradicts a *configured* field, as 'X: expected Y'; else None."""
        width, dtype = self.configured_width(modality), self.configured_dtype(modality)
        if width is not None and seen.width != width:
            return f"hidden size {seen.width}: expected {width}"
        if dtype is not None and seen.dtype != dtype:
            return f"dtype {seen.dtype}: expected {dtype}"
        return None

    def observe(self, modality: str, seen: Signature) -> Verdict:
        """Count one call whose every output has signature ``seen``."""
        if self.contradiction(modality, seen) is not None:
            return Verdict.REJECTED
        if (
            self.configured_width(modality) is not None
            and self.configured_dtype(modality) is not None
        ):
            return Verdict.TRUSTED
        vote = self._votes.setdefault(modality, _Vote())
        if vote.learned == seen:
            vote.support = min(MAX_SUPPORT, vote.support + 1)
            vote.candidate, vote.streak = None, 0
            return Verdict.TRUSTED
        vote.streak = vote.streak + 1 if vote.candidate == seen else 1
        vote.candidate = seen
        if vote.learned is None:
            if vote.streak < 2 and self.configured_width(modality) is None:
                return Verdict.UNTRUSTED
            vote.learned, vote.support = seen, vote.streak
            vote.candidate, vote.streak = None, 0
            return Verdict.TRUSTED
        if vote.streak <= vote.support:
            return Verdict.REJECTED
        vote.learned, vote.support = seen, vote.streak
        vote.candidate, vote.streak = None, 0
        return Verdict.RELEARNED


def _split(name: str, value: Any, check: Callable[[str, object], None]) -> tuple[Any, dict]:
    """``(default, per-modality dict)`` of a configured value, each checked."""
    if value is None:
        return None, {}
    if isinstance(value, Mapping):
        per = dict(value)
        for modality, entry in per.items():
            check(f"{name}[{modality!r}]", entry)
        return None, per
    check(name, value)
    return value, {}


def _check_width(name: str, width: object) -> None:
    if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
        raise ValueError(f"VitBatcher {name} must be a positive int, got {width!r}")


def _check_dtype(name: str, dtype: object) -> None:
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"VitBatcher {name} must be a torch.dtype, got {dtype!r}")
