#!/usr/bin/env bash
# SGLang 0.5.23 test environment on a CPU-only machine, into the active virtualenv.
#
# `pip install sglang==0.5.23` pulls ~40 CUDA/kernel packages (flashinfer, deep-gemm,
# cutlass-dsl...) that are useless without a GPU. We install SGLang itself from the
# registry without dependencies, then exactly the pinned dependencies its scheduler-side
# multimodal code imports (found by importing mm_schedule, mm_utils, server_args and the
# plugin loader). torch==2.14.1 is SGLang's own pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip >/dev/null
python -m pip install "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --no-deps "sglang==0.5.23"
python -m pip install \
  "transformers==5.19.0" "tokenizers==0.23.2" "sentencepiece==0.2.1" "apache-tvm-ffi==0.1.11" \
  "compressed-tensors==0.18.0" "openai==2.8.0" \
  msgspec numpy pydantic pillow orjson psutil requests packaging pyzmq einops pybase64 starlette \
  IPython aiohttp dill gguf partial_json_parser prometheus-client httpx
python -m pip install -e ".[test]" -e examples/vitbatch-embedding-store
python - <<'PY'
import sglang.srt.managers.mm_schedule, sglang.srt.managers.mm_utils, sglang.srt.server_args, sglang.srt.plugins
print("sglang scheduler-side modules import")
PY
