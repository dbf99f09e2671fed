#!/usr/bin/env bash
# Soak under churn (docs/RELIABILITY.md): the release server on the default model with 16
# synthetic adapters; 64 streaming clients for 120 s mixing two adapters each, 10 % of them
# hanging up after their first tokens, while a churn loop removes or re-adds one of the
# adapters soak8..soak15 every second (atomic rename in, `rm -rf` out). Afterwards it checks:
# lost = 0, no 5xx, the running/waiting gauges back at 0 (cancelled streams freed their slots),
# and resident memory at the end within 10 % of its level after warm-up. Loopback only.
# Usage: scripts/soak.sh [SECONDS] [CLIENTS] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-120}"
clients="${2:-64}"
out="${3:-target/soak}"
bin=target/release/loraplex
port=8431
url="http://127.0.0.1:$port"
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
rm -rf "$out" && mkdir -p "$out/adapters" "$out/spare"
"$bin" bench --make-adapters "$out/spare" --adapter-count 16 --adapter-prefix soak >/dev/null
for i in $(seq 0 7); do mv "$out/spare/soak$i" "$out/adapters/"; done
LORAPLEX_LOG=warn "$bin" serve --adapters "$out/adapters" --port "$port" --max-batch-size 32 --max-waiting 256 \
  --rescan-interval-ms 500 2> "$out/server.log" &
server=$!
churn=""
trap 'kill $server $churn 2>/dev/null || true' EXIT
until curl -sf "$url/ready" >/dev/null; do sleep 0.2; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }
metric() { curl -sf "$url/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# Warm-up: every stable adapter loaded, the batch at full size once.
"$bin" bench --url "$url" --duration-secs 20 --concurrency "$clients" --adapter-count 8 --adapter-prefix soak \
  --adapters-per-request 2 --max-tokens 32 >/dev/null
rss_warm=$(rss)

# Churn: one adapter of soak8..soak15 appears (copied aside, renamed in) or disappears per second.
(
  while true; do
    i=$((8 + RANDOM % 8))
    if [ -d "$out/adapters/soak$i" ]; then
      rm -rf "$out/adapters/soak$i"
    else
      rm -rf "$out/adapters/.tmp-soak$i"
      cp -r "$out/spare/soak$i" "$out/adapters/.tmp-soak$i"
      mv "$out/adapters/.tmp-soak$i" "$out/adapters/soak$i"
    fi
    echo "$(date +%s.%N) soak$i" >> "$out/churn.log"
    sleep 1
  done
) &
churn=$!

"$bin" bench --url "$url" --duration-secs "$secs" --concurrency "$clients" --adapter-count 16 --adapter-prefix soak \
  --adapters-per-request 2 --max-tokens 32 --disconnect-fraction 0.1 --label "soak $clients clients ${secs}s" \
  --json-out "$out/soak.jsonl" | tail -1
kill $churn 2>/dev/null || true
wait $churn 2>/dev/null || true
churn=""
sleep 2
rss_end=$(rss)
running=$(metric loraplex_sequences_running)
waiting=$(metric loraplex_sequences_waiting)
curl -sf "$url/metrics" | grep -E '^loraplex_requests_total' | grep -E 'cancelled|server_error' > "$out/metrics-outcomes.txt" || true
awk '{s += $2} END {print "cancelled/server_error requests in /metrics (per adapter of each mix):", s + 0}' "$out/metrics-outcomes.txt"
status=0
changes=$(wc -l < "$out/churn.log")
python3 - "$out/soak.jsonl" "$rss_warm" "$rss_end" "${running:-missing}" "${waiting:-missing}" "$changes" > "$out/summary.txt" <<'EOF' || status=$?
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
o = r["outcomes"]
warm, end = int(sys.argv[2]), int(sys.argv[3])
drift = (end - warm) / warm * 100
print(f"requests {r['requests']}: completed {o['completed']}, cancelled by clients {o['cancelled']}, "
      f"rejected {o['rejected']}, 5xx {o['server_errors']}, stream errors {o['stream_errors']}, "
      f"lost {o['lost']}, connect errors {o['connect_errors']}")
print(f"output {r['output_tokens_per_s']:.1f} tok/s; adapter changes {sys.argv[6]}")
print(f"running/waiting after the run: {sys.argv[4]}/{sys.argv[5]}")
print(f"RSS after warm-up {warm/1024:.0f} MiB, at the end {end/1024:.0f} MiB ({drift:+.1f} %)")
ok = o["lost"] == 0 and o["server_errors"] == 0 and o["connect_errors"] == 0 and abs(drift) <= 10 \
    and sys.argv[4] in ("0", "0.0") and sys.argv[5] in ("0", "0.0")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
cat "$out/summary.txt"
exit "$status"
