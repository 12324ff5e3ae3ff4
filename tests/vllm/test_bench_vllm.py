"""``vitbatch bench-vllm`` against the real vLLM (CPU backend, tiny Qwen2.5-VL shape).

The command a user runs on a GPU must also hold its promises on a small run:
both modes answer every prompt with identical greedy tokens, vitbatch's
encoder calls are counted, and on ``resend`` the later turns come back from
the host tier (vLLM's encoder cache, bounded by ``--max-num-batched-tokens``,
has evicted them). Workload shapes are checked without vLLM too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitbatch.bench import vllm_engine


def test_workload_phases_and_the_resend_later_turns() -> None:
    mixed = vllm_engine.workload("mixed", 2, scale=0.25)
    assert len(mixed) == 1 and all(1 <= len(r.images) <= 4 for r in mixed[0])
    first_and_fillers, later = vllm_engine.workload("resend", 2, scale=0.25)
    firsts = first_and_fillers[: len(later)]
    assert [r.images for r in later] == [r.images for r in firsts]
    fillers = {image for r in first_and_fillers[len(later) :] for image in r.images}
    assert not fillers & {image for r in later for image in r.images}
    video = vllm_engine.workload("video", 2, scale=0.25)[0]
    shared = set.intersection(*(set(r.images) for r in video))
    assert len(shared) == 2 and all(len(r.images) == 8 for r in video)
    # another seed: other contents, so a timed pass never hits what an earlier pass encoded
    other = vllm_engine.workload("resend", 3, scale=0.25)[1]
    assert not {i for r in other for i in r.images} & {i for r in later for i in r.images}
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        vllm_engine.workload("nope", 0)


def test_bench_vllm_runs_both_modes_equal_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "vitbatch.cli",
        "bench-vllm",
        "--shape",
        "tiny",
        "--runners",
        "v1",
        "--dtype",
        "float32",
        "--scale",
        "0.1",
        "--passes",
        "1",
        "--max-num-batched-tokens",
        "2048",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "8192",
        "--max-patches",
        "0",
        "4096",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["workload"], r["mode"]) for r in rows} == {
        (w, m)
        for w in ("mixed", "video", "resend")
        for m in ("native", "vitbatch p=inf", "vitbatch p=4096")
    }
    for row in rows:
        assert row["requests_per_s"] > 0, row
        # every timed image is either encoded or (resend with vitbatch)
        # restored from the host tier: the resend pass may encode nothing
        assert row["encoder_calls"] + row["host_restores"] >= 1, row
        if row["workload"] != "resend":
            assert row["encoder_calls"] >= 1, row
        if row["mode"] != "native":
            assert row["mismatches"] == 0 and row["prompts_compared"] >= 3
    by = {(r["workload"], r["mode"]): r for r in rows}
    assert by["resend", "native"]["host_restores"] == 0
    for mode in ("vitbatch p=inf", "vitbatch p=4096"):
        assert by["resend", mode]["host_restores"] >= 1, by["resend", mode]
    # a smaller budget means at least as many encoder calls on the same images
    assert (
        by["mixed", "vitbatch p=4096"]["encoder_calls"]
        >= by["mixed", "vitbatch p=inf"]["encoder_calls"]
    )
