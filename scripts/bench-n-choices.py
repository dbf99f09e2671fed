#!/usr/bin/env python3
"""`n` choices of one long prompt: wall time of one non-streaming completion with `n: 8` on a
~2,000-token prompt, beside `n: 1` on the same length, for one or more loraplex binaries in one
run (e.g. the build before prompt sharing and the current one). Each repeat uses a prompt of
its own, so no repeat reuses another's prefix-cache blocks.

    scripts/bench-n-choices.py --bin before=/tmp/loraplex-before --bin after=target/release/loraplex

Prints one markdown row per binary: seconds for n=1 and n=8 (median of the repeats), their
ratio, and the prompt tokens the model computed for the n=8 requests (from
`loraplex_prefill_tokens_total`, where the binary exports it). Needs the fetched default model
and `../shared/adapters/qa-r8`.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def prompt(tag, words):
    filler = ("the harbour master logged each vessel, its cargo and the hour of its arrival, "
              "while the tide rose along the old stone quay and gulls circled the masts. ")
    text = f"Record {tag}. " + filler * (words // len(filler.split()) + 1)
    return " ".join(text.split()[:words]) + "\nSummary:"


def run(label, binary, args, adapters):
    port = free_port()
    log = open(os.path.join(adapters, f"{label}.log"), "w")
    model = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    # Run outside the checkout, so that no binary reads config/loraplex.toml (an older build
    # refuses the keys it does not know): every setting is its default.
    proc = subprocess.Popen([os.path.abspath(binary), "serve", "--model", model, "--port", str(port), "--adapters", adapters],
                            stdout=log, stderr=log, env=dict(os.environ, LORAPLEX_LOG="warn"), cwd=adapters)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                get(base + "/ready")
                break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit(f"{label}: the server exited; see {log.name}")
                time.sleep(0.1)
        url = base + "/v1/completions"
        # Warm-up: loads the adapter and touches the kernels.
        post(url, {"model": "qa-r8", "prompt": "warm up", "max_tokens": 2})
        one, many, computed, prompt_tokens = [], [], [], 0
        for r in range(args.repeats):
            body = {"model": "qa-r8", "max_tokens": args.max_tokens, "temperature": 0.8, "seed": r, "ignore_eos": True}
            t = time.time()
            out = post(url, dict(body, prompt=prompt(f"{label}-one-{r}", args.words), n=1))
            one.append(time.time() - t)
            prompt_tokens = out["usage"]["prompt_tokens"]
            before = metric(get(base + "/metrics"), "loraplex_prefill_tokens_total")
            t = time.time()
            out = post(url, dict(body, prompt=prompt(f"{label}-many-{r}", args.words), n=args.n))
            many.append(time.time() - t)
            assert len(out["choices"]) == args.n
            after = metric(get(base + "/metrics"), "loraplex_prefill_tokens_total")
            if before is not None and after is not None:
                computed.append(after - before)
        return {"label": label, "prompt_tokens": prompt_tokens, "n1_s": statistics.median(one), "n_s": statistics.median(many),
                "computed": statistics.median(computed) if computed else None}
    finally:
        proc.terminate()
        proc.wait()
        log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", action="append", required=True, help="LABEL=PATH of a loraplex binary (repeatable)")
    ap.add_argument("--words", type=int, default=1500, help="prompt length in words (~1.35 tokens each)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shared = os.environ.get("LORAPLEX_SHARED", os.path.join(ROOT, "..", "shared"))
    adapters = tempfile.mkdtemp(prefix="bench-n-")
    shutil.copytree(os.path.join(shared, "adapters", "qa-r8"), os.path.join(adapters, "qa-r8"))
    rows = [run(label, path, args, adapters) for label, path in (b.split("=", 1) for b in args.bin)]
    print(f"| binary | prompt tokens | n=1 s | n={args.n} s | n={args.n} / n=1 | prompt tokens computed for n={args.n} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        computed = "n/a" if r["computed"] is None else f"{r['computed']:.0f} ({r['computed'] / r['prompt_tokens']:.2f}× the prompt)"
        print(f"| {r['label']} | {r['prompt_tokens']} | {r['n1_s']:.2f} | {r['n_s']:.2f} | {r['n_s'] / r['n1_s']:.2f} | {computed} |")
    if len(rows) > 1:
        print(f"\nn={args.n}: {rows[0]['label']} / {rows[-1]['label']} = {rows[0]['n_s'] / rows[-1]['n_s']:.2f}× (median of {args.repeats})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
