"""``vitbatch bench --engine sglang`` on CPU: SGLang's real ``get_embedding_and_mask``,
native and with vitbatch's hook, equal outputs on every step; and the ``sgl_kernel``
stand-in the GPU run may need."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

mm_utils = pytest.importorskip("sglang.srt.managers.mm_utils")

from vitbatch.bench import sgl_kernel_standin  # noqa: E402 - after the importorskip
from vitbatch.bench.sglang_workload import engine_workload  # noqa: E402 - after the importorskip
from vitbatch.bench.workload import WORKLOADS  # noqa: E402 - after the importorskip

ROOT = Path(__file__).resolve().parents[2]


def test_engine_mode_runs_on_cpu_and_matches_native(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop("VITBATCH_ENABLE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitbatch",
            "bench",
            "--engine",
            "sglang",
            "--workload",
            "default",
            "tiny",
            "--requests",
            "3",
            "--steps",
            "4",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine"] == "sglang" and report["sgl_kernel_standin_calls"] == []
    for workload in report["workloads"]:
        assert workload["steps"] >= 4
        assert workload["outputs_equal"] and workload["vitbatch_engaged"]
        assert len(workload["step_relative_error"]) == workload["steps"]
        modes = [r["mode"] for r in workload["results"]]
        assert modes == ["sglang-native", "vitbatch"]
        native, ours = workload["results"]
        assert native["vitbatch_items"] == 0 and ours["vitbatch_items"] > 0
        assert ours["fallbacks"] == 0
        assert native["d2h_copies"] == ours["d2h_copies"] == 0  # SGLang copies back only from CUDA


def test_workload_repeats_images_across_steps_and_chunks_requests() -> None:
    requests, steps = engine_workload(
        WORKLOADS["mixed-chunked"], patch_size=14, merge_size=2, patch_dim=588, min_steps=20, seed=1
    )
    assert len(steps) >= 20
    seen_in_step: dict[int, set[int]] = {}
    for index, step in enumerate(steps):
        for part in step:
            for image in requests[part.rid].images:
                seen_in_step.setdefault(image.hash, set()).add(index)
    assert any(len(where) > 1 for where in seen_in_step.values())  # repeated across steps
    assert any(part.start > 0 for step in steps for part in step)  # chunked prefill
    chunk = WORKLOADS["mixed-chunked"].chunk_tokens
    assert all(part.end - part.start <= chunk for step in steps for part in step)


def test_copy_back_we_reproduce_is_what_sglang_ships() -> None:
    """Drift guard for :func:`offload_after_forward`: SGLang's post-forward copy-back
    (in ``prepare_mm_inputs``, called by ``general_mm_embed_routine``)
    still moves CUDA features with a non-blocking ``.to("cpu")`` and records the
    module-level ``host_offload_event`` on the current stream."""
    source = inspect.getsource(mm_utils.prepare_mm_inputs)
    assert "prepare_mm_inputs(" in inspect.getsource(mm_utils.general_mm_embed_routine)
    for statement in (
        'mm_item.feature = feature.to("cpu", non_blocking=True)',
        "feature.record_stream(stream)",
        "mm_schedule.host_offload_event = torch.cuda.Event()",
        "mm_schedule.host_offload_event.record(stream)",
        "if mm_inputs_list and input_embeds.is_cuda:",
    ):
        assert statement in source, statement


def test_sgl_kernel_standin_imports_and_fails_loudly() -> None:
    if not sgl_kernel_standin.install_if_missing():
        pytest.skip("the real sgl_kernel imports here")
    try:
        import sgl_kernel
        from sgl_kernel import fp8_scaled_mm
        from sgl_kernel.elementwise import silu_and_mul

        assert sgl_kernel.__version__.endswith("standin")
        assert sgl_kernel_standin.calls() == []
        with pytest.raises(sgl_kernel_standin.StandInCalled, match="sgl_kernel.fp8_scaled_mm"):
            fp8_scaled_mm(1, 2)
        with contextlib.suppress(sgl_kernel_standin.StandInCalled):  # swallowed, still on record
            silu_and_mul()
        assert sgl_kernel_standin.calls() == [
            "sgl_kernel.fp8_scaled_mm",
            "sgl_kernel.elementwise.silu_and_mul",
        ]
    finally:
        sgl_kernel_standin.uninstall()
    assert "sgl_kernel" not in sys.modules
    with pytest.raises(ImportError):
        import sgl_kernel
