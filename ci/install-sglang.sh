#!/usr/bin/env bash
# SGLang test environment on a CPU-only machine, into the active virtualenv.
#
# Usage: ci/install-sglang.sh [VERSION]   (default 0.5.23, the newest supported;
# 0.5.17 is the oldest, see docs/sglang.md "Supported versions"; 0.5.19 is kept for local runs).
#
# `pip install sglang==X` pulls ~40 CUDA/kernel packages (flashinfer, deep-gemm,
# cutlass-dsl...) that are useless without a GPU. We install SGLang itself from the
# registry without dependencies, then exactly the pinned dependencies its scheduler-side
# multimodal code imports (found by importing mm_utils, mm_schedule where the release has it
# (0.5.18+; 0.5.17 keeps the step in mm_utils), server_args and the plugin loader). torch,
# transformers, tokenizers and openai are that release's own pins
# (its wheel's Requires-Dist). `===` takes the registry's torch build even where a local
# wheel directory offers a `+cpu` one: torchvision from the registry needs the former.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-0.5.23}"
case "$VERSION" in
  0.5.23)
    PINS=("torch===2.14.1" "torchvision==0.29.1" "transformers==5.19.0" "tokenizers==0.23.2"
          "openai==2.8.0") ;;
  0.5.19)
    PINS=("torch===2.13.0" "torchvision==0.28.0" "transformers==5.12.1" "tokenizers==0.22.2"
          "openai==2.6.1" "xgrammar==0.2.1") ;;
  0.5.17)
    # torchvision is unpinned there: 0.26.0 is the build for torch 2.11.0.
    PINS=("torch===2.11.0" "torchvision==0.26.0" "transformers==5.12.1" "tokenizers==0.22.2"
          "openai==2.6.1" "xgrammar==0.2.1") ;;
  *)
    echo "ci/install-sglang.sh: no pins for sglang $VERSION (known: 0.5.23, 0.5.19, 0.5.17)" >&2
    exit 2 ;;
esac
python -m pip install --upgrade pip >/dev/null
# triton: SGLang imports it at startup; the registry's CUDA torch brings it, a CPU build does not.
python -m pip install "${PINS[@]:0:2}" triton
python -m pip install --no-deps "sglang==$VERSION"
python -m pip install "${PINS[@]:2}" \
  "sentencepiece==0.2.1" "apache-tvm-ffi==0.1.11" "compressed-tensors==0.18.0" \
  msgspec numpy pydantic pillow orjson psutil requests packaging pyzmq einops pybase64 starlette \
  IPython aiohttp dill gguf partial_json_parser prometheus-client httpx
python -m pip install -e ".[test]" -e examples/vitbatch-embedding-store
SGLANG_VERSION="$VERSION" python - <<'PY'
import os
from importlib.metadata import version

import importlib.util

import sglang.srt.managers.mm_utils, sglang.srt.server_args, sglang.srt.plugins
if importlib.util.find_spec("sglang.srt.managers.mm_schedule") is not None:  # 0.5.18+
    import sglang.srt.managers.mm_schedule
assert version("sglang") == os.environ["SGLANG_VERSION"], version("sglang")
print(f"sglang {version('sglang')} scheduler-side modules import")
PY
