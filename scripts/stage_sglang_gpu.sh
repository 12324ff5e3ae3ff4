#!/usr/bin/env bash
# Stage what `vitbatch bench --engine sglang` needs on the GPU machine (no package
# index there, torch 2.11, Python 3.12): the sglang 0.5.23 wheel and the wheels of
# the distributions SGLang's multimodal step imports that the machine lacks, all
# --no-deps, into /work/main/.stage/ (git-ignored), plus the one-line device command.
# sgl_kernel is NOT staged (its wheel is tied to torch 2.14): the bench installs a
# stand-in that fails loudly if any of its names is called.
#
# Usage: scripts/stage_sglang_gpu.sh [STAGE_DIR]     (default /work/main/.stage)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
stage="${1:-/work/main/.stage}"
env_python="${SGLANG_ENV_PYTHON:-/work/envs/sglang/bin/python}"
kinds="${KINDS_MD:-/work/.library/device/KINDS.md}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)

mkdir -p "$stage/whl"
rm -f "$stage"/whl/*.whl
have="$(mktemp)"
# The machine's packages: the list after "Packages:" in KINDS.md's "Python packages already there".
sed -n '/^## Python packages already there/,/^## /p' "$kinds" | grep -o 'Packages: .*' | sed 's/^Packages: //; s/\.$//' >"$have"
test -s "$have" || { echo "no package list found in $kinds" >&2; exit 1; }

PYTHONPATH="$here/src" "$env_python" "$here/scripts/stage_sglang_wheels.py" --have "$have" >"$stage/requirements.txt"
echo "sglang==0.5.23" >>"$stage/requirements.txt"
rm -f "$have"

while read -r req; do
  "$env_python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$stage/whl" "$req" \
  || "$env_python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform any -d "$stage/whl" "$req"
done <"$stage/requirements.txt"

size=$(du -sm "$stage/whl" | cut -f1)
count=$(ls "$stage/whl"/*.whl | wc -l)
echo "staged $count wheels, ${size} MiB, in $stage/whl"
if [ "$size" -gt 60 ]; then echo "over the 60 MiB budget" >&2; exit 1; fi

# The device commands (run from the repository root with carry [".stage"]; .stage/ is
# git-ignored there). Two lines, each one device call inside the 10-minute limit:
# the H100 encodes ~35 mixed images/s, so mixed (20 waves of ~80 images) takes ~46 s
# a pass and runs with one timed pass; the others with two. The JSON is rewritten
# after every workload, so a call stopped at its limit keeps what it finished.
cat >"$stage/device_command.txt" <<'CMD'
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .stage/whl/*.whl && export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 || exit; set -o pipefail; python3 -m vitbatch bench --engine sglang --device cuda --encoder qwen2.5-vl-7b --workload small tiny large mixed-chunked --steps 20 --repeat 2 --no-progress --json $OUT/bench_sglang_a.json 2>&1 | tee $OUT/bench_sglang_a.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .stage/whl/*.whl && export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 || exit; set -o pipefail; python3 -m vitbatch bench --engine sglang --device cuda --encoder qwen2.5-vl-7b --workload mixed --steps 20 --repeat 1 --no-progress --json $OUT/bench_sglang_mixed.json 2>&1 | tee $OUT/bench_sglang_mixed.log
CMD
echo "device commands (one per line, longest $(awk '{ print length }' "$stage/device_command.txt" | sort -n | tail -1) chars; carry [\".stage\"]):"
cat "$stage/device_command.txt"
