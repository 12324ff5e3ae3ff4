"""vitbatch's counters on a real vLLM OpenAI server's ``/metrics`` (loopback only).

The server is ``python -m vllm.entrypoints.openai.api_server`` with the tiny
Qwen2-VL of :mod:`tiny_qwen2vl` and ``--additional-config '{"vitbatch": ...}'``,
started twice: as vLLM starts by default (one API server, no
``PROMETHEUS_MULTIPROC_DIR``: vitbatch's engine-side values reach the API
server through its snapshot collector) and in Prometheus multiprocess mode.
Image chats go one after another; enough distinct images to push the first out
of vLLM's encoder cache (``--max-num-batched-tokens`` bounds it), then the first
again, which the host tier restores.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from tiny_qwen2vl import build_tiny_qwen2vl  # noqa: E402 - after the sys.path line above

START_TIMEOUT = 420
SAMPLE = re.compile(r"^(vitbatch_[a-z0-9_]+)\{([^}]*)\} (\S+)$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_url(seed: int, size: int = 224) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def chat(base: str, url: str) -> dict:
    body = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "describe the images"},
                ],
            }
        ],
        "max_tokens": 2,
        "temperature": 0,
    }
    request = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def scrape(base: str) -> dict[tuple[str, str], float]:
    """``(name, labels) -> value`` of every ``vitbatch_*`` sample."""
    found = {}
    for line in get(base + "/metrics").splitlines():
        match = SAMPLE.match(line)
        if match:
            found[(match[1], match[2])] = float(match[3])
    return found


def total(samples: dict[tuple[str, str], float], name: str) -> float:
    return sum(value for (n, _), value in samples.items() if n == name)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("metrics") / "tiny-qwen2vl")


@pytest.mark.parametrize("mode", ["default", "multiprocess"])
def test_vitbatch_counters_move_on_metrics(model: Path, mode: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PROMETHEUS_MULTIPROC_DIR", "VITBATCH_METRICS_DIR", "VITBATCH_VLLM")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if mode == "multiprocess":
        (tmp_path / "prom").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prom")
    options = {"host_cache_embeds": 4096}
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", "tiny",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", "float32",
        "--enforce-eager",
        "--max-model-len", "1024",
        "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256",  # also the encoder cache size, in embeddings
        "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--additional-config", json.dumps({"vitbatch": options}),
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited ({server.returncode}):\n{log.read_text()[-6000:]}")
            try:
                get(base + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not up in {START_TIMEOUT} s:\n{log.read_text()[-6000:]}")
                time.sleep(1)
        before = scrape(base)
        images = [image_url(seed) for seed in range(7)]  # 64 embeddings each: 7 > 256 rows
        for url in images:
            assert chat(base, url)["choices"]
        for url in images[:2]:  # evicted from vLLM's cache by now: the host tier has them
            assert chat(base, url)["choices"]
        time.sleep(0.5)
        after = scrape(base)
        text = get(base + "/metrics")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    lines = sorted(f"{n}{{{labels}}} {value}" for (n, labels), value in after.items())
    print(f"\n[{mode}] vitbatch samples on /metrics:\n" + "\n".join(lines))
    moved = {
        name
        for name in {n for n, _ in after}
        if total(after, name) > total(before, name) and not name.endswith("_bucket")
    }
    print(f"[{mode}] moved: {sorted(moved)}")
    assert total(after, "vitbatch_encoder_calls_total") >= 7 - 2
    assert total(after, "vitbatch_items_total") >= len(images)
    assert total(after, "vitbatch_host_cache_hits_total") >= 1
    assert total(after, "vitbatch_host_cache_demotions_total") >= 1
    assert total(after, "vitbatch_cache_hits_total") >= total(
        after, "vitbatch_host_cache_hits_total"
    )
    assert {"vitbatch_encoder_calls_total", "vitbatch_host_cache_hits_total"} <= moved
    labels = {labels for (n, labels) in after if n == "vitbatch_encoder_calls_total"}
    assert labels == {'engine="0",model_name="tiny",tp_rank="0"'}, labels
    # vLLM's own metrics are still there, with the same engine label
    assert re.search(r'vllm:request_success_total\{[^}]*engine="0"', text), text[:2000]
