#!/usr/bin/env python3
"""Inter-token latency of 8 streaming clients while one ~4,000-token prompt prefills (the
memory-aware scheduling issue's benchmark (b)), against a running `loraplex serve` on PORT:

    scripts/itl-during-long-prefill.py PORT

Prints the long prompt's TTFT, the 8 streams' median inter-token gap outside the prefill, and
the largest / p99 gap while it runs."""
import json, sys, threading, time, urllib.request, statistics
port = int(sys.argv[1])
url = f"http://127.0.0.1:{port}/v1/completions"
def stream(times, tokens):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        for line in r:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                times.append(time.perf_counter())
streams = [[] for _ in range(8)]
threads = [threading.Thread(target=stream, args=(s, 400)) for s in streams]
for t in threads: t.start()
time.sleep(2.0)
long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 440)  # ~4,000 tokens
t0 = time.perf_counter()
body = json.dumps({"prompt": long_prompt, "max_tokens": 1, "temperature": 0}).encode()
with urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})) as r:
    usage = json.loads(r.read())["usage"]
t1 = time.perf_counter()
for t in threads: t.join()
gaps_all, gaps_during = [], []
for s in streams:
    for a, b in zip(s, s[1:]):
        (gaps_during if a >= t0 and b <= t1 + 0.5 else gaps_all).append(b - a)
med = statistics.median(gaps_all)
during = sorted(gaps_during)
p99 = during[int(0.99 * (len(during) - 1))] if during else float("nan")
print(f"prompt {usage['prompt_tokens']} tokens, TTFT {t1 - t0:.2f} s; ITL median {med*1000:.1f} ms, during-prefill max {max(during)*1000:.0f} ms p99 {p99*1000:.0f} ms, ratio p99/median {p99/med:.1f}")
