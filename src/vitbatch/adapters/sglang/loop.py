"""The interception of SGLang's scheduler loop: one prefetch tick per iteration.

``Scheduler.run_batch`` and ``Scheduler.on_idle`` get an AFTER hook
(:func:`surface.hook_scheduler_loop`) only when the encoder prefetch is switched on.
With a batch, the tick runs once the step's forward is launched and before its results
are processed, so the prefetch's encoder work is queued while that forward runs; without
one (idle), it still releases what aborted requests held. Whatever happens here, the
scheduler gets the hooked method's own result.
"""

from __future__ import annotations

from typing import Any

from vitbatch.adapters.sglang.state import get_state


def after_iteration(_result: Any, scheduler: Any, *_args: Any, **_kwargs: Any) -> None:
    """The AFTER hook (both methods): ``None`` keeps the method's result."""
    try:
        prefetcher = get_state().prefetcher
    except Exception:  # noqa: BLE001 - a state that cannot be built is the step's to report
        return None
    if prefetcher is not None:
        prefetcher.tick(scheduler)  # never raises: faults turn it off for the iteration
    return None
