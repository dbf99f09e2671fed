#!/usr/bin/env bash
# Compares loraplex with llama.cpp on a GGUF: token ids of a few texts (llama-server's
# /tokenize) and the top-5 next-token log-probabilities of a few prompts (loraplex on --dtype
# f32). Needs llama.cpp built (scripts/bench-vs-llamacpp.sh builds it into target/llama.cpp).
#
#   scripts/check-gguf-vs-llamacpp.sh MODEL.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
model="$1"
llama="${LLAMA_CPP_DIR:-target/llama.cpp}"
cargo build --release --quiet
"$llama/build/bin/llama-server" -m "$model" -t 2 --port 8313 -c 2048 > target/check-gguf-llama.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:8313/health >/dev/null; do sleep 0.3; done
python3 - "$model" <<'PY'
import json, subprocess, sys, urllib.request
model = sys.argv[1]
def post(path, body):
    req = urllib.request.Request("http://127.0.0.1:8313" + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())
def ours(prompt, *extra):
    out = subprocess.run(["target/release/loraplex", "generate", "--model", model, "--prompt", prompt, "--max-tokens", "1", "--json", *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
ok = True
for text in ["def fibonacci(n):\n    if n < 2:\n        return n", "Hello, world! 12345 Ünïcödé 😀\ttabs  spaces", "The capital of France is"]:
    want = post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]
    got = ours(text)["prompt_ids"]
    ok &= got == want
    print(f"tokens {'same' if got == want else 'DIFFER'}: {text!r}")
for prompt in ["def quicksort(arr):\n    ", "The capital of France is", "Once upon a time, there was a"]:
    ref = post("/completion", {"prompt": prompt, "n_predict": 1, "temperature": 0, "n_probs": 5, "cache_prompt": False})["completion_probabilities"][0]["top_logprobs"]
    mine = dict((i, l) for i, l in ours(prompt, "--dtype", "f32", "--logprobs", "20")["top_logprobs"][0])
    worst = max(abs(mine.get(t["id"], -99.0) - t["logprob"]) for t in ref)
    print(f"top-5 log-prob gap {worst:.3f}: {prompt!r}")
sys.exit(0 if ok else 1)
PY
