#!/usr/bin/env bash
# Stage vLLM for the GPU machine (no package index there; torch 2.11 + CUDA 13, Python 3.12):
# the vllm wheel (it pins that torch), split into parts that fit one transfer each, and
# the wheels of vLLM's requirements the machine lacks, all --no-deps, plus a vitbatch wheel
# (vLLM finds plugins through installed entry points, so vitbatch must be installed there).
#
# Usage: scripts/stage_vllm_gpu.sh [VLLM_VERSION] [STAGE_DIR]   (defaults 0.26.0, ./.stage/vllm)
# Then, on the device, one `run` per part c0..cN (carry .stage/vllm/cK), each copying its
# files to /tmp/stage; the last call joins and installs (see the printed command).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:-0.26.0}"
stage="${2:-$here/.stage/vllm}"
py="${PYTHON:-python3}"
kinds="${KINDS_MD:-/work/.library/device/KINDS.md}"
part_mb="${PART_MB:-55}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
  --platform manylinux_2_35_x86_64)
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")

rm -rf "$stage" && mkdir -p "$stage/dl" "$stage/deps"
"$py" -m pip download -q --no-deps "${target[@]}" -d "$stage/dl" "vllm==$version"
wheel="$(ls "$stage"/dl/vllm-"$version"-*.whl)"

# The machine's packages (KINDS.md), and vLLM's requirements that are not among them.
have="$stage/have.txt"
sed -n '/^## Python packages already there/,/^## /p' "$kinds" | grep -o 'Packages: .*' \
  | sed 's/^Packages: //; s/\.$//' | tr ',' '\n' | sed 's/^ *//; s/ *$//' \
  | tr 'A-Z_.' 'a-z--' | sort -u >"$have"
test -s "$have" || { echo "no package list in $kinds" >&2; exit 1; }
unzip -p "$wheel" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
  | grep -viE '^(torch|torchvision|torchaudio|torchcodec|xformers|flashinfer|triton|nvidia-)' \
  >"$stage/requires.txt"
"$py" -m pip install -q --dry-run --ignore-installed --no-deps --report "$stage/top.json" \
  "${target[@]}" --target "$stage/unused" -r "$stage/requires.txt" >/dev/null
"$py" -m pip install -q --dry-run --ignore-installed --report "$stage/all.json" \
  "${target[@]}" --target "$stage/unused" -r "$stage/requires.txt" >/dev/null 2>"$stage/resolve.log" || true
"$py" - "$stage/all.json" "$have" >"$stage/need.txt" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
have = set(open(sys.argv[2]).read().split())
# torch and CUDA are the machine's own; the rest are optional kernel packages vLLM imports
# only when a feature asks for them (checked: the serve path below runs without them), and
# together they would not fit the transfer. (apache-tvm-ffi stays: xgrammar imports it.)
skip = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|tilelang|quack-kernels"
    r"|humming-kernels|tokenspeed-.*|z3-solver|fastsafetensors|pynvvideocodec"
    r"|torch-c-dlpack-ext|pyelftools)$"
)
for item in report["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if name not in have and not skip.match(name):
        print(f"{name}=={meta['version']}")
PY
while read -r req; do
  "$py" -m pip download -q --no-deps "${target[@]}" -d "$stage/deps" "$req" \
    || "$py" -m pip download -q --no-deps --platform any --python-version 3.12 -d "$stage/deps" "$req"
done <"$stage/need.txt"
(cd "$here" && "$py" -m pip wheel -q --no-deps -w "$stage/deps" .)

# Parts: the vllm wheel in PART_MB pieces, the dependency wheels in the last folder.
split -b "${part_mb}m" -d -a 2 "$wheel" "$stage/vllmwhl.part"
n=0
for part in "$stage"/vllmwhl.part*; do mkdir -p "$stage/c$n"; mv "$part" "$stage/c$n/"; n=$((n + 1)); done
mkdir -p "$stage/c$n" && mv "$stage"/deps/*.whl "$stage/c$n/"
sha="$(sha256sum "$wheel" | cut -d' ' -f1)"
rm -rf "$stage/dl" "$stage/unused" "$stage/deps"
du -sh "$stage"/c* | sed 's/^/  /'
cat <<MSG
staged vllm $version: parts c0..c$((n - 1)), dependency wheels + vitbatch in c$n ($(ls "$stage/c$n" | wc -l) wheels)
device, each part:  mkdir -p /tmp/stage && cp .stage/vllm/cK/* /tmp/stage/        (carry .stage/vllm/cK)
device, last part:  cp .stage/vllm/c$n/* /tmp/stage/ && cat /tmp/stage/vllmwhl.part* > /tmp/stage/$(basename "$wheel") \\
  && echo "$sha  /tmp/stage/$(basename "$wheel")" | sha256sum -c \\
  && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/*.whl
then:               export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0
MSG
