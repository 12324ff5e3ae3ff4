#!/usr/bin/env bash
# Stage an SGLang *server* for the GPU machine (no package index there; Python 3.12,
# torch 2.11.0+cu130): SGLang 0.5.17 (the newest release pinning torch 2.11.0), its
# sglang-kernel 0.4.5 wheel (383 MB; slimmed to 18 MB by scripts/slim_sglang_kernel.py, or with
# SLIM_KERNEL=0 split into parts of PART_MB (55) MB, one transfer each),
# flashinfer_python 0.6.15.post1 (the registry has no flashinfer-cubin of that version:
# flashinfer would JIT, so the launch options below keep it off the hot path), the wheels
# of SGLang's requirements the machine lacks (KINDS.md "Python packages already there"),
# and a vitbatch wheel (SGLang finds plugins through installed entry points). All --no-deps.
#
# Usage: scripts/stage_sglang_gpu.sh [SGLANG_VERSION] [STAGE_DIR]   (0.5.17, ./.stage/sglang)
# Then, on the device, one `run` per part c0..cN (carry [".stage/sglang/cK"]), each copying
# its files to /tmp/stage; the last call installs into /tmp/sgsite (the printed commands).
#
# `vitbatch bench --engine sglang` (the function-level check, SGLang 0.5.23 with a stand-in
# sgl_kernel) is staged by scripts/stage_sglang_wheels.py; this script stages the server.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:-0.5.17}"
stage="${2:-$here/.stage/sglang}"
py="${PYTHON:-python3}"
kinds="${KINDS_MD:-/work/.library/device/KINDS.md}"
part_mb="${PART_MB:-55}"
kernel="${SGLANG_KERNEL:-sglang-kernel==0.4.5}"
flashinfer="${FLASHINFER:-flashinfer_python==0.6.15.post1}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64
  --platform manylinux_2_35_x86_64)
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")

rm -rf "$stage" && mkdir -p "$stage/dl" "$stage/deps" "$stage/big"
"$py" -m pip download -q --no-deps "${target[@]}" -d "$stage/dl" "sglang==$version"
wheel="$(ls "$stage"/dl/sglang-"$version"-*.whl)"
"$py" -m pip download -q --no-deps "${target[@]}" -d "$stage/big" "$kernel"
"$py" -m pip download -q --no-deps "${target[@]}" --platform any -d "$stage/deps" "$flashinfer"

# The machine's packages (KINDS.md), and SGLang's requirements that are not among them.
have="$stage/have.txt"
sed -n '/^## Python packages already there/,/^## /p' "$kinds" | grep -o 'Packages: .*' \
  | sed 's/^Packages: //; s/\.$//' | tr ',' '\n' | sed 's/^ *//; s/ *$//' \
  | tr 'A-Z_.' 'a-z--' | sort -u >"$have"
test -s "$have" || { echo "no package list in $kinds" >&2; exit 1; }
# torch & co. and CUDA are the machine's own; sglang-kernel and flashinfer are staged above;
# the rest are kernel packages the server path below imports only when an option asks for
# them (other attention/MoE/quantization backends, DeepGEMM, FA4, helion, tilelang), or
# tools it does not need (py-spy, modelscope, smg-grpc-servicer: the gRPC server).
unzip -p "$wheel" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
  | grep -viE '^(torch|torchvision|torchaudio|torchcodec|torchao|torch_memory_saver|triton|nvidia-|cuda-|sglang-kernel|flashinfer|flash-attn|sgl-deep-gemm|helion|humming-kernels|tilelang|tokenspeed|quack-kernels|kernels|py-spy|modelscope|smg-grpc)' \
  >"$stage/requires.txt"
"$py" -m pip install -q --dry-run --ignore-installed --report "$stage/all.json" \
  "${target[@]}" --target "$stage/unused" -r "$stage/requires.txt" >/dev/null 2>"$stage/resolve.log"
# Packages the machine has at another version than SGLang needs: staged anyway (PYTHONPATH puts
# them first). Seen on the H200: transformers 5.17 there, SGLang 0.5.17 pins 5.12.1, which takes
# tokenizers <= 0.23.0 (0.23.2 there); with the machine's own, the server fails at import.
also="${RESTAGE:-transformers tokenizers}"
"$py" - "$stage/all.json" "$have" "$also" >"$stage/need.txt" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
have = set(open(sys.argv[2]).read().split()) - set(sys.argv[3].split())
# pulled in again by the requirements above: the machine's own torch/CUDA stack
skip = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|z3-solver|pyelftools)$")
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

# Parts. By default sglang-kernel is slimmed first (scripts/slim_sglang_kernel.py: 383 -> 18 MB,
# without the FA3 library this server never calls), so every wheel fits one part; with
# SLIM_KERNEL=0 the full wheel travels in PART_MB pieces joined on the device.
kwheel="$(ls "$stage"/big/*.whl)"
kname="$(basename "$kwheel")"
n=0 join=""
if [[ "${SLIM_KERNEL:-1}" == 1 ]]; then
  "$py" "$here/scripts/slim_sglang_kernel.py" "$kwheel" "$stage/deps" >/dev/null
else
  split -b "$((part_mb * 1000 * 1000))" -d -a 2 "$kwheel" "$stage/big/kernelwhl.part"
  for part in "$stage"/big/kernelwhl.part*; do mkdir -p "$stage/c$n"; mv "$part" "$stage/c$n/"; n=$((n + 1)); done
  sha="$(sha256sum "$kwheel" | cut -d' ' -f1)"
  join="cat /tmp/stage/kernelwhl.part* > /tmp/stage/$kname && echo \"$sha  /tmp/stage/$kname\" | sha256sum -c && rm /tmp/stage/kernelwhl.part* && "
fi
mv "$wheel" "$stage/deps/"
limit=$((part_mb * 1000 * 1000)) used=0
mkdir -p "$stage/c$n"
for whl in $(ls -S "$stage"/deps/*.whl); do
  size=$(stat -c %s "$whl")
  if ((size > limit)); then echo "$whl is over ${part_mb} MB: split it too" >&2; exit 1; fi
  if ((used + size > limit)); then n=$((n + 1)) used=0; mkdir -p "$stage/c$n"; fi
  mv "$whl" "$stage/c$n/" && used=$((used + size))
done
rm -rf "$stage/dl" "$stage/unused" "$stage/deps" "$stage/big"
du -sh "$stage"/c* | sed 's/^/  /'
last=$n
cat >"$stage/device_commands.txt" <<CMD
# each part K in 0..$((last - 1)), carry [".stage/sglang/cK"]:
mkdir -p /tmp/stage && cp .stage/sglang/cK/* /tmp/stage/
# the last part, carry [".stage/sglang/c$last"] (installs into /tmp/sgsite):
mkdir -p /tmp/stage && cp .stage/sglang/c$last/* /tmp/stage/ && ${join}python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sgsite /tmp/stage/*.whl && PYTHONPATH=/tmp/sgsite python3 -c "import sgl_kernel, flashinfer, sglang.srt.entrypoints.http_server, sglang.srt.managers.scheduler; from importlib.metadata import version; print('sglang', version('sglang'), 'vitbatch', version('vitbatch'))"
# then (same warm machine):
export PYTHONPATH=\$PWD/src:/tmp/sgsite PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SERVE_ARGS="--attention-backend triton --sampling-backend pytorch --mm-attention-backend triton_attn" scripts/bench_sglang_serve.sh "" \$OUT/bench-sglang
CMD
echo "staged sglang $version in parts c0..c$last: $kname (slimmed unless SLIM_KERNEL=0), sglang, flashinfer, vitbatch and $(wc -l <"$stage/need.txt") dependency wheels"
cat "$stage/device_commands.txt"
