#!/usr/bin/env bash
# What an SGLang user measures: `python -m sglang.launch_server` natively and with
# `--enable-vit-batching`, each loaded by SGLang's own client (`python -m sglang.bench_serving
# --backend sglang-oai-chat --dataset-name image`: 1 to IMAGES images per request of random
# resolutions), all at once and at request rates where requests queue, the two servers
# alternating for ROUNDS rounds (order rotated each round, a fresh server each time). After
# each measured run it saves the server's /metrics (vitbatch's counters, SGLang's own) and the
# peak GPU memory; at the end a greedy-equality check (temperature 0, EQUAL_PROMPTS requests
# through the OpenAI API) on one more start of each server, and a table of median (min-max).
#
# Usage: scripts/bench_sglang_serve.sh [MODEL] [OUT_DIR]
#   MODEL    a model directory or id (default: a Qwen2.5-VL-7B-shaped directory without
#            weights, served with --load-format dummy: no download)
#   OUT_DIR  where the result files go (default ./bench-sglang-serve)
# Environment:
#   PHASES ("rates equal burst")  which parts to run, in this order
#   ROUNDS (3)              alternating rounds (at least 3 for a verdict)
#   FIRST_ROUND (1)         resume: run rounds FIRST_ROUND..ROUNDS into the same OUT_DIR
#   TIME_BUDGET (0)         seconds; when set, no round starts that would likely end past it
#   RATES ("inf auto")      inf = all at once, N = N req/s (Poisson), auto = 0.7x and 0.9x the
#                           all-at-once throughput of the first server measured (requests queue)
#   PROMPTS (200)           prompts per measured run
#   IMAGES (4)              most images per request (--random-image-count: 1..IMAGES)
#   RESOLUTION (random:448x448-1344x1344)   bench_serving's --image-resolution
#   INPUT_LEN (64), OUTPUT_LEN (32)         text tokens in and out per request
#   EQUAL_PROMPTS (64)      greedy-equality requests, EQUAL_CONCURRENCY (8)
#   BURSTS ("16 32 64 128") burst sizes sent all at once to one start of each server, each
#                           request BURST_IMAGES (4) images of BURST_RESOLUTION (1344x1344);
#                           a burst that kills the server ends that server's bursts
#   MODES ("native vitbatch"), PORT (30011), SHAPE (7b), PYTHON (python3)
#   SERVE_ARGS              extra server arguments for both, e.g. on a machine without
#                           flashinfer kernels: "--attention-backend triton --sampling-backend pytorch"
#   VITBATCH_ARGS           extra arguments for the vitbatch server (--vit-batch-max-patches N ...)
set -euo pipefail
model="${1:-}"
out="${2:-$PWD/bench-sglang-serve}"
port="${PORT:-30011}"
prompts="${PROMPTS:-200}"
rounds="${ROUNDS:-3}"
rates="${RATES:-inf auto}"
phases=" ${PHASES:-rates equal burst} "
budget="${TIME_BUDGET:-0}"
images="${IMAGES:-4}"
resolution="${RESOLUTION:-random:448x448-1344x1344}"
equal_prompts="${EQUAL_PROMPTS:-64}"
py="${PYTHON:-python3}"
read -r -a modes <<<"${MODES:-native vitbatch}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

load=()
if [[ -z "$model" ]]; then
  model="$out/qwen2.5-vl-${SHAPE:-7b}"
  "$py" -m vitbatch.bench.qwen_vl_model "$model" --shape "${SHAPE:-7b}" >/dev/null 2>&1
  # The generated tokenizer's chat template renders text only (SGLang would drop the images
  # of a chat request): SGLang's own Qwen2-VL conversation template places them.
  load=(--load-format dummy --chat-template qwen2-vl)
fi
base="http://127.0.0.1:$port"

server="" sampler=""
stop_server() {
  if [[ -n "$sampler" ]]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; fi
  if [[ -n "$server" ]]; then  # the launcher leads its own process group (setsid): end all of it
    kill -TERM -- "-$server" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 -- "-$server" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  server="" sampler=""
}
trap stop_server EXIT

start_server() {  # start_server MODE LOG: exits when the server does not come up
  local mode="$1" log="$2" extra=() started=$SECONDS
  case "$mode" in
    vitbatch) read -r -a extra <<<"--enable-vit-batching ${VITBATCH_ARGS:-}" ;;
    native) ;;
    *) echo "unknown mode $mode (native, vitbatch)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # SERVE_ARGS is a list of arguments
  setsid "$py" -m sglang.launch_server --model-path "$model" "${load[@]}" --host 127.0.0.1 \
    --port "$port" --enable-metrics ${SERVE_ARGS:-} "${extra[@]}" >"$log" 2>&1 &
  server=$!
  for _ in $(seq 1200); do
    curl -sf "$base/health_generate" >/dev/null 2>&1 && break
    if ! kill -0 "$server" 2>/dev/null; then server=""; tail -40 "$log" >&2; exit 1; fi
    sleep 1
  done
  curl -sf "$base/health_generate" >/dev/null || { echo "server $mode did not come up (see $log)" >&2; exit 1; }
  if [[ "$mode" == vitbatch ]] && grep -q "vitbatch is off" "$log"; then
    grep "vitbatch is off" "$log" >&2; exit 1
  fi
  echo "  $mode server up in $((SECONDS - started)) s" >&2
}

alive() { kill -0 "$server" 2>/dev/null && curl -sf -m 30 "$base/health" >/dev/null 2>&1; }

throughput() {  # throughput NAME: request_throughput of a finished run
  "$py" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["request_throughput"])' "$out/$1.jsonl"
}

peak_memory() {  # sample GPU memory every 0.5 s into FILE (the max is read afterwards)
  command -v nvidia-smi >/dev/null || return 0
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; sleep 0.5; done) >"$1" &
  sampler=$!
}

bench() {  # bench NAME PROMPTS RATE [extra args]: one JSON line in NAME.jsonl
  local name="$1" n="$2" rate="$3"; shift 3
  local count_args=(--image-count "$images" --random-image-count --image-resolution "$resolution")
  if [[ -n "${FIXED_IMAGES:-}" ]]; then  # bursts: exactly FIXED_IMAGES of FIXED_RESOLUTION each
    count_args=(--image-count "$FIXED_IMAGES" --image-resolution "$FIXED_RESOLUTION")
  fi
  rm -f "$out/$name.jsonl"
  ${CLIENT_TIMEOUT:+timeout "$CLIENT_TIMEOUT"} "$py" -m sglang.bench_serving --backend sglang-oai-chat --base-url "$base" \
    --model "$model" --tokenizer "$model" --dataset-name image --num-prompts "$n" \
    "${count_args[@]}" \
    --random-input-len "${INPUT_LEN:-64}" --random-output-len "${OUTPUT_LEN:-32}" \
    --random-range-ratio 1 --request-rate "$rate" --seed 0 --disable-tqdm \
    --output-file "$out/$name.jsonl" "$@"
}

metrics() {  # metrics FILE: the server's Prometheus text
  curl -sf "$base/metrics" >"$1" || echo "# /metrics not reachable" >"$1"
}

count=${#modes[@]}
t0=$SECONDS last=0 done_rounds=0
if [[ "$phases" == *" rates "* ]]; then
for ((round = ${FIRST_ROUND:-1}; round <= rounds; round++)); do
  if ((budget > 0 && round > ${FIRST_ROUND:-1} && SECONDS - t0 + last > budget)); then
    echo "time budget: stopping after $done_rounds round(s)" >&2; break
  fi
  r0=$SECONDS
  for ((i = 0; i < count; i++)); do
    mode="${modes[$(((i + round - 1) % count))]}"  # rotated each round
    log="$out/server-$mode-r$round.log"
    echo "round $round/$rounds: $mode" >&2
    start_server "$mode" "$log"
    # Every run of one server start draws other images (its own --seed): a repeated image
    # would be a prefix-cache hit. The same run gets the same seed on every server and round.
    bench "warmup-$mode-r$round" "$((prompts / 4 + 1))" inf --seed 999 >/dev/null 2>&1
    seed=0
    for rate in $rates; do
      if [[ "$rate" == auto ]]; then rate="$auto_rates"; fi
      for r in $rate; do
        name="$mode-r$round-rate$r"
        peak_memory "$out/$name.memory"
        seed=$((seed + 1))
        bench "$name" "$prompts" "$r" --seed "$seed" >"$out/client-$name.log" 2>&1
        metrics "$out/$name.metrics"
        if [[ -n "$sampler" ]]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; sampler=""; fi
        if [[ "$r" == inf && -z "${auto_rates:-}" ]]; then  # first all-at-once run fixes the rates
          t="$(throughput "$name")"
          auto_rates="$("$py" -c "import sys; t=float(sys.argv[1]); print(f'{0.7*t:.1f} {0.9*t:.1f}')" "$t")"
          echo "  all at once: $t req/s; queued rates: $auto_rates" >&2
          echo "$auto_rates" >"$out/auto_rates.txt"
        fi
      done
    done
    stop_server
  done
  last=$((SECONDS - r0)) done_rounds=$round
done
echo "$done_rounds" >"$out/rounds_done.txt"
fi
[[ -f "$out/auto_rates.txt" ]] && auto_rates="$(cat "$out/auto_rates.txt")"
# Greedy equality: the same EQUAL_PROMPTS requests (1..IMAGES images each, fixed seed)
# at temperature 0 through /v1/chat/completions, answers saved per server, then compared.
if [[ "$phases" == *" equal "* || "$phases" == *" burst "* ]]; then
  for mode in "${modes[@]}"; do
    start_server "$mode" "$out/server-$mode-equal.log"
    if [[ "$phases" == *" equal "* ]]; then
    "$py" - "$base" "$model" "$equal_prompts" "$images" "${EQUAL_CONCURRENCY:-8}" \
      "$out/greedy-$mode.json" <<'PY'
import base64, io, json, random, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
url, model, n, most, workers, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
sizes = [(448, 448), (672, 672), (1008, 784), (1344, 1344), (560, 1120)]
def request(i):
    rng = random.Random(i)
    content = [{"type": "text", "text": f"describe the images {i}"}]
    for k in range(rng.randint(1, most)):
        w, h = sizes[rng.randrange(len(sizes))]
        pixels = bytes(rng.getrandbits(8) for _ in range(3 * 16 * 16))  # a 16x16 tile, scaled
        image = Image.frombytes("RGB", (16, 16), pixels).resize((w, h))
        buffer = io.BytesIO(); image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 32, "seed": 0}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        return json.load(response)["choices"][0]["message"]["content"]
with ThreadPoolExecutor(workers) as pool:
    answers = list(pool.map(request, range(n)))
json.dump(answers, open(path, "w"))
PY
    fi
    if [[ "$phases" == *" burst "* ]]; then
      for n in ${BURSTS:-16 32 64 128}; do
        name="burst-$mode-$n"
        peak_memory "$out/$name.memory"
        CLIENT_TIMEOUT="${BURST_TIMEOUT:-300}" FIXED_IMAGES="${BURST_IMAGES:-4}" FIXED_RESOLUTION="${BURST_RESOLUTION:-1344x1344}" \
          bench "$name" "$n" inf --random-output-len 8 --seed "$((100 + n))" >"$out/client-$name.log" 2>&1 || true
        if [[ -n "$sampler" ]]; then kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; sampler=""; fi
        if alive; then state=alive; else state=dead; fi
        oom=$(grep -ciE "out of memory|OutOfMemoryError" "$out/server-$mode-equal.log" || true)
        echo "$mode $n $state $oom" >>"$out/bursts.txt"
        echo "  burst $n: server $state, OOM lines in its log: $oom" >&2
        [[ "$state" == dead ]] && break
      done
    fi
    stop_server
  done
fi

measured_rates="${rates/auto/${auto_rates:-}}"
rounds_done="$(cat "$out/rounds_done.txt" 2>/dev/null || echo "$rounds")"
"$py" - "$out" "$rounds_done" "$measured_rates" "${modes[@]}" <<'PY'
import json, re, statistics, sys
from pathlib import Path
out, rounds, rates, modes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
keys = ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "peak_gpu_mib")
def spread(values):
    m, lo, hi = statistics.median(values), min(values), max(values)
    return m, (f"{m:.2f}" if lo == hi else f"{m:.2f} ({lo:.2f}-{hi:.2f})")
def result(name):
    path = out / f"{name}.jsonl"
    if not path.exists() or not path.read_text().strip():
        return None
    row = json.loads(path.read_text().strip().splitlines()[-1])
    memory = out / f"{name}.memory"
    values = [float(v) for v in memory.read_text().split()] if memory.exists() else []
    row["peak_gpu_mib"] = max(values) if values else float("nan")
    return row
def counters(name):
    path = out / f"{name}.metrics"
    found = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.match(r"(vitbatch_[a-z0-9_]+?)(_total)?(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and not m.group(1).endswith(("_bucket", "_created")):
            found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(4))
    return found
print(f"{rounds} round(s), servers alternating, order rotated; median (min-max) over rounds")
print("| rate | server | " + " | ".join(keys) + " | x native (req/s) | x native (TTFT p50) | verdict |")
print("|---" * (len(keys) + 5) + "|")
for rate in rates:
    runs = {mode: [r for k in range(1, rounds + 1) if (r := result(f"{mode}-r{k}-rate{rate}"))] for mode in modes}
    for mode, results in runs.items():
        if not results:
            continue
        cells = [spread([r[k] for r in results])[1] for k in keys]
        ratio = ttft = verdict = ""
        base = runs.get("native", [])
        if base and mode != "native":
            ours = [r["request_throughput"] for r in results]
            theirs = [r["request_throughput"] for r in base]
            ratio = f"{statistics.median(ours) / statistics.median(theirs):.3f}x"
            ttft = f"{statistics.median(r['median_ttft_ms'] for r in base) / statistics.median(r['median_ttft_ms'] for r in results):.3f}x"
            if len(ours) > 1 and len(theirs) > 1:
                overlap = min(ours) <= max(theirs) and min(theirs) <= max(ours)
                verdict = "same" if overlap else ("faster" if min(ours) > max(theirs) else "slower")
        print(f"| {rate} | {mode} | " + " | ".join(cells) + f" | {ratio} | {ttft} | {verdict} |")
for mode in modes:
    if mode != "native":
        last = counters(f"{mode}-r{rounds}-rate{rates[-1]}")
        print(f"{mode} counters after round {rounds}, rate {rates[-1]} (cumulative per server start):",
              ", ".join(f"{k}={v:g}" for k, v in sorted(last.items())) or "none found")
answers = {m: json.loads((out / f"greedy-{m}.json").read_text()) for m in modes if (out / f"greedy-{m}.json").exists()}
if "native" in answers:
    for mode, got in answers.items():
        if mode != "native":
            same = sum(a == b for a, b in zip(answers["native"], got))
            print(f"greedy outputs equal to native: {mode} {same}/{len(got)}")
bursts = out / "bursts.txt"
if bursts.exists():
    print("bursts (requests x images, all at once): server after the burst, OOM lines in its log so far")
    for line in bursts.read_text().splitlines():
        mode, n, state, oom = line.split()
        row = result(f"burst-{mode}-{n}")
        done = f"{row['completed']}/{n} completed, {row['request_throughput']:.2f} req/s, peak {row['peak_gpu_mib']:.0f} MiB" if row else "no result"
        print(f"  {mode} burst {n}: {done}; server {state}; OOM lines {oom}")
PY
