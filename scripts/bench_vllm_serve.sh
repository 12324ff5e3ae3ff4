#!/usr/bin/env bash
# What a vLLM user measures: `vllm serve` with and without vitbatch, each loaded by
# `vllm bench serve --backend openai-chat --dataset-name random-mm` (vLLM's own client).
#
# Usage: scripts/bench_vllm_serve.sh [MODEL] [OUT_DIR]
#   MODEL    a model directory or id (default: a Qwen2.5-VL-7B-shaped directory without
#            weights, served with --load-format dummy: no download)
#   OUT_DIR  where vLLM's result JSON files go (default ./bench-serve)
# Environment: PROMPTS (200), RATE (inf), IMAGES_PER_REQUEST (2), SERVE_ARGS (extra
# `vllm serve` arguments), PYTHON (python3), VITBATCH_OPTIONS ('{}'), PORT (8011), SHAPE (7b; tiny for CPU),
# MODES ("native vitbatch"; e.g. "vitbatch" to try other VITBATCH_OPTIONS into another OUT_DIR).
#
# Each server is warmed up (vLLM's --num-warmups plus one untimed run), then measured once.
# Prefix caching is off so both servers encode every image they are sent.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-}"
out="${2:-$PWD/bench-serve}"
port="${PORT:-8011}"
prompts="${PROMPTS:-200}"
rate="${RATE:-inf}"
per_request="${IMAGES_PER_REQUEST:-2}"
options="${VITBATCH_OPTIONS:-{\}}"
mkdir -p "$out"

load=()
if [[ -z "$model" ]]; then
  model="$out/qwen2.5-vl-${SHAPE:-7b}"
  "${PYTHON:-python3}" -m vitbatch.bench.qwen_vl_model "$model" --shape "${SHAPE:-7b}" >/dev/null
  load=(--load-format dummy)
fi

server=""
stop_server() { [[ -n "$server" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap stop_server EXIT

bench() {  # bench NAME PROMPTS [extra args]
  local name="$1" n="$2"; shift 2
  vllm bench serve --backend openai-chat --endpoint /v1/chat/completions \
    --base-url "http://127.0.0.1:$port" --model "$model" \
    --dataset-name random-mm --num-prompts "$n" --request-rate "$rate" \
    --random-input-len 64 --random-output-len 16 --random-range-ratio 0 --ignore-eos \
    --random-mm-base-items-per-request "$per_request" --random-mm-num-mm-items-range-ratio 0.5 \
    --random-mm-limit-mm-per-prompt '{"image": 4, "video": 0}' \
    --random-mm-bucket-config '{(448, 448, 1): 0.4, (672, 672, 1): 0.3, (1008, 1008, 1): 0.3}' \
    --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 \
    --seed 0 "$@" --result-dir "$out" --result-filename "$name.json" --save-result
}

for mode in ${MODES:-native vitbatch}; do
  extra=()
  [[ "$mode" == vitbatch ]] && extra=(--additional-config "{\"vitbatch\": $options}")
  # shellcheck disable=SC2086  # SERVE_ARGS is a list of arguments
  vllm serve "$model" "${load[@]}" --port "$port" --no-enable-prefix-caching \
    --limit-mm-per-prompt '{"image": 4, "video": 0}' ${SERVE_ARGS:-} "${extra[@]}" \
    >"$out/server-$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -40 "$out/server-$mode.log"; exit 1; }
    sleep 1
  done
  bench "warmup-$mode" "$((prompts / 4 + 1))" --num-warmups 4 >/dev/null
  bench "$mode" "$prompts"
  if [[ "$mode" == vitbatch ]] && ! grep -q "vitbatch: encoder steps of this worker" "$out/server-$mode.log"; then
    echo "vitbatch did not switch on in the server (see $out/server-$mode.log)" >&2
    exit 1
  fi
  stop_server
done
"${PYTHON:-python3}" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {m: json.loads((out / f"{m}.json").read_text()) for m in ("native", "vitbatch") if (out / f"{m}.json").exists()}
keys = ("request_throughput", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p50_e2el_ms", "p99_e2el_ms")
print("| mode | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for mode, r in rows.items():
    print(f"| {mode} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in keys) + " |")
if len(rows) == 2:
    print(f"vitbatch / native request throughput: {rows['vitbatch']['request_throughput'] / rows['native']['request_throughput']:.3f}x")
PY
