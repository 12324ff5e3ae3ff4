"""Tensor parallel on CPU (gloo): the same encoder calls on every rank, even when one fails.

2 and 4 processes run the same random steps; one rank at a time gets a fault
(a capacity probe that says "OOM ahead" on a multi-item call, an OOM inside a
call, a plugin raising, a malformed output, a host-tier restore failing, a
cache entry evicted on that rank only). Each encoder call all-reduces, like a
sharded tower, so ranks that diverged would hang: a hang fails the test by
its timeout. Every rank must serve the same steps with the oracle's
embeddings, fall back on the same steps, and make the same number of calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 150


def run_ranks(world: int, tmp_path: Path, steps: int, mode: str) -> list[tuple[int | None, str]]:
    """(return code or None when hung, output) of each rank."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.core.tp_worker",
                str(rank),
                str(world),
                str(tmp_path / "init"),
                str(tmp_path / f"rank{rank}.json"),
                str(steps),
                mode,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(world)
    ]
    done: list[tuple[int | None, str]] = []
    for proc in procs:
        try:
            log = proc.communicate(timeout=120)[0]
            done.append((proc.returncode, log))
        except subprocess.TimeoutExpired:
            proc.kill()
            done.append((None, proc.communicate()[0]))
    return done


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_under_one_rank_faults(world: int, tmp_path: Path) -> None:
    for code, log in run_ranks(world, tmp_path, STEPS, "agree"):
        assert code is not None, f"ranks hung ({world} processes): encoder calls stopped pairing"
        assert code == 0, log[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    outcomes = [r["outcomes"] for r in results]
    assert all(o == outcomes[0] for o in outcomes), "ranks served different steps"
    assert set(outcomes[0]) <= {"served", "fallback"}, [o for o in outcomes[0] if "WRONG" in o]
    assert len({r["calls"] for r in results}) == 1, [r["calls"] for r in results]
    injected = {f: sum(r["injected"][f] for r in results) for f in results[0]["injected"]}
    served, fallbacks = outcomes[0].count("served"), outcomes[0].count("fallback")
    print(
        f"\n{world} ranks, {STEPS} steps: {served} served equal to the oracle, {fallbacks} agreed "
        f"fallbacks, {results[0]['calls']} encoder calls on every rank, injected {injected}, "
        f"{results[0]['agreements_per_served_step']:.2f} agreements per served step, hangs 0"
    )
    assert all(count >= 3 for count in injected.values()), injected
    assert served > STEPS // 2 and fallbacks >= injected["plugin-raises"]


def test_without_agreement_the_same_faults_break_the_ranks(tmp_path: Path) -> None:
    """The control: one rank deciding alone (local OOM split, local fallback) makes
    the collectives stop pairing; the ranks error out or disagree."""
    runs = run_ranks(2, tmp_path, 40, "no-agree")
    print("\nwithout agreement, return codes:", [code for code, _ in runs])
    if all(code == 0 for code, _ in runs):
        results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
        assert results[0]["outcomes"] != results[1]["outcomes"] or (
            results[0]["calls"] != results[1]["calls"]
        ), "without agreement the ranks should have diverged"
