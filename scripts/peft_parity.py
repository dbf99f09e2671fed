"""PEFT side of the train → PEFT round trip (run by hand; CI does not install PyTorch).

Loads the default GGUF with transformers (dequantized to float32, as ../shared/reference was
made), applies a loraplex-trained adapter with PEFT, and compares the log-probabilities of the
first generated position with what `loraplex generate --json` reports for the same prompt.

    pip install torch transformers peft gguf safetensors
    target/release/loraplex generate --dtype f32 --json --logprobs 20 --max-tokens 1 \
        --adapter adapters/squad-r16:1 --prompt "$(cat prompt.txt)" > loraplex.json
    python3 scripts/peft_parity.py adapters/squad-r16 prompt.txt loraplex.json

Exit status 0 when the top-20 log-probabilities agree within 1e-3 and the greedy token matches.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter_dir, prompt_file, loraplex_json = sys.argv[1:4]
gguf_dir, gguf_file = "models", "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
prompt = open(prompt_file).read()
ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
ours = json.load(open(loraplex_json))
assert ids[0].tolist() == ours["prompt_ids"], "tokenization differs"
with torch.no_grad():
    logits = model(ids).logits[0, -1].float()
logprobs = torch.log_softmax(logits, -1)
worst = 0.0
for token_id, lp in ours["top_logprobs"][0]:
    worst = max(worst, abs(logprobs[token_id].item() - lp))
greedy = int(logits.argmax())
print(f"max |Δ logprob| over loraplex's top-20: {worst:.2e}; greedy PEFT {greedy} vs loraplex {ours['ids'][0]}")
sys.exit(0 if worst <= 1e-3 and greedy == ours["ids"][0] else 1)
