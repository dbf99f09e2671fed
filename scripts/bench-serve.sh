#!/usr/bin/env bash
# The serving benchmark of docs/BENCHMARKS.md: starts `loraplex serve` on the default model
# with 128 synthetic rank-8 q/v adapters, then drives it with `loraplex bench` at concurrency
# 1, 8 and 32 × {base only, 1 adapter, 32 distinct adapters, 128 registered (power-law)}.
# Loopback only. Usage: scripts/bench-serve.sh [DURATION_SECS] [OUT_DIR] [OUTPUT_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-15}"
tokens="${3:-64}"
out="${2:-target/bench-serve}"
bin=target/release/loraplex
port=8199
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
rm -rf "$out" && mkdir -p "$out/adapters"
"$bin" bench --make-adapters "$out/adapters" --adapter-count 128 >/dev/null
LORAPLEX_LOG=warn "$bin" serve --adapters "$out/adapters" --port "$port" --max-batch-size 32 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
run() { "$bin" bench --url "http://127.0.0.1:$port" --duration-secs "$secs" --json-out "$out/results.jsonl" --max-tokens "$tokens" "$@" | tail -1; }
# Warm-up (first allocations, adapter loads).
"$bin" bench --url "http://127.0.0.1:$port" --duration-secs 3 --concurrency 8 --adapter-count 128 >/dev/null
printf "%s\n" "| run | clients | adapters (pool/per req) | req/s | output tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | errors | peak RSS MiB |" "|---|---|---|---|---|---|---|---|---|" > "$out/results.md"
for c in 1 8 32; do
  run --concurrency "$c" --label "base c=$c" --adapter-count 0 >> "$out/results.md"
  run --concurrency "$c" --label "1 adapter c=$c" --adapter-count 1 >> "$out/results.md"
  run --concurrency "$c" --label "32 distinct c=$c" --adapter-count 32 >> "$out/results.md"
  run --concurrency "$c" --label "128 registered c=$c" --adapter-count 128 --distribution power-law >> "$out/results.md"
done
cat "$out/results.md"
