#!/usr/bin/env bash
# The memory-aware scheduling benchmarks of docs/BENCHMARKS.md (h), all `loraplex bench` rows
# against `loraplex serve` on the default model, loopback only:
#   (a) prefix reuse: one ~1,000-token context, 16 questions in turn, with the prefix cache
#       on and (the control) off;
#   (b) one ~4,000-token prompt arriving while 8 streams decode: their inter-token p99 during
#       the prefill over their median;
#   (c) 64 clients with ~2,000-token prompts against a KV pool that holds 16 of them: errors
#       and the server's peak resident memory against pool + model.
# Usage: scripts/bench-scheduling.sh [OUT_DIR] [LOAD_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-scheduling}"
secs="${2:-60}"
bin=target/release/loraplex
port=8198
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
rm -rf "$out" && mkdir -p "$out/adapters"
cp -r ../shared/adapters/qa-r8 "$out/adapters/qa-0"
server=
start() {
  LORAPLEX_LOG=warn "$bin" serve --adapters "$out/adapters" --port "$port" "$@" > "$out/serve.log" 2>&1 &
  server=$!
  until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
}
stop() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap stop EXIT
bench() { "$bin" bench --url "http://127.0.0.1:$port" --json-out "$out/results.jsonl" "$@" | tail -1; }

{
  echo "(a) prefix reuse"
  echo "| run | context tokens | questions | TTFT q1 ms | TTFT q2.. median / max ms | ratio |"
  echo "|---|---|---|---|---|---|"
  for cache in true false; do
    start --prefix-cache="$cache"
    bench --scenario prefix-reuse --context-tokens 1000 --questions 16 --max-tokens 8 --seed 1 --label "base, cache $cache"
    bench --scenario prefix-reuse --context-tokens 1000 --questions 16 --max-tokens 8 --seed 2 --adapter-count 1 --adapter-prefix qa- --label "qa-r8, cache $cache"
    stop
  done
  echo
  echo "(b) long prompt during decode"
  echo "| run | streams | long prompt tokens | its TTFT ms | ITL median ms | ITL during prefill p99 / max ms | p99 / median |"
  echo "|---|---|---|---|---|---|---|"
  start
  bench --scenario long-prefill --concurrency 8 --prompt-tokens 4000 --max-tokens 400 --label "default pacing"
  stop
  start --step-latency-ratio 0
  bench --scenario long-prefill --concurrency 8 --prompt-tokens 4000 --max-tokens 400 --label "no pacing (512-token chunks)"
  stop
  echo
  echo "(c) 64 clients, ~2,000-token prompts, a pool for 16"
  # 16 sequences of ~2,010 + 16 tokens: 128 blocks of 737,280 bytes each.
  pool=$((16 * 128 * 737280))
  start --kv-cache-bytes "$pool" --max-batch-size 64
  model_rss=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^process_resident_memory_bytes /{printf "%d", $2/1048576}')
  echo "pool $((pool / 1048576)) MiB; server RSS idle after start (model + runtime): $model_rss MiB"
  echo "| run | clients | adapters (pool/per req) | req/s | output tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | errors | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|"
  bench --concurrency 64 --prompt-tokens 2000 --max-tokens 16 --duration-secs "$secs" --label "64 clients, pool for 16"
  curl -s "http://127.0.0.1:$port/metrics" | grep -E '^loraplex_(preemptions_total|kv_cache_blocks|prefix_cache)' || true
  stop
} | tee "$out/results.md"
