#!/usr/bin/env python3
"""Training throughput of Python PEFT on the recipe of issue 31, the side-by-side for
`cargo run --release --example train_throughput`: SmolLM2-135M-Instruct (the default GGUF,
dequantized to f32 by transformers), LoRA r 16 / alpha 32 on q/k/v/o, 4 sequences x 256 tokens,
the loss on the last 8 tokens of each (like short answers; the rest labelled -100), AdamW
lr 2e-4, gradient clipping at 1.0, 2 threads. Prints tokens/s (4 x 256 per step) per step and
the median after one warm-up step.

    python3 -m venv /tmp/pt && /tmp/pt/bin/pip install torch==2.9.1 peft==0.17.1 \
        transformers==4.57.1 gguf==0.19.0 accelerate==1.16.0 safetensors==0.8.0
    /tmp/pt/bin/python scripts/bench-peft-train.py [STEPS] [--logits-to-keep]

`--logits-to-keep` computes the LM head only on the positions the loss reads (what loraplex's
trainer does); without it, transformers computes logits at every position, as a plain PEFT
training loop does.
"""
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

THREADS = 2
BATCH, SEQ, LOSS_TOKENS = 4, 256, 8


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 6
    keep = "--logits-to-keep" in sys.argv
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    models = Path(__file__).resolve().parent.parent / "models"
    model = AutoModelForCausalLM.from_pretrained(
        str(models), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32
    )
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    # The same token pattern as the Rust side: 255 prompt tokens, then 8 answer tokens.
    ids = torch.tensor([[100 + (t * 13 + i * 7) % 4000 for t in range(SEQ - LOSS_TOKENS)]
                        + [200 + t + i for t in range(LOSS_TOKENS)] for i in range(BATCH)])
    labels = torch.full_like(ids, -100)
    labels[:, -LOSS_TOKENS:] = ids[:, -LOSS_TOKENS:]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for step in range(steps + 1):
        t = time.perf_counter()
        if keep:
            out = model(input_ids=ids, logits_to_keep=LOSS_TOKENS + 1)
            logits = out.logits[:, :-1, :]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, -LOSS_TOKENS:].reshape(-1))
        else:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        print(f"step {step}: {dt:.2f} s, {BATCH * SEQ / dt:.1f} tok/s, loss {loss.item():.3f}", flush=True)
        if step > 0:
            times.append(dt)
    med = statistics.median(times)
    print(f"PEFT {'logits-to-keep' if keep else 'full logits'}: median {med:.2f} s per step = "
          f"{BATCH * SEQ / med:.1f} tok/s (torch {torch.__version__}, "
          f"peft {__import__('peft').__version__}, {THREADS} threads)")


if __name__ == "__main__":
    main()
