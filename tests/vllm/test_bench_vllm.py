"""``vitbatch bench-vllm`` against the real vLLM (CPU backend, tiny Qwen2.5-VL shape).

The command a user runs on a GPU must also hold its promises on a small run:
every configuration answers every prompt with native's greedy tokens, encoder
calls are counted, on ``reask`` the images come back from vitbatch's host tier
(vLLM's encoder cache, bounded by ``--max-num-batched-tokens``, has evicted them
and the new prefixes miss the prefix cache), and on ``conversation`` vLLM's
prefix cache serves the later turns. Workload shapes, the round order and the
folding of rounds into median / range / verdict are checked without vLLM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitbatch.bench import vllm_engine, vllm_workloads
from vitbatch.bench.vllm_child import ChildConfig
from vitbatch.bench.vllm_report import compare, format_rows


def images_of(phase) -> set:
    return {image for r in phase for image in r.images}


def test_workload_phases_name_the_traffic() -> None:
    (fresh,) = vllm_workloads.workload("fresh", 2, scale=0.25)
    assert all(1 <= len(r.images) <= 4 for r in fresh)
    assert sum(len(r.images) for r in fresh) == len(images_of(fresh))  # no image repeats
    first_and_fillers, later = vllm_workloads.workload("reask", 2, scale=0.25)
    firsts = first_and_fillers[: len(later)]
    assert [r.images for r in later] == [r.images for r in firsts]
    assert all(a.system != b.system for a, b in zip(firsts, later))  # new prefixes
    fillers = images_of(first_and_fillers[len(later) :])
    assert not fillers & images_of(later)
    first_and_fillers, turns = vllm_workloads.workload("conversation", 2, scale=0.25)
    assert all(
        b.prompt().startswith(a.prompt()) and len(b.prompt()) > len(a.prompt())
        for a, b in zip(first_and_fillers, turns)
    )  # the same prefix and images, one turn later
    (popular,) = vllm_workloads.workload("popular", 2, scale=1.0)
    assert len(images_of(popular)) == 4 and len(popular) == 64
    assert len({r.system for r in popular}) == len(popular)  # each its own prefix
    (video,) = vllm_workloads.workload("video", 2, scale=0.25)
    shared = set.intersection(*(set(r.images) for r in video))
    assert len(shared) == 2 and all(len(r.images) == 8 for r in video)
    # another seed: other contents, so a timed pass never hits what an earlier pass encoded
    other = vllm_workloads.workload("reask", 3, scale=0.25)[1]
    assert not images_of(other) & images_of(later)
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        vllm_workloads.workload("nope", 0)


def test_defaults_fit_the_tiny_shape_and_rounds_alternate() -> None:
    parser = argparse.ArgumentParser()
    vllm_engine.add_arguments(parser)
    args = parser.parse_args(["--shape", "tiny", "--runners", "v1"])
    assert args.rounds == 3 and args.prefix_caching
    (group,) = vllm_engine.configurations(args, "model-dir", dummy=True)
    assert [c.engine for c in group] == ["native", "vitbatch", "eccpu"]
    assert all(c.max_model_len == 8192 and c.prefix_caching for c in group)
    assert group[2].ec_transfer["ec_connector"] == "ECCPUConnector"
    assert ChildConfig.from_json(group[1].to_json()) == group[1]
    orders = [[c.engine for c in vllm_engine.round_order([group], i)] for i in range(3)]
    assert orders == [
        ["native", "vitbatch", "eccpu"],
        ["vitbatch", "eccpu", "native"],
        ["eccpu", "native", "vitbatch"],
    ]
    off = parser.parse_args(["--shape", "tiny", "--no-prefix-caching"])
    assert not any(c.prefix_caching for g in vllm_engine.configurations(off, "m", True) for c in g)


def fake_child(seconds: float, tokens: list[list[int]]) -> dict:
    one_pass = {
        "seconds": seconds,
        "requests": 10,
        "images": 20,
        "ttft": [0.1, 0.2],
        "encoder_calls": 3,
        "cached_tokens": 0,
        "peak_extra_bytes": None,
        "host_restores": 0,
    }
    return {"workloads": {"fresh": {"passes": [one_pass], "token_ids": tokens}}}


def test_rounds_fold_into_median_range_and_verdict() -> None:
    config = ChildConfig(
        "", "native", "v1", "m", True, "float32", ("fresh",), 1, 1.0, 8, 4, None, 0.5
    )
    group = [
        config.__class__(**{**config.__dict__, "label": f"v1/graphs-off/{mode}", "engine": engine})
        for mode, engine in (("native", "native"), ("vitbatch", "vitbatch"), ("slow", "vitbatch"))
    ]
    rounds = [
        {
            "results": {
                "v1/graphs-off/native": fake_child(native, [[1, 2]]),
                "v1/graphs-off/vitbatch": fake_child(native * 0.99, [[1, 2]]),
                "v1/graphs-off/slow": fake_child(native * 2, [[1, 3]]),
            }
        }
        for native in (1.0, 1.1, 0.9)
    ]
    rows = {r["mode"]: r for r in compare(rounds, [group])}
    assert rows["native"]["requests_per_s"] == 10.0 and rows["native"]["range"][
        "requests_per_s"
    ] == [
        pytest.approx(10 / 1.1),
        pytest.approx(10 / 0.9),
    ]
    assert len(rows["native"]["rounds"]) == 3
    assert rows["vitbatch"]["verdict"] == "same" and rows["vitbatch"]["mismatches"] == 0
    assert rows["slow"]["verdict"] == "slower" and rows["slow"]["mismatches"] == 3
    table = format_rows(list(rows.values()))
    assert "10.00 (9.09–11.11)" in table and "0/3" in table and "3/3" in table


def test_bench_vllm_runs_every_configuration_equal_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "vitbatch.cli",
        "bench-vllm",
        "--shape",
        "tiny",  # with the default --max-model-len (issue 22 item 4)
        "--runners",
        "v1",
        "--rounds",
        "1",
        "--dtype",
        "float32",
        "--scale",
        "0.1",
        "--max-num-batched-tokens",
        "2048",
        "--max-num-seqs",
        "16",
        "--max-patches",
        "0",
        "4096",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["protocol"]["prefix_caching"] is True
    rows = data["rows"]
    modes = {"native", "vitbatch p=inf", "vitbatch p=4096"}
    eccpu = "v1/graphs-off/vllm+eccpu"
    if eccpu not in data["protocol"]["runner_takes_no_ec_connector"]:
        modes.add("vllm+eccpu")  # this vLLM's V1 runner takes the EC connector
    assert {(r["workload"], r["mode"]) for r in rows} == {
        (w, m) for w in vllm_workloads.WORKLOADS for m in modes
    }
    for row in rows:
        assert row["requests_per_s"] > 0 and len(row["rounds"]) == 1, row
        if row["workload"] == "conversation":  # the later turns come from the prefix cache
            assert row["cached_tokens"] > 0, row
        else:  # every timed image is either encoded or restored from a host tier
            assert row["encoder_calls"] + row["host_restores"] >= 1, row
        if row["workload"] in ("fresh", "video", "popular"):
            assert row["encoder_calls"] >= 1, row
        if row["mode"] != "native":
            assert row["mismatches"] == 0 and row["prompts_compared"] >= 3
    by = {(r["workload"], r["mode"]): r for r in rows}
    assert by["reask", "native"]["host_restores"] == 0
    for mode in ("vitbatch p=inf", "vitbatch p=4096"):
        assert by["reask", mode]["host_restores"] >= 1, by["reask", mode]
    # a smaller budget means at least as many encoder calls on the same images
    assert (
        by["fresh", "vitbatch p=4096"]["encoder_calls"]
        >= by["fresh", "vitbatch p=inf"]["encoder_calls"]
    )
    assert "median (min–max) over rounds" in proc.stdout
