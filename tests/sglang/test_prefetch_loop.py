"""The prefetch's hook point on SGLang's real scheduler loops (``prefetch_loop.py``).

Both ``event_loop_normal`` and ``event_loop_overlap`` of the installed SGLang, with
vitbatch's hooks registered by its entry point and applied by SGLang's ``HookRegistry``:
after the first request's step, the AFTER hook on ``run_batch`` prefetches every other
waiting request's items; their steps then encode nothing, and every step's embeddings
equal the items' own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.plugins")

ROOT = Path(__file__).resolve().parents[2]


def test_real_event_loops_prefetch_waiting_requests() -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    environment.pop("SGLANG_PLUGINS", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.sglang.prefetch_loop"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["problem"] is None and result["hooked"] is True
    for loop in ("event_loop_normal", "event_loop_overlap"):
        assert result[loop] == {
            "calls": [[11, 12], [21, 22, 31, 41]],  # r0's step, then the prefetch of r1..r3
            "stats": [4, 4, 0, 0],  # prefetched, consumed, wasted, bytes held
            "equal": True,
            "step_calls": 1,
        }, loop
