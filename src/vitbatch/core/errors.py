"""Errors the core raises. Each names the encoder plugin, the modality and the item.

Adapters catch :class:`VitBatchError` (and anything else) around a step and fall
back to the engine's native path, so a bad plugin costs speed, never a request.
"""

from __future__ import annotations

import torch

OutOfMemoryError: type[BaseException] = getattr(
    torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError
)
"""The device OOM error an encoder call may raise; the batcher halves the batch on it
(``torch.OutOfMemoryError`` in torch >= 2.5, ``torch.cuda.OutOfMemoryError`` before)."""


class VitBatchError(RuntimeError):
    """Base class of vitbatch's own errors."""


class NoEncoderError(VitBatchError):
    """No hook implementation encoded a micro-batch and the engine gave no encoder."""


class EncoderOutputError(VitBatchError):
    """An encoder returned embeddings of the wrong count or shape."""


class AssemblyError(VitBatchError):
    """An assemble-chunk implementation returned the wrong number of rows."""


class PluginCallError(VitBatchError):
    """A hook implementation raised; the message names the plugin, hook and items."""
