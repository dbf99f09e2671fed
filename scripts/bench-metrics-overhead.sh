#!/usr/bin/env bash
# Decode throughput with metrics on vs off (issue: overhead ≤ 2 %), alternating servers to
# spread the machine's noise: `scripts/bench-metrics-overhead.sh [SECONDS] [ROUNDS]`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"; rounds="${2:-2}"
bin=target/release/loraplex; port=8197; out=target/bench-metrics
mkdir -p "$out/adapters"
[ -d "$out/adapters/synth-0" ] || "$bin" bench --make-adapters "$out/adapters" --adapter-count 32 >/dev/null
for r in $(seq "$rounds"); do
  for m in true false; do
    LORAPLEX_LOG=warn "$bin" serve --adapters "$out/adapters" --port "$port" --metrics "$m" &
    pid=$!
    until curl -sf "http://127.0.0.1:$port/ready" >/dev/null; do sleep 0.2; done
    "$bin" bench --url "http://127.0.0.1:$port" --duration-secs 3 --concurrency 8 --adapter-count 32 >/dev/null
    "$bin" bench --url "http://127.0.0.1:$port" --duration-secs "$secs" --concurrency 8 --adapter-count 32 --max-tokens 64 --label "metrics=$m round $r" | tail -1
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
