"""Every family's trained adapter in Python PEFT (run by hand; CI does not install PyTorch).

For each tiny random model of ../shared/reference/archs (Llama 3, Qwen2, Qwen3, Phi-3,
Gemma 3, BLOOM): `loraplex train` fine-tunes a LoRA adapter on a small prompt/completion file
(fused targets where the family has them: Phi-3's `qkv_proj` and `gate_up_proj`, BLOOM's
`query_key_value`), then transformers + PEFT load that adapter folder and generate greedily
from the same prompt ids; the 16 tokens must equal `loraplex generate`'s with the adapter,
and differ from the base model's (so the adapter changed something). Each family runs twice:
plain LoRA, and DoRA (`--use-dora`, PEFT's `use_dora`: magnitudes trained beside A and B).

    python3 -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers peft safetensors
    (checked with torch 2.5.1, transformers 4.53.3, peft 0.16.0: the RoPE settings of the
    tiny models' 5.x configs are translated for transformers 4)
    cargo build --release
    /tmp/pt/bin/python scripts/peft_family_check.py [WORKDIR]

Prints one line per family and exits non-zero when any differs.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import shutil

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

root = Path(__file__).resolve().parent.parent
archs = root.parent / "shared" / "reference" / "archs"
binary = root / "target" / "release" / "loraplex"
work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
targets = {
    "llama": "q_proj,v_proj,up_proj,down_proj",
    "qwen2": "q_proj,v_proj,up_proj,down_proj",
    "qwen3": "q_proj,v_proj,up_proj,down_proj",
    "gemma3": "q_proj,v_proj,up_proj,down_proj",
    "phi3": "qkv_proj,o_proj,gate_up_proj,down_proj",
    "bloom": "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
}
data = work / "pairs.jsonl"
data.write_text(
    "".join(
        json.dumps({"prompt": f"Item {i}: the colour is", "completion": f" {c} and the number is {i * 7}."}) + "\n"
        for i, c in enumerate(["red", "blue", "green", "gold", "grey", "pink"])
    )
)
PROMPT = "Item 3: the colour is"


def for_transformers(model_dir):
    """The model folder as this transformers reads it: before 5.0, RoPE settings are
    `rope_theta` and `rope_scaling`, not 5.x's `rope_parameters` (the tiny models' configs were
    written by 5.x), so they are translated into a copy."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return model_dir
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is None:
        return model_dir
    copy = work / f"{model_dir.parent.name}-transformers4"
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    if "full_attention" in rope:  # Gemma 3: global and local bases
        cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    else:
        cfg["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def generate(model_dir, adapter=None):
    cmd = [str(binary), "generate", "--model", str(model_dir), "--dtype", "f32", "--json",
           "--max-tokens", "16", "--ignore-eos", "--prompt", PROMPT]
    if adapter:
        cmd += ["--adapter", f"{adapter}:1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


failed = 0
for (arch, mods), dora in [(t, d) for d in (False, True) for t in targets.items()]:
    model_dir = archs / arch / "model"
    adapter = work / f"{arch}-{'dora' if dora else 'lora'}-trained"
    subprocess.run(
        [str(binary), "train", "--model", str(model_dir), "--data", str(data), "--output", str(adapter),
         "--rank", "4", "--alpha", "8", "--dropout", "0", "--target-modules", mods, "--steps", "30",
         "--batch-size", "6", "--lr", "2e-2", "--warmup-steps", "2", "--checkpoint-every", "0", "--quiet"]
        + (["--use-dora"] if dora else []),
        check=True, capture_output=True,
    )
    ours = generate(model_dir, adapter)
    base = generate(model_dir)
    prompt_ids = ours["prompt_ids"]
    m = AutoModelForCausalLM.from_pretrained(for_transformers(model_dir), torch_dtype=torch.float32)
    m = PeftModel.from_pretrained(m, adapter).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        for _ in range(16):
            nxt = m(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    theirs = ids[0, len(prompt_ids):].tolist()
    same, changed = theirs == ours["ids"], ours["ids"] != base["ids"]
    failed += not (same and changed)
    kind = "DoRA" if dora else "LoRA"
    print(f"{arch:7} {kind} targets {mods:40} PEFT = loraplex: {same}  adapter changes the base's tokens: {changed}")
    if not same:
        print("   loraplex", ours["ids"], "\n   PEFT    ", theirs)
sys.exit(1 if failed else 0)
