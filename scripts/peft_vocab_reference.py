#!/usr/bin/env python3
"""What Python PEFT computes for adapters that touch the vocabulary layers — LoRA on the
embedding (`lora_embedding_A/B`) and on the output head, `modules_to_save` (a trained copy of
the embedding or head) and trainable tokens (`trainable_token_indices`: replaced rows) — alone,
scaled and in mixes: the parity contract of `tests/vocab_lora.rs`.

Writes `tests/data/vocab/`:
  <arch>/adapters/<name>/   PEFT `save_pretrained` folders, seeded random weights
  <arch>/cases.json         per case: the adapters with their scales, greedy ids
  <arch>/logits.safetensors per case: the logits at every prompt position, `[T, vocab]`
  smollm2/...               the default model (from its GGUF, dequantized by transformers) with
                            the last position's logits `[vocab]` and 8 greedy ids per case

Families: `llama` (untied head), `qwen2` (tied head), `gemma3` (tied, embeddings scaled by
sqrt(hidden): PEFT scales the embedding LoRA's output and replaced rows too) — the tiny random
models of `../shared/reference/archs`.

A request's scale `s` multiplies each LoRA layer's scaling (what loraplex's mixes compute);
`modules_to_save` and trainable tokens have no scaling in PEFT and apply as they are.

Pinned: torch 2.15.0 (PyPI), transformers 5.24.0, peft 0.22.0, gguf.

    python3 -m venv /tmp/pt && /tmp/pt/bin/pip install torch==2.15.0 transformers==5.24.0 \
        peft==0.22.0 safetensors gguf
    /tmp/pt/bin/python scripts/peft_vocab_reference.py
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import peft
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = os.path.join(ROOT, "..", "shared", "reference", "archs")
OUT = os.path.join(ROOT, "tests", "data", "vocab")
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

torch.set_num_threads(2)


def randomize(model, name, seed, std):
    """Seeded random values for adapter `name`'s trainable tensors (PEFT zero-initialises B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}" not in pname and not pname.endswith(f".{name}"):
                continue
            if "modules_to_save" in pname:
                p.add_(torch.randn(p.shape, generator=g) * std * 0.5)
            elif "trainable_tokens_delta" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapter_specs(tied, token_ids):
    """(name, LoraConfig kwargs, seed, std, save_embedding_layers)."""
    specs = [
        ("emb-r4", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]), 1, 0.3, True),
        ("emb-b-r2", dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["embed_tokens"]), 2, 0.4, False),
        ("head-r4", dict(r=4, lora_alpha=16, target_modules=["lm_head", "q_proj"]), 3, 0.2, "auto"),
        ("save-head", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), 4, 0.2, "auto"),
        ("save-embed", dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["embed_tokens"]), 5, 0.2, "auto"),
        ("tokens", dict(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=token_ids), 6, 0.2, "auto"),
        ("plain-r4", dict(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"]), 8, 0.2, "auto"),
    ]
    if not tied:
        specs.append(("tokens-head", dict(r=2, lora_alpha=2, target_modules=["o_proj"],
                                          trainable_token_indices={"embed_tokens": token_ids[:2],
                                                                   "lm_head": token_ids[1:]}), 7, 0.2, "auto"))
    return specs


CASES = [
    ("emb", [("emb-r4", 1.0)]),
    ("emb_half", [("emb-r4", 0.5)]),
    ("emb_b_rslora", [("emb-b-r2", 1.0)]),
    ("emb_mix", [("emb-r4", 0.6), ("emb-b-r2", -0.8)]),
    ("head", [("head-r4", 1.0)]),
    ("head_emb_mix", [("head-r4", 0.7), ("emb-r4", 0.5)]),
    ("save_head", [("save-head", 1.0)]),
    ("save_head_half", [("save-head", 0.5)]),
    ("save_head_emb_mix", [("save-head", 1.0), ("emb-r4", 0.5)]),
    ("save_embed", [("save-embed", 1.0)]),
    ("tokens", [("tokens", 1.0)]),
    # PEFT cannot put LoRA on a layer whose rows another adapter replaces (loraplex refuses it
    # too): replacements mix with adapters on other layers.
    ("tokens_plain_mix", [("tokens", 1.0), ("plain-r4", 0.5)]),
    ("tokens_head", [("tokens-head", 1.0)]),
]


def set_scales(model, scales):
    """Each LoRA layer's scaling for adapter `n` times `scales[n]`; returns the originals."""
    saved = []
    for mod in model.modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            for n, s in scales.items():
                if n in mod.scaling:
                    saved.append((mod, n, mod.scaling[n]))
                    mod.scaling[n] = mod.scaling[n] * s
    return saved


def restore(saved):
    for mod, n, v in saved:
        mod.scaling[n] = v


def make_adapters(load_base, out_dir, tied, token_ids):
    os.makedirs(out_dir, exist_ok=True)
    made = {}
    for name, kw, seed, std, save_emb in adapter_specs(tied, token_ids):
        model = get_peft_model(load_base(), LoraConfig(**kw))
        randomize(model, "default", seed, std)
        path = os.path.join(out_dir, name)
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, save_embedding_layers=save_emb)
        if os.path.exists(os.path.join(path, "README.md")):
            os.remove(os.path.join(path, "README.md"))
        made[name] = path
    return made


def run_case(load_base, made, entries, prompt, greedy):
    names = [n for n, _ in entries]
    model = PeftModel.from_pretrained(load_base(), made[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(made[n], adapter_name=n)
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    model.eval()
    saved = set_scales(model, dict(entries))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(input_ids=ids).logits[0].float()
        out = []
        cur = ids
        for _ in range(greedy):
            nxt = model(input_ids=cur).logits[0, -1].argmax().item()
            out.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], dim=1)
    restore(saved)
    return logits, out


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": sys.version.split()[0]}


def tiny(arch):
    mdir = os.path.join(ARCHS, arch, "model")
    ref = json.load(open(os.path.join(ARCHS, arch, "cases.json")))
    prompt = ref["prompts"]["sentence"]["input_ids"][:12]
    tied = ref["base_model"]["config"].get("tie_word_embeddings", False)
    token_ids = [prompt[1], prompt[4], 7, 300]
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    out = os.path.join(OUT, arch)
    made = make_adapters(load, os.path.join(out, "adapters"), tied, token_ids)
    tensors, cases = {}, []
    for case, entries in CASES:
        if any(n not in made for n, _ in entries):
            continue
        logits, greedy = run_case(load, made, entries, prompt, 6)
        tensors[case] = logits.contiguous()
        cases.append({"name": case, "adapters": [{"name": n, "scale": s} for n, s in entries],
                      "greedy_ids": greedy})
    base_logits, _ = run_case_base(load, prompt)
    tensors["base"] = base_logits
    safetensors.torch.save_file(tensors, os.path.join(out, "logits.safetensors"))
    json.dump({"versions": versions(), "arch": arch, "tied": tied, "prompt_ids": prompt,
               "token_ids": token_ids, "cases": cases}, open(os.path.join(out, "cases.json"), "w"),
              indent=1)
    print(arch, "done", len(cases), "cases")


def run_case_base(load, prompt):
    with torch.no_grad():
        return load()(input_ids=torch.tensor([prompt])).logits[0].float(), None


def smollm2():
    if not os.path.exists(GGUF):
        print("skipping the default model: run scripts/fetch-model.sh first")
        return
    d, f = os.path.split(GGUF)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = base.config
    del base

    def load():
        m = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        m.load_state_dict(state, strict=False)
        m.tie_weights()
        return m

    ref = json.load(open(os.path.join(ROOT, "..", "shared", "reference", "cases.json")))
    prompt = next(iter(ref["prompts"].values()))["input_ids"]
    out = os.path.join(OUT, "smollm2")
    specs = {
        "emb-head-r2": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "v_proj"]),
        "emb-b-r2": dict(r=2, lora_alpha=2, target_modules=["embed_tokens"]),
        "tokens": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=prompt[-3:]),
    }
    made = {}
    os.makedirs(os.path.join(out, "adapters"), exist_ok=True)
    for i, (name, kw) in enumerate(specs.items()):
        model = get_peft_model(load(), LoraConfig(**kw))
        randomize(model, "default", 10 + i, 0.05)
        path = os.path.join(out, "adapters", name)
        shutil.rmtree(path, ignore_errors=True)
        # The default model's embedding is 49152 × 576: its copy (save_embedding_layers) would
        # be 113 MB, so this adapter is saved without it, as users with a known base do.
        model.save_pretrained(path, save_embedding_layers=False)
        if os.path.exists(os.path.join(path, "README.md")):
            os.remove(os.path.join(path, "README.md"))
        made[name] = path
    tensors, cases = {}, []
    for case, entries in [("emb_head", [("emb-head-r2", 1.0)]), ("emb_head_half", [("emb-head-r2", 0.5)]),
                          ("tokens", [("tokens", 1.0)]),
                          ("emb_mix", [("emb-head-r2", 0.6), ("emb-b-r2", -0.8)])]:
        logits, greedy = run_case(load, made, entries, prompt, 8)
        tensors[case] = logits[-1].contiguous()
        cases.append({"name": case, "adapters": [{"name": n, "scale": s} for n, s in entries],
                      "greedy_ids": greedy})
    safetensors.torch.save_file(tensors, os.path.join(out, "logits.safetensors"))
    json.dump({"versions": versions(), "arch": "smollm2", "tied": True, "prompt_ids": prompt,
               "cases": cases}, open(os.path.join(out, "cases.json"), "w"), indent=1)
    print("smollm2 done")


if __name__ == "__main__":
    only = sys.argv[1:]
    for arch in [a for a in ["llama", "qwen2", "gemma3"] if not only or a in only]:
        tiny(arch)
    if not only or "smollm2" in only:
        smollm2()
