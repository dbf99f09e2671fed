#!/usr/bin/env bash
# The fleet benchmark of docs/BENCHMARKS.md (i), with NVIDIA's aiperf (PyPI) as the load
# generator: one replica, then the one-host fleet (scripts/fleet.sh: 3 replicas behind HAProxy,
# hashing on the model, then round-robin as the control),
# each driven with the same streaming completions spread uniformly over 30 synthetic rank-8
# adapters (`-m fleet-0,…,fleet-29 --model-selection-strategy random`), tokens counted offline
# with the model's own tokenizer (`loraplex export-tokenizer`). aiperf goes into a venv under
# target/ (no network needed once installed). Loopback only.
# Usage: scripts/bench-fleet.sh [REQUESTS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-200}"
conc="${2:-12}"
out=target/bench-fleet
bin=target/release/loraplex
venv=target/aiperf-venv
scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
[ -x "$venv/bin/aiperf" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet "aiperf==0.13.0"; }
rm -rf "$out" && mkdir -p "$out"
"$bin" bench --make-adapters "$out/adapters" --adapter-count 30 --adapter-prefix fleet- >/dev/null
"$bin" export-tokenizer --out "$out/tokenizer" >/dev/null
models=$(seq -s, -f 'fleet-%g' 0 29)
serve_opts=(--kv-cache-bytes 512MiB --max-batch-size 32)

profile() {  # name url
  "$venv/bin/aiperf" profile -m "$models" --model-selection-strategy random --url "$2" \
    --endpoint-type completions --streaming --tokenizer "$PWD/$out/tokenizer" --concurrency "$conc" \
    --request-count "$requests" --warmup-request-count "$conc" --prompt-input-tokens-mean 128 --prompt-input-tokens-stddev 0 \
    --prompt-output-tokens-mean 32 --prompt-output-tokens-stddev 0 --extra-inputs ignore_eos:true --random-seed 1 \
    --output-artifact-dir "$PWD/$out/$1" --no-server-metrics --no-gpu-telemetry >"$out/$1.log" 2>&1
}

loads() {  # ports...: successful adapter loads per replica
  for p in "$@"; do curl -sf "http://127.0.0.1:$p/metrics" | awk '/^loraplex_adapter_loads_total\{result="ok"\}/ {printf "%d ", $2}'; done
}

# One replica, all cores.
LORAPLEX_LOG=warn "$bin" serve --adapters "$out/adapters" --port 18301 --gateway-metrics "${serve_opts[@]}" >"$out/server-single.log" 2>&1 &
single=$!
trap 'kill $single 2>/dev/null || true; scripts/fleet.sh stop --dir "$out/fleet"' EXIT
until curl -sf http://127.0.0.1:18301/ready >/dev/null; do sleep 0.2; done
profile single http://127.0.0.1:18301
single_loads=$(loads 18301)
kill $single; wait $single 2>/dev/null || true

# Three replicas behind HAProxy on the same two cores (one thread each).
LORAPLEX_THREADS=1 LORAPLEX_LOG=warn scripts/fleet.sh start --replicas 3 --adapters "$out/adapters" --port 18310 \
  --dir "$out/fleet" -- "${serve_opts[@]}" >/dev/null
profile fleet http://127.0.0.1:18310
fleet_loads=$(loads 18311 18312 18313)
scripts/fleet.sh stop --dir "$out/fleet"
# The same fleet with round-robin (the control: no adapter affinity).
LORAPLEX_THREADS=1 LORAPLEX_LOG=warn scripts/fleet.sh start --replicas 3 --adapters "$out/adapters" --port 18310 \
  --dir "$out/fleet" --balance roundrobin -- "${serve_opts[@]}" >/dev/null
profile roundrobin http://127.0.0.1:18310
rr_loads=$(loads 18311 18312 18313)

python3 - "$out" "$requests" "$conc" "$single_loads" "$fleet_loads" "$rr_loads" <<'PY'
import json, sys
out, requests, conc, single_loads, fleet_loads, rr_loads = sys.argv[1:]
rows = ["| setup | req/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors | adapter loads per replica |",
        "|---|---|---|---|---|---|---|"]
for name, label, loads in [("single", "1 replica (2 threads)", single_loads), ("fleet", "3 replicas behind HAProxy, hash on model (1 thread each)", fleet_loads),
                           ("roundrobin", "3 replicas behind HAProxy, round-robin (control)", rr_loads)]:
    d = json.load(open(f"{out}/{name}/profile_export_aiperf.json"))
    errors = sum(e.get("count", 0) for e in d.get("error_summary") or [])
    t, i = d["time_to_first_token"], d["inter_token_latency"]
    rows.append(f"| {label} | {d['request_throughput']['avg']:.2f} | {d['output_token_throughput']['avg']:.1f} | "
                f"{t['p50']:.0f} / {t['p99']:.0f} | {i['p50']:.1f} / {i['p99']:.1f} | {errors} | {loads.strip()} |")
print(f"aiperf {d['aiperf_version']}: {requests} streaming completions, concurrency {conc}, 128 prompt + 32 output tokens, "
      "uniform over 30 rank-8 adapters")
print("\n".join(rows))
PY
