"""The one place the encoder prefetch switches CUDA streams (TensorRT-LLM's pattern).

Why one place: the prefetch encodes while the step's forward runs, on a stream of
its own, and everything that makes that safe is ordering between two streams.
Scattered through callers, one missing wait is a silent race. Here:

* :meth:`SideStream.launch` runs its body on the device's side stream (created
  once per device) and records an event at the end: the prefetch's *completion*.
  The side stream first waits for the current stream only when an input already
  lives on the device (it may still be being written); host inputs need no wait,
  so the prefetch never queues behind the forward it is meant to overlap.
* :func:`consume` makes the *consuming* stream wait for that event — a device-side
  wait, no host synchronisation — and marks the embedding as used by that stream
  (``record_stream``), so the caching allocator never hands its memory back to the
  side stream while the step may still read it.
* :func:`done` asks whether the work finished, without waiting (``Event.query``).

On a device without CUDA (the CPU tests) the body runs inline, the event is
``None``, and every function here is a no-op: the same code path, minus streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Launch:
    """What a :meth:`SideStream.launch` body produced: the event its work completes
    (``None`` inline, or when the body raised before the end)."""

    event: Any = None


class SideStream:
    """One side stream per CUDA device, created on first use."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    @contextmanager
    def launch(self, device: torch.device, inputs_on_device: bool = False) -> Iterator[Launch]:
        """Run the body on ``device``'s side stream (inline off CUDA); the yielded
        :class:`Launch` holds the completion event once the body returns."""
        launch = Launch()
        if device.type != "cuda":
            yield launch
            return
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        if inputs_on_device:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield launch
            event = torch.cuda.Event()
            event.record(stream)
            launch.event = event


def done(event: Any) -> bool:
    """Whether the work behind ``event`` has finished (never waits)."""
    return event is None or bool(event.query())


def consume(event: Any, embedding: torch.Tensor) -> None:
    """Order the current stream after ``event`` and keep ``embedding``'s memory from the
    side stream until the current stream is done with it."""
    if embedding.device.type != "cuda":
        return
    stream = torch.cuda.current_stream(embedding.device)
    if event is not None:
        stream.wait_event(event)
    embedding.record_stream(stream)
