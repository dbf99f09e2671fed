#!/usr/bin/env python3
"""PEFT's `add_weighted_adapter` on the tiny random Llama of ../shared/reference/archs: the
reference loraplex's adapter algebra (`src/adapters/algebra.rs`) is checked against
(`tests/adapter_algebra.rs`).

Writes `tests/data/merges/`:
  inputs/all-r8-b/      a second rank-8 adapter (same config as `all-r8`, seeded random A and B),
                        so that the factor-wise combinations (linear, ties, ...) have two
                        adapters of one rank to combine
  <case>/               PEFT's `save_pretrained` of each merged adapter
  cases.json            the cases (inputs, weights, combination type, knobs) and the versions

The DARE cases draw their masks with torch's generator: loraplex cannot reproduce those draws, so
the test compares them in distribution (see the test). Every other case is deterministic.

Pinned: torch 2.15.0 (PyPI, CPU), transformers 4.57.1, peft 0.22.0 (the first release with the
fixes to DARE's rescaling, signed weights, svd's single scaling and rslora in merges).

    python3 -m venv /tmp/pt && /tmp/pt/bin/pip install torch==2.15.0 transformers==4.57.1 \
        peft==0.22.0 safetensors
    /tmp/pt/bin/python scripts/peft_merge_reference.py
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import shutil
import sys

import peft
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = os.path.join(ROOT, "..", "shared", "reference", "archs", "llama")
OUT = os.path.join(ROOT, "tests", "data", "merges")

# (case name, [(adapter, weight)], combination_type, knobs)
CASES = [
    ("linear", [("all-r8", 0.7), ("all-r8-b", 0.5)], "linear", {}),
    ("linear_negative", [("all-r8", 1.0), ("all-r8-b", -0.6)], "linear", {}),
    ("cat", [("all-r8", 0.7), ("attn-r4", -0.4)], "cat", {}),
    ("svd", [("all-r8", 0.7), ("attn-r4", 0.5)], "svd", {"svd_rank": 6}),
    ("svd_default_rank", [("all-r8", 1.0), ("attn-r4", -0.5)], "svd", {}),
    ("svd_clamp", [("all-r8", 0.7), ("attn-r4", 0.5)], "svd", {"svd_rank": 4, "svd_clamp": 0.95}),
    ("single_svd_is_linear", [("attn-r4", 0.8)], "svd", {}),
    ("ties", [("all-r8", 0.7), ("all-r8-b", 0.5)], "ties", {"density": 0.5}),
    ("ties_frequency", [("all-r8", 0.7), ("all-r8-b", -0.5)], "ties",
     {"density": 0.4, "majority_sign_method": "frequency"}),
    ("ties_svd", [("all-r8", 0.7), ("attn-r4", 0.5)], "ties_svd", {"density": 0.6, "svd_rank": 8}),
    ("magnitude_prune", [("all-r8", 0.7), ("all-r8-b", 0.5)], "magnitude_prune", {"density": 0.3}),
    ("magnitude_prune_svd", [("all-r8", 0.7), ("attn-r4", 0.5)], "magnitude_prune_svd",
     {"density": 0.3, "svd_rank": 5}),
    ("dare_linear", [("all-r8", 0.7), ("all-r8-b", 0.5)], "dare_linear", {"density": 0.5}),
    ("dare_ties", [("all-r8", 0.7), ("all-r8-b", 0.5)], "dare_ties", {"density": 0.5}),
    ("dare_linear_svd", [("all-r8", 0.7), ("attn-r4", 0.5)], "dare_linear_svd",
     {"density": 0.5, "svd_rank": 8}),
    ("dare_ties_svd", [("all-r8", 0.7), ("attn-r4", 0.5)], "dare_ties_svd",
     {"density": 0.5, "svd_rank": 8}),
    # `svd_clamp` without the clamp: the clamp's quantile depends on the signs torch's LAPACK
    # gives the singular vectors, so the test applies loraplex's clamp to these factors.
    ("svd_rank4", [("all-r8", 0.7), ("attn-r4", 0.5)], "svd", {"svd_rank": 4}),
]


def base():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(ARCH, "model"), torch_dtype=torch.float32
    )
    return model.eval()


def write_second_adapter(path):
    """`all-r8`'s config with fresh seeded weights (B non-zero so the adapter does something)."""
    cfg = json.load(open(os.path.join(ARCH, "adapters", "all-r8", "adapter_config.json")))
    config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        target_modules=cfg["target_modules"],
        rank_pattern=cfg["rank_pattern"],
        alpha_pattern=cfg["alpha_pattern"],
        use_rslora=cfg["use_rslora"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(20261207)
    model = get_peft_model(base(), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(path)
    # Name the base as the shared adapters do (the folder was loaded from a local path).
    cfg_path = os.path.join(path, "adapter_config.json")
    saved = json.load(open(cfg_path))
    saved["base_model_name_or_path"] = cfg["base_model_name_or_path"]
    with open(cfg_path, "w") as f:
        json.dump(saved, f, indent=2)


def main():
    if peft.__version__ != "0.22.0":
        sys.exit(f"peft {peft.__version__}: the reference is pinned to peft 0.22.0")
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "inputs"))
    second = os.path.join(OUT, "inputs", "all-r8-b")
    write_second_adapter(second)
    dirs = {
        "all-r8": os.path.join(ARCH, "adapters", "all-r8"),
        "attn-r4": os.path.join(ARCH, "adapters", "attn-r4"),
        "all-r8-b": second,
    }
    model = PeftModel.from_pretrained(base(), dirs["all-r8"], adapter_name="all-r8")
    for name in ("attn-r4", "all-r8-b"):
        model.load_adapter(dirs[name], adapter_name=name)
    cases = []
    for i, (case, sources, combination, knobs) in enumerate(CASES):
        torch.manual_seed(1000 + i)
        model.add_weighted_adapter(
            adapters=[a for a, _ in sources],
            weights=[w for _, w in sources],
            adapter_name=case,
            combination_type=combination,
            **knobs,
        )
        tmp = os.path.join(OUT, ".tmp")
        model.save_pretrained(tmp, selected_adapters=[case])
        shutil.move(os.path.join(tmp, case), os.path.join(OUT, case))
        shutil.rmtree(tmp)
        # PEFT's model card carries no information about the merge; keep the folder small.
        card = os.path.join(OUT, case, "README.md")
        if os.path.exists(card):
            os.remove(card)
        cases.append(
            {
                "name": case,
                "adapters": [{"name": a, "weight": w} for a, w in sources],
                "combination_type": combination,
                **knobs,
                "random": combination.startswith("dare"),
            }
        )
    readme = os.path.join(second, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    meta = {
        "base": "../shared/reference/archs/llama/model",
        "inputs": {
            "all-r8": "../shared/reference/archs/llama/adapters/all-r8",
            "attn-r4": "../shared/reference/archs/llama/adapters/attn-r4",
            "all-r8-b": "tests/data/merges/inputs/all-r8-b",
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
        },
        "cases": cases,
    }
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
