#!/usr/bin/env python3
"""A small GRPO-style loop against one loraplex server: sample a group of completions per
prompt, reward a verifiable property of each (here: the answer names the colour "blue"),
turn the rewards into group-normalised advantages, take a policy-gradient step with
`importance_sampling` (the sampler's own log-probabilities given), save the weights as a new
version of an adapter and sample the next round from that version — all in the serving
process, on its own frozen base model, with no weight sync.

    target/release/loraplex serve --adapters /tmp/grpo-adapters --state-dir /tmp/grpo-state
    python3 examples/grpo_loop.py --steps 30            # in-process: save, then sample name@N
    python3 examples/grpo_loop.py --steps 30 --mode reload   # the vLLM pattern, for comparison

`--mode reload` does what a trainer beside a vLLM server does: it takes the weights out of the
trainer (here: `save` to a staging name, then download its two files), writes them into the
adapters folder as a trainer on a shared disk would, and asks the server to reload the policy
adapter in place (vLLM's `/v1/load_lora_adapter` with `load_inplace`) before sampling from it.

Needs only `requests`. Prints per step: the mean reward, the version that served the samples,
and the wall time spent sampling, training and publishing the new version.
"""
import argparse
import json
import os
import statistics
import sys
import time

import requests

PROMPTS = [
    "Q: What is your favorite color?\nA:",
    "Q: Which color do you like the most?\nA:",
]


def reward(text: str) -> float:
    return 1.0 if "blue" in text.lower() else 0.0


def post(url, body):
    r = requests.post(url, json=body, timeout=600)
    if r.status_code != 200:
        sys.exit(f"{url}: {r.status_code} {r.text}")
    return r.json()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["inprocess", "reload"], default="inprocess")
    ap.add_argument("--adapter", default="grpo-policy")
    ap.add_argument("--adapters-dir", help="the server's adapters folder (for --mode reload)")
    ap.add_argument("--target", type=float, default=0.8, help="stop once the mean reward reaches this")
    ap.add_argument("--log", help="write the per-step records here (JSON lines)")
    args = ap.parse_args()
    u = args.url.rstrip("/")
    if args.mode == "reload" and not args.adapters_dir:
        sys.exit("--mode reload needs --adapters-dir (the folder the server serves)")

    client = post(f"{u}/v1/training/clients",
                  {"rank": args.rank, "seed": args.seed,
                   "adapter": args.adapter if args.mode == "inprocess" else args.adapter + "-staging"})
    cid = client["id"]
    publish = (lambda: post(f"{u}/v1/training/clients/{cid}/save", {})) if args.mode == "inprocess" \
        else (lambda: reload_pattern(u, cid, args))
    version = publish()["version"]  # version 1: the starting weights (B = 0: the base model)
    log = open(args.log, "w") if args.log else None
    started = time.time()
    for step in range(args.steps):
        t0 = time.time()
        data, rewards, served = [], [], set()
        for i, prompt in enumerate(PROMPTS):
            s = post(f"{u}/v1/training/clients/{cid}/sample",
                     {"prompt": prompt, "n": args.group, "max_tokens": args.max_tokens,
                      "temperature": 1.0, "seed": args.seed * 100_003 + step * 101 + i,
                      "adapter": f"{args.adapter}@{version}"})
            served.add(s["adapter"]["version"])
            p = s["prompt_tokens"]
            r = [reward(x["text"]) for x in s["samples"]]
            rewards += r
            mean, std = statistics.fmean(r), statistics.pstdev(r)
            for x, ri in zip(s["samples"], r):
                adv = 0.0 if std == 0 else (ri - mean) / (std + 1e-4)
                toks = p + x["tokens"]
                n_p = len(p)
                data.append({
                    "tokens": toks,
                    "advantages": [0.0] * n_p + [adv] * len(x["tokens"]),
                    "logprobs": [0.0] * n_p + x["logprobs"],
                })
        t1 = time.time()
        if any(any(a != 0 for a in d["advantages"]) for d in data):
            post(f"{u}/v1/training/clients/{cid}/forward_backward",
                 {"loss": "importance_sampling", "data": data})
            post(f"{u}/v1/training/clients/{cid}/optim_step",
                 {"learning_rate": args.lr, "max_grad_norm": 1.0})
        t2 = time.time()
        version = publish()["version"]
        t3 = time.time()
        mean_reward = statistics.fmean(rewards)
        rec = {"step": step, "mean_reward": mean_reward, "served_version": sorted(served),
               "next_version": version, "sample_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3),
               "publish_s": round(t3 - t2, 3), "elapsed_s": round(t3 - started, 1)}
        print(json.dumps(rec), flush=True)
        if log:
            log.write(json.dumps(rec) + "\n")
        if mean_reward >= args.target:
            break


def reload_pattern(u, cid, args):
    """The vLLM pattern: weights out of the trainer, onto the shared disk, reloaded in place."""
    staged = post(f"{u}/v1/training/clients/{cid}/save", {})
    dest = os.path.join(args.adapters_dir, args.adapter)
    os.makedirs(dest, exist_ok=True)
    for f in ["adapter_config.json", "adapter_model.safetensors"]:
        r = requests.get(f"{u}/v1/adapters/{staged['model']}/files/{f}", timeout=600)
        r.raise_for_status()
        tmp = os.path.join(dest, f + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(r.content)
        os.replace(tmp, os.path.join(dest, f))
    r = requests.post(f"{u}/v1/load_lora_adapter",
                      json={"lora_name": args.adapter, "lora_path": args.adapter, "load_inplace": True},
                      timeout=600)
    if r.status_code != 200:
        sys.exit(f"reload: {r.status_code} {r.text}")
    info = requests.get(f"{u}/v1/adapters/{args.adapter}", timeout=60).json()
    return {"version": info["version"]}


if __name__ == "__main__":
    main()
