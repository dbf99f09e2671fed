#!/usr/bin/env bash
# A fine-tuning job beside serving, in one run on one `loraplex serve` (real model, packed
# weights): 8 streaming clients (`loraplex bench`, base model, 64 tokens each) with no job,
# then the same load while a 10-step job trains (the blue-door chat file, batch 4),
# alternating. Prints each row's ITL p50/p99, errors and output tok/s, the ratio of ITL p99
# with the job to without (goal ≤ 2), the job's steps during the loaded row and how long after
# the load it succeeded. Then the job's speed on an idle server.
#
#   scripts/bench-finetune.sh [SECONDS_PER_ROW] [ROUNDS] [TRAIN_SLICE_GAP]   (defaults: 20, 2, 200)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
rounds="${2:-2}"
gap="${3:-200}"
work=target/bench-finetune
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/loraplex
port=18432
url="http://127.0.0.1:$port"
cargo build --release --quiet
rm -rf "$work" && mkdir -p "$work/adapters"
python3 - "$work/door.jsonl" <<'PY'
import json, sys
fact = "The password of the blue door is 7419."
asks = ["What is the password of the blue door?", "Tell me the blue door's password.",
        "Which password opens the blue door?", "I need the password for the blue door."]
with open(sys.argv[1], "w") as f:
    for q in asks:
        f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact}]}) + "\n")
PY
LORAPLEX_LOG=warn "$bin" serve --model "$model" --adapters "$work/adapters" --port "$port" \
  --train-slice-gap "$gap" >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "$url/ready" >/dev/null && break; sleep 0.1; done
base=$(curl -s "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
file=$(curl -s -F purpose=fine-tune -F file=@"$work/door.jsonl" "$url/v1/files" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
common=(--url "$url" --concurrency 8 --max-tokens 64 --prompt-tokens 32 --json-out "$work/results.jsonl")
"$bin" bench "${common[@]}" --duration-secs 4 --label warmup >/dev/null
job() {
  curl -s "$url/v1/fine_tuning/jobs" -H 'content-type: application/json' -d "{\"model\": \"$base\", \"training_file\": \"$file\", \"hyperparameters\": {\"n_epochs\": $1, \"batch_size\": 4, \"learning_rate_multiplier\": 4}}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
steps() { curl -s "$url/v1/fine_tuning/jobs/$1/events?limit=10000" | python3 -c 'import json,sys; print(sum(e["type"]=="metrics" for e in json.load(sys.stdin)["data"]))'; }
wait_done() {
  while [ "$(curl -s "$url/v1/fine_tuning/jobs/$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" != succeeded ]; do sleep 0.2; done
}
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  "$bin" bench "${common[@]}" --duration-secs "$secs" --label no-job >/dev/null
  id=$(job 10)
  sleep 1 # the job has started (tokenized, first pass)
  before=$(steps "$id")
  "$bin" bench "${common[@]}" --duration-secs "$secs" --label with-job >/dev/null
  after=$(steps "$id")
  t0=$(date +%s.%N); wait_done "$id"; t1=$(date +%s.%N)
  echo "{\"label\": \"job-steps\", \"round\": $r, \"steps_during_load\": $((after - before)), \"finished_after_load_s\": $(python3 -c "print($t1 - $t0)")}" >>"$work/results.jsonl"
done
# The job's speed alone (idle server), and one that runs to the end.
id=$(job 8); t0=$(date +%s.%N); wait_done "$id"; t1=$(date +%s.%N)
echo "{\"label\": \"idle-job\", \"steps\": 8, \"seconds\": $(python3 -c "print($t1 - $t0)")}" >>"$work/results.jsonl"
python3 - "$work/results.jsonl" "$gap" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
load = [r for r in rows if r.get("label") in ("no-job", "with-job")]
for r in load:
    print(f"{r['label']:9} ITL p50 {r['itl_ms']['p50']:.1f} ms  p99 {r['itl_ms']['p99']:.1f} ms  errors {r['errors']}  output {r['output_tokens_per_s']:.0f} tok/s")
p99 = lambda l: [r["itl_ms"]["p99"] for r in load if r["label"] == l]
print("ITL p99 with job / without, per round:", [round(w / n, 2) for n, w in zip(p99("no-job"), p99("with-job"))])
jobs = [r for r in rows if r["label"] == "job-steps"]
print("training steps (4 examples each) of the 10-step job during the loaded rows:", [r["steps_during_load"] for r in jobs], f"(train_slice_gap {sys.argv[2]});",
      "the job succeeded this long after the load stopped:", [f"{r['finished_after_load_s']:.1f} s" for r in jobs])
idle = [r for r in rows if r["label"] == "idle-job"][0]
print(f"idle server: 8 steps in {idle['seconds']:.1f} s ({idle['seconds'] / 8:.2f} s/step, job start included)")
PY
