#!/usr/bin/env python3
"""The GPU half of scripts/gpu-check.sh: on a machine with one NVIDIA GPU and torch,
transformers and peft (no network), with a loraplex CUDA binary built elsewhere
(scripts/build-cuda.sh) and the tokenizer folder beside it.

1. Makes random-weight Llama models in Hugging Face format on the GPU (bf16): a ~1B-shaped one
   for parity and an 8B-shaped one for speed, with PEFT adapters for each.
2. Parity on the 1B: greedy tokens and first-position log-probabilities of
   `loraplex generate --device cuda` against PEFT on the same GPU, for the base, one adapter
   and a 3-adapter mix (PEFT: add_weighted_adapter with combination "cat", which is the exact
   sum of the scaled deltas).
3. Speed on the 8B: `loraplex serve --device cuda` driven by `loraplex bench` (batch-1 decode,
   then 1, 32 and 128 distinct rank-16 adapters), beside PEFT's own `generate` throughput.

Prints everything as markdown on stdout. Usage: gpu_check.py BIN TOKENIZER_DIR WORK_DIR
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

BIN, TOKENIZER, WORK = sys.argv[1:4]
DEV = "cuda"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
PROMPTS = ["The history of the city begins with", "Question: what is the boiling point of water?\nAnswer:",
           "def fibonacci(n):\n    "]
NEW_TOKENS = 32


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def make_model(name):
    out = os.path.join(WORK, f"llama-{name}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="bfloat16", **SHAPES[name])
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log(f"made {name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    del model
    torch.cuda.empty_cache()
    return out


def make_adapters(model_dir, prefix, count, targets, seed):
    """`count` rank-16 adapters with random A and B (B scaled down so that outputs stay
    near the base's, as trained adapters do)."""
    root = os.path.join(WORK, f"adapters-{os.path.basename(model_dir)}-{prefix}")
    if os.path.exists(os.path.join(root, f"{prefix}{count - 1}", "adapter_config.json")):
        return root
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(DEV)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    peft = get_peft_model(base, cfg)
    for i in range(count):
        torch.manual_seed(seed + i)
        for n, p in peft.named_parameters():
            if "lora_A" in n:
                torch.nn.init.normal_(p, std=1.0 / p.shape[1] ** 0.5)
            elif "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02 / 16 ** 0.5)
        peft.save_pretrained(os.path.join(root, f"{prefix}{i}"))
    del peft, base
    torch.cuda.empty_cache()
    return root


def loraplex_generate(model_dir, prompt, adapters):
    args = [BIN, "generate", "--model", model_dir, "--device", "cuda", "--json", "--max-tokens", str(NEW_TOKENS),
            "--ignore-eos", "--logprobs", "20", "--prompt", prompt]
    for path, scale in adapters:
        args += ["--adapter", f"{path}:{scale}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def parity(model_dir, adapter_root):
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(DEV).eval()
    names = ["p0", "p1", "p2"]
    peft = PeftModel.from_pretrained(base, os.path.join(adapter_root, names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(os.path.join(adapter_root, n), adapter_name=n)
    scales = [0.5, 0.3, 0.2]
    peft.add_weighted_adapter(names, scales, adapter_name="mix", combination_type="cat")
    cases = {"base": ([], None), "one adapter": ([(os.path.join(adapter_root, "p0"), 1.0)], "p0"),
             "3-adapter mix": ([(os.path.join(adapter_root, n), s) for n, s in zip(names, scales)], "mix")}
    rows = ["| case | greedy tokens equal (of all) | first-position max abs diff of top-20 logprobs |", "|---|---|---|"]
    total_equal = total = 0
    for label, (ours_adapters, peft_adapter) in cases.items():
        equal = count = 0
        worst = 0.0
        for prompt in PROMPTS:
            ours = loraplex_generate(model_dir, prompt, ours_adapters)
            ids = torch.tensor([ours["prompt_ids"]], device=DEV)
            with torch.no_grad():
                if peft_adapter is None:
                    with peft.disable_adapter():
                        gen = peft.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
                        first = peft(ids).logits[0, -1].float()
                else:
                    peft.set_adapter(peft_adapter)
                    gen = peft.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
                    first = peft(ids).logits[0, -1].float()
            theirs = gen[0, ids.shape[1]:].tolist()
            # Tokens agree up to the first divergence; after it the continuations differ.
            k = next((i for i, (a, b) in enumerate(zip(ours["ids"], theirs)) if a != b), min(len(theirs), len(ours["ids"])))
            equal += k
            count += len(theirs)
            lp = torch.log_softmax(first, -1)
            worst = max(worst, max(abs(lp[t].item() - v) for t, v in ours["top_logprobs"][0]))
        rows.append(f"| {label} | {equal}/{count} ({100 * equal / count:.1f} %) | {worst:.3f} |")
        total_equal += equal
        total += count
    del peft, base
    torch.cuda.empty_cache()
    return rows, total_equal / total


def serve_bench(model_dir, adapter_root):
    port = 18600
    env = dict(os.environ, LORAPLEX_LOG="warn")
    server = subprocess.Popen([BIN, "serve", "--model", model_dir, "--device", "cuda", "--adapters", adapter_root, "--port", str(port),
                               "--max-batch-size", "128",
                               # 128 rank-16 q/v adapters of the 8B are ~7 GB in f32; the default 1 GiB would thrash the LRU.
                               "--adapter-budget-bytes", str(16 << 30), "--kv-cache-bytes", "16GiB"], env=env)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2)
                break
            except Exception:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("loraplex serve did not become ready")
                time.sleep(1)
        rows = []
        runs = [("batch-1 decode, base", 1, 0), ("128 clients, base only", 128, 0), ("128 clients, 1 adapter", 128, 1),
                ("128 clients, 32 distinct adapters", 128, 32), ("128 clients, 128 distinct adapters", 128, 128)]
        bench = lambda c, n, secs, label: subprocess.run(
            [BIN, "bench", "--url", f"http://127.0.0.1:{port}", "--concurrency", str(c), "--adapter-count", str(n),
             "--adapter-prefix", "s", "--duration-secs", str(secs), "--max-tokens", "64", "--prompt-tokens", "128", "--label", label],
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        bench(32, 128, 5, "warm-up")
        for label, c, n in runs:
            rows.append(bench(c, n, 15, label))
        return rows
    finally:
        server.terminate()
        server.wait(timeout=60)


def peft_throughput(model_dir, adapter_root):
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(DEV).eval()
    peft = PeftModel.from_pretrained(base, os.path.join(adapter_root, "s0")).eval()
    rows = []
    for batch in (1, 32):
        ids = torch.randint(100, len(tok) - 100, (batch, 128), device=DEV)
        with torch.no_grad():
            peft.generate(ids, max_new_tokens=8, do_sample=False)
            torch.cuda.synchronize()
            t = time.time()
            peft.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            torch.cuda.synchronize()
        rows.append(f"| PEFT generate, 1 adapter, batch {batch} | {batch * 64 / (time.time() - t):.1f} output tok/s |")
    return rows


def main():
    card = torch.cuda.get_device_name(0)
    started = time.time()
    small = make_model("1b")
    parity_adapters = make_adapters(small, "p", 3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 100)
    rows, agreement = parity(small, parity_adapters)
    print(f"## GPU check on {card}\n\n### Parity, 1B-shaped random Llama, bf16, {NEW_TOKENS} greedy tokens x {len(PROMPTS)} prompts\n")
    print("\n".join(rows))
    print(f"\ngreedy agreement overall: {100 * agreement:.1f} % (target >= 95 %)\n")
    big = make_model("8b")
    serve_adapters = make_adapters(big, "s", 128, ["q_proj", "v_proj"], 1000)
    weight_bytes = sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big) if f.endswith(".safetensors"))
    print(f"### Serving, 8B-shaped random Llama, bf16 ({weight_bytes / 1e9:.2f} GB of weights), rank-16 q/v adapters\n")
    print("| run | clients | adapters (pool/per req) | req/s | output tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | errors | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(serve_bench(big, serve_adapters)))
    print("\n| PEFT on the same card | throughput |\n|---|---|")
    print("\n".join(peft_throughput(big, serve_adapters)))
    print(f"\nbatch-1 bandwidth limit: {weight_bytes / 1e9:.2f} GB per token; divide the card's memory bandwidth by it "
          f"(H200: 4.8 TB/s -> {4.8e12 / weight_bytes:.0f} tok/s) and compare the batch-1 row.")
    print(f"\n(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
