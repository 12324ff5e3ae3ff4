"""`vitbatch bench` and `vitbatch info` as a user runs them."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitbatch.bench.workload import WORKLOADS, chunked_steps, draw_requests
from vitbatch.cli import main


def test_bench_modes_agree_and_vitbatch_batches(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--requests", "6", "--no-progress", "--json", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    (report,) = data["workloads"]
    assert report["outputs_equal"] is True
    modes = {m["mode"]: m for m in report["results"]}
    assert set(modes) == {"per-request", "unbounded", "vitbatch"}
    steps = len(
        chunked_steps(
            draw_requests(
                WORKLOADS["default"].__class__(**{**WORKLOADS["default"].__dict__, "requests": 6}),
                patch_size=14,
                merge_size=2,
                patch_dim=1176,
            ),
            WORKLOADS["default"].chunk_tokens,
        )
    )
    # One call per step at most when unbounded; per-request makes more; all encode the same tokens.
    assert modes["unbounded"]["encoder_calls"] <= steps
    assert modes["per-request"]["encoder_calls"] > modes["unbounded"]["encoder_calls"]
    assert len({m["encoded_tokens"] for m in modes.values()}) == 1
    # The warm replay measured the host cost of planning + assembly on its own.
    assert all(0 < m["idle_host_seconds"] < m["seconds"] for m in modes.values())
    assert all(m["host_share"] == m["idle_host_seconds"] / m["seconds"] for m in modes.values())
    assert "outputs equal across modes: yes" in printed


def test_bench_plot_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert (
        main(
            [
                "bench",
                "--requests",
                "3",
                "--no-progress",
                "--plot",
                str(png),
                "--modes",
                "unbounded",
                "vitbatch",
                "--repeat",
                "1",
            ]
        )
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_command_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vitbatch", "info"], capture_output=True, text=True, check=True
    )
    assert "vitbatch_encode_batch" in done.stdout and "engine sglang" in done.stdout


def test_mode_comparison_detects_a_wrong_row() -> None:
    import torch

    from vitbatch.bench.common import max_difference

    a = [torch.randn(5, 4), None]
    b = [a[0].clone(), None]
    assert max_difference(a, b) == 0.0
    b[0][2] = b[0][3]
    assert max_difference(a, b) > 0.1
    assert max_difference(a, [a[0][:4], None]) == float("inf")
    assert max_difference(a, [a[0], torch.zeros(1, 4)]) == float("inf")


def test_offload_report_rejects_a_release_that_is_not_the_host_feature() -> None:
    """The GPU report's check: a released tensor must be the feature itself or
    its pinned twin (pinning needs CUDA; the identity and mismatch paths do not)."""
    import torch

    from vitbatch.bench.offload_report import _check_host_references

    features = [torch.arange(6.0), torch.ones(2, 3)]
    _check_host_references(features, features)
    with pytest.raises(RuntimeError, match="feature 1: release returned neither"):
        _check_host_references([features[0], features[1].clone()], features)


BENCH = Path(__file__).resolve().parents[2] / "src" / "vitbatch" / "bench"
ENGINE_TOUCH = {
    "sglang_engine.py": {"sglang_names"},
    "vllm_child.py": {"vllm_names", "v2_runner_takes_ec_connector"},
}


def bench_imports(path: Path) -> list[tuple[str, str | None]]:
    """(module imported, enclosing top-level function or None) for every import."""
    found = []
    for top in ast.parse(path.read_text()).body:
        owner = top.name if isinstance(top, ast.FunctionDef | ast.ClassDef) else None
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.append((node.module, owner))
            elif isinstance(node, ast.Import):
                found.extend((alias.name, owner) for alias in node.names)
    return found


def test_bench_touches_each_engine_in_one_marked_function() -> None:
    """vLLM, SGLang and their vitbatch adapters are imported by the bench only inside
    ``sglang_engine.sglang_names`` and ``vllm_child.vllm_names`` (to become surface
    accessors)."""
    for path in sorted(BENCH.glob("*.py")):
        for module, owner in bench_imports(path):
            if module.startswith(("vllm", "sglang", "vitbatch.adapters")):
                assert owner in ENGINE_TOUCH.get(path.name, ()), (path.name, module, owner)


def test_bench_modules_import_no_circle() -> None:
    graph = {
        path.stem: {
            module.rsplit(".", 1)[-1]
            for module, _ in bench_imports(path)
            if module.startswith("vitbatch.bench.")
        }
        | {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "vitbatch.bench"
            for alias in node.names
        }
        for path in BENCH.glob("*.py")
    }

    def reach(start: str, node: str, seen: set[str]) -> bool:
        for nxt in graph.get(node, ()):
            if nxt == start or (nxt not in seen and reach(start, nxt, seen | {nxt})):
                return True
        return False

    assert [name for name in graph if reach(name, name, {name})] == []


def test_spread_names_a_ratio_only_when_ranges_part() -> None:
    from vitbatch.bench.common import Spread, verdict

    native = Spread.of([10.0, 11.0, 9.0])
    assert (native.median, native.low, native.high) == (10.0, 9.0, 11.0)
    assert verdict(Spread.of([10.5, 12.0, 11.5]), native) == "same"
    assert verdict(Spread.of([11.5, 12.0, 13.0]), native) == "faster"
    assert verdict(Spread.of([5.0, 6.0, 8.9]), native) == "slower"
    assert native.format() == "10.00 (9.00–11.00)"
