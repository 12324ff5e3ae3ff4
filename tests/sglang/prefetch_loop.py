"""SGLang's real ``Scheduler.event_loop_normal`` / ``event_loop_overlap`` with the prefetch on.

Run as a script (``test_prefetch_loop.py``), in a process of its own: the scheduler module
imports a process-title helper and the HTTP server's packages at the top, which a CPU test
environment may lack and the loop never uses; only those are stubbed, only where missing.
``Scheduler.run_batch`` is replaced, *before* vitbatch's hooks are applied, by a forward that
runs the batch's multimodal step (SGLang's ``get_embedding_and_mask``, vitbatch's hook on
it), so the hooks vitbatch registers wrap it exactly as they wrap SGLang's own; everything
else the loops call is SGLang's code or a stub for scheduling state (admission: one waiting
request per iteration).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from types import ModuleType, SimpleNamespace
from unittest import mock

for top, names in (("setproctitle", ()), ("uvicorn", ()), ("fastapi", ("responses",))):
    if importlib.util.find_spec(top) is None:
        for name in (top, *(f"{top}.{sub}" for sub in names)):
            stub = mock.MagicMock(name=name)
            stub.__path__, stub.__spec__ = [], None
            sys.modules[name] = stub  # type: ignore[assignment]

import torch  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from tests.sglang.conftest import mm_schedule  # noqa: E402
from tests.sglang.test_prefetch import TowerEncoder, forward, hashes, queue_a  # noqa: E402
from vitbatch.adapters import sglang as adapter  # noqa: E402
from vitbatch.adapters.sglang import surface  # noqa: E402

assert isinstance(sys.modules["sglang.srt.managers.scheduler"], ModuleType)


def fake_run_batch(self, batch):
    return forward(batch.reqs, [(0, r.test_length) for r in batch.reqs], self.encoder)


def fake_on_idle(self):
    self.idle += 1
    self.gracefully_exit = self.idle >= 2  # one idle iteration with its tick, then stop


def scheduler_for(queue, encoder) -> Scheduler:
    scheduler = Scheduler.__new__(Scheduler)
    outputs: list = []

    def next_batch(running_batch=None, last_batch=None):
        if not scheduler.waiting_queue:
            return SimpleNamespace(running_batch=None, batch_to_run=None)
        req = scheduler.waiting_queue.pop(0)
        batch = SimpleNamespace(reqs=[req])
        batch.copy = lambda: batch
        return SimpleNamespace(running_batch=None, batch_to_run=batch)

    fields = dict(
        waiting_queue=list(queue),
        encoder=encoder,
        outputs=outputs,
        idle=0,
        gracefully_exit=False,
        _engine_paused=False,
        running_batch=None,
        last_batch=None,
        enable_unified_memory=False,
        is_generation=False,
        ingest_requests=lambda: None,  # 0.5.18+
        request_receiver=SimpleNamespace(recv_requests=lambda: []),  # 0.5.17
        process_input_requests=lambda reqs: None,
        get_next_batch_to_run=next_batch,
        process_batch_result=lambda batch, result: outputs.append(result),
        is_disable_overlap_for_batch=lambda batch, last_batch=None: False,
        _apply_war_barrier=lambda: None,
    )
    for key, value in fields.items():
        object.__setattr__(scheduler, key, value)
    return scheduler


def main() -> dict:
    Scheduler.run_batch = fake_run_batch
    Scheduler.on_idle = fake_on_idle
    os.environ.update(VITBATCH_ENABLE="1", VITBATCH_PREFETCH="1")
    HookRegistry.reset()
    adapter.register()
    HookRegistry.apply_hooks()
    result: dict = {
        "problem": surface.prefetch_problem(),
        "hooked": hasattr(Scheduler.run_batch, "__wrapped__")
        and hasattr(Scheduler.on_idle, "__wrapped__"),
    }
    for loop in ("event_loop_normal", "event_loop_overlap"):
        mm_schedule.init_mm_embedding_cache(1 << 20)
        state = adapter.reset_state()
        encoder = TowerEncoder()
        queue = queue_a()
        scheduler = scheduler_for(queue, encoder)
        getattr(Scheduler, loop)(scheduler)
        stats = state.prefetcher.ledger.stats
        expected = [
            torch.cat([encoder.__class__()([item]) for item in req.multimodal_inputs.mm_items])
            for req in queue
        ]
        got = [step[0][1] for step in scheduler.outputs]
        result[loop] = {
            "calls": hashes(encoder),
            "stats": [stats.prefetched, stats.consumed, stats.wasted, stats.bytes_held],
            "equal": len(got) == len(expected)
            and all(torch.equal(a, b) for a, b in zip(got, expected)),
            "step_calls": state.batcher.totals.encoder_calls,
        }
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()))
