"""CPU-reference offload: releasing a device copy makes no device-to-host copy.

CI has no GPU; the ``meta`` device stands in for it: a real ``.to()`` happens on
the way in, and any copy back would be a real ``.to("cpu")`` that we count by
wrapping ``torch.Tensor.to``.
"""

from __future__ import annotations

from unittest import mock

import torch

from vitbatch.core import HostReferenceOffload


def count_host_copies():
    """Count device-to-host ``.to`` calls; a ``meta`` tensor's copy yields a fresh host tensor.

    (``meta`` has no data to copy, so the stand-in copy returns an empty host
    tensor of the same shape and dtype, as a real device would.)
    """
    real_to = torch.Tensor.to
    calls = []

    def spy(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if str(target).startswith("cpu") and self.device.type != "cpu":
            calls.append(self.numel() * self.element_size())
            if self.device.type == "meta":
                return torch.empty(self.shape, dtype=self.dtype)
        return real_to(self, *args, **kwargs)

    return calls, mock.patch.object(torch.Tensor, "to", spy)


def test_release_returns_host_reference_without_copy() -> None:
    offload = HostReferenceOffload(pin=False)
    host = {"pixel_values": torch.randn(10, 8), "grid": torch.tensor([[1, 2, 5]])}
    calls, patch = count_host_copies()
    with patch:
        moved = offload.to_device_tree(host, "meta")
        assert moved["pixel_values"].device.type == "meta"
        released = offload.release_tree(moved)
    assert calls == []
    assert released["pixel_values"] is host["pixel_values"] and released["grid"] is host["grid"]
    assert offload.stats.d2h_copies_avoided == 2
    assert offload.stats.d2h_bytes_avoided == 10 * 8 * 4 + 3 * 8
    assert offload.stats.h2d_copies == 2 and len(offload) == 0


def test_device_born_tensor_is_copied_and_counted() -> None:
    offload = HostReferenceOffload(pin=False)
    born_on_device = torch.empty(4, 4, device="meta")
    calls, patch = count_host_copies()
    with patch:
        released = offload.release(born_on_device)
    assert released.device.type == "cpu" and released.shape == (4, 4)
    assert calls == [64]
    assert offload.stats.d2h_copies == 1 and offload.stats.d2h_copies_avoided == 0


def test_forgotten_device_tensor_drops_its_entry() -> None:
    offload = HostReferenceOffload(pin=False)
    moved = offload.to_device(torch.randn(3), "meta")
    assert len(offload) == 1
    del moved
    assert len(offload) == 0


def test_same_device_is_a_no_op() -> None:
    offload = HostReferenceOffload(pin=False)
    host = torch.randn(3)
    assert offload.to_device(host, "cpu") is host
    assert offload.release(host) is host
    assert offload.stats.h2d_copies == 0 and offload.stats.d2h_copies == 0


def test_pinned_twin_is_returned_and_never_pinned_twice() -> None:
    """With pinning on, the host reference handed back is the pinned copy, so the
    next chunk's move of the same features pins nothing. ``pin_memory`` is
    replaced by a marker copy (CI has no CUDA to pin with)."""
    pinned: list[torch.Tensor] = []

    def fake_pin(self):
        twin = self.clone()
        pinned.append(twin)
        return twin

    offload = HostReferenceOffload(pin=True)
    host = torch.randn(6, 4)
    with (
        mock.patch.object(torch.Tensor, "pin_memory", fake_pin),
        mock.patch.object(torch.Tensor, "is_pinned", lambda self: any(self is p for p in pinned)),
        mock.patch("vitbatch.core.offload._pin_target", lambda device: True),
    ):
        first = offload.release(offload.to_device(host, "meta"))
        second = offload.release(offload.to_device(first, "meta"))
    assert len(pinned) == 1 and first is pinned[0] and second is first
    torch.testing.assert_close(first, host)
    assert offload.stats.pinned_bytes == 6 * 4 * 4 and offload.stats.d2h_copies == 0
