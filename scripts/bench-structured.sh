#!/usr/bin/env bash
# Structured outputs under load, in one run: 32 clients on 32 different rank-8 q/v adapters,
# every client with its own JSON schema (`loraplex bench --json-schema-per-client`), against
# the same load unconstrained, alternating, on one `loraplex serve` (2 threads). Prints the
# aggregate output tok/s of each, their ratio (goal ≥ 0.9), and the server's mask time per
# step (computed beside the forward) and the part of it each step waited for. Then the
# criterion bench `structured` times compiling a typical schema and one mask.
#
#   scripts/bench-structured.sh [SECONDS_PER_ROW] [ROUNDS]      (defaults: 20, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
rounds="${2:-3}"
threads="${LORAPLEX_BENCH_THREADS:-2}"
work=target/bench-structured
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/loraplex
port=18431
cargo build --release --quiet
mkdir -p "$work"
rm -f "$work/results.jsonl"
[ -d "$work/adapters" ] || "$bin" bench --make-adapters "$work/adapters" --adapter-count 32 >/dev/null
LORAPLEX_LOG=warn RAYON_NUM_THREADS="$threads" "$bin" serve --model "$model" --adapters "$work/adapters" \
  --port "$port" --max-batch-size 32 >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.1; done
common=(--url "http://127.0.0.1:$port" --concurrency 32 --adapter-count 32 --distribution per-client
  --max-tokens 64 --prompt-tokens 28 --json-out "$work/results.jsonl")
# Warm-up: every adapter loaded, every client's grammar compiled once.
"$bin" bench "${common[@]}" --duration-secs 4 --json-schema-per-client --label warmup >/dev/null
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  "$bin" bench "${common[@]}" --duration-secs "$secs" --label free >/dev/null
  "$bin" bench "${common[@]}" --duration-secs "$secs" --label constrained --json-schema-per-client >/dev/null
done
python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    assert r["errors"] == 0, r
free = [r for r in rows if r["label"] == "free"]
cons = [r for r in rows if r["label"] == "constrained"]
print("| round | unconstrained tok/s | each client its own schema tok/s | ratio | mask ms/step | waited ms/step |")
print("|---|---|---|---|---|---|")
for i, (f, c) in enumerate(zip(free, cons), 1):
    print(f"| {i} | {f['output_tokens_per_s']:.1f} | {c['output_tokens_per_s']:.1f} | {c['output_tokens_per_s'] / f['output_tokens_per_s']:.2f} | {c['mask_ms_per_step']:.2f} | {c['mask_wait_ms_per_step']:.2f} |")
bf, bc = max(r["output_tokens_per_s"] for r in free), max(r["output_tokens_per_s"] for r in cons)
print(f"| best | {bf:.1f} | {bc:.1f} | **{bc / bf:.2f}** | | |")
PY
kill $server 2>/dev/null || true
cargo bench --bench structured --quiet -- --noplot 2>/dev/null | grep -E "time:|^structured" || true
