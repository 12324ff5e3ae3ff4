"""CPU-reference feature offload.

Engines move an item's features host→device for the encoder and, once the
forward is done, copy them device→host again to free device memory
(``feature.to("cpu", non_blocking=True)`` plus an event later steps wait on).
That second copy is pure waste when the features *came* from the host: the
original host tensor is still valid and unchanged. :class:`HostReferenceOffload`
remembers the host tensor when it moves a feature to the device, and on release
hands that reference back instead of copying.

Features that were born on the device (e.g. received by CUDA IPC) have no host
reference; releasing them falls back to a real copy, which is counted too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from vitbatch.core.cache import tensor_bytes


@dataclass
class OffloadStats:
    """Cumulative counters of :class:`HostReferenceOffload`."""

    h2d_copies: int = 0
    h2d_bytes: int = 0
    pinned_bytes: int = 0
    d2h_copies: int = 0
    d2h_bytes: int = 0
    d2h_copies_avoided: int = 0
    d2h_bytes_avoided: int = 0


def _is_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _pin_target(device: torch.device) -> bool:
    """Whether copies to ``device`` need pinned host memory to be asynchronous."""
    return device.type == "cuda"


class HostReferenceOffload:
    """Moves features to a device while keeping their host tensors.

    State lives here (device tensor → host tensor), so this is a class. The map
    holds the device tensor weakly: if the engine drops the device copy without
    releasing it, the entry disappears with it.

    :param pin: pin host tensors before copying (needed for truly asynchronous
        host→device copies). Defaults to ``torch.cuda.is_available()``.
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._host_of: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self.stats = OffloadStats()

    def __len__(self) -> int:
        return len(self._host_of)

    def to_device(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Copy a host tensor to ``device`` (non-blocking), remembering the host tensor.

        When pinning is on and ``tensor`` is pageable, it is pinned once; the
        pinned copy (same content) is what :meth:`release` returns.

        A tensor already on ``device`` is returned as is; a tensor on another
        accelerator is moved without a host reference.
        """
        device = torch.device(device)
        if tensor.device == device or (device.type == tensor.device.type and device.index is None):
            return tensor
        if not _is_host(tensor):
            return tensor.to(device, non_blocking=True)
        host = tensor
        if self.pin and _pin_target(device) and not tensor.is_pinned():
            host = tensor.pin_memory()
            self.stats.pinned_bytes += tensor_bytes(host)
        moved = host.to(device, non_blocking=True)
        self.stats.h2d_copies += 1
        self.stats.h2d_bytes += tensor_bytes(host)
        # Hand back the pinned twin on release: the next move of the same
        # features (the next prefill chunk) then needs no pinning at all.
        self._remember(moved, host)
        return moved

    def to_device_tree(self, features: Any, device: torch.device | str) -> Any:
        """:meth:`to_device` applied to every tensor of a tensor, dict, list or tuple."""
        if isinstance(features, torch.Tensor):
            return self.to_device(features, device)
        if isinstance(features, dict):
            return {name: self.to_device_tree(value, device) for name, value in features.items()}
        if isinstance(features, (list, tuple)):
            return type(features)(self.to_device_tree(value, device) for value in features)
        return features

    def host_reference(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The host tensor ``tensor`` was copied from, if this object moved it."""
        entry = self._host_of.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def release(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a host tensor with ``tensor``'s content, copying only if needed.

        :returns: the remembered host reference (no copy), ``tensor`` itself if it
            is already on the host, or a non-blocking device→host copy.
        """
        if _is_host(tensor):
            return tensor
        host = self.host_reference(tensor)
        if host is not None:
            del self._host_of[id(tensor)]
            self.stats.d2h_copies_avoided += 1
            self.stats.d2h_bytes_avoided += tensor_bytes(host)
            return host
        self.stats.d2h_copies += 1
        self.stats.d2h_bytes += tensor_bytes(tensor)
        return tensor.to("cpu", non_blocking=True)

    def release_tree(self, features: Any) -> Any:
        """:meth:`release` applied to every tensor of a tensor, dict, list or tuple."""
        if isinstance(features, torch.Tensor):
            return self.release(features)
        if isinstance(features, dict):
            return {name: self.release_tree(value) for name, value in features.items()}
        if isinstance(features, (list, tuple)):
            return type(features)(self.release_tree(value) for value in features)
        return features

    def _remember(self, moved: torch.Tensor, host: torch.Tensor) -> None:
        key = id(moved)
        ref = weakref.ref(moved, lambda _ref, key=key: self._forget(key, _ref))
        self._host_of[key] = (ref, host)

    def _forget(self, key: int, ref: weakref.ref[torch.Tensor]) -> None:
        entry = self._host_of.get(key)
        if entry is not None and entry[0] is ref:
            del self._host_of[key]
