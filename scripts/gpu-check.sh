#!/usr/bin/env bash
# The prepared GPU run (at most 8 minutes): parity with PEFT and serving speed on one NVIDIA GPU.
# On the GPU machine, which needs Python with torch, transformers and peft, and no network:
#
#   scripts/gpu-check.sh DIST_DIR [WORK_DIR]
#
# DIST_DIR is what scripts/build-cuda.sh made on a CPU machine (target/cuda/dist: the stripped
# binary, libcudart.so.13 and the tokenizer folder); copy it and scripts/gpu_check.py over.
# Models and adapters are generated on the spot into WORK_DIR (default /tmp/loraplex-gpu).
# The report (markdown, with the card's name) goes to stdout and WORK_DIR/report.md.
set -euo pipefail
dist="$(cd "${1:?usage: scripts/gpu-check.sh DIST_DIR [WORK_DIR]}" && pwd)"
work="${2:-/tmp/loraplex-gpu}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$work"
export LD_LIBRARY_PATH="$dist${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
timeout 480 python3 "$here/gpu_check.py" "$dist/loraplex" "$dist/tokenizer" "$work" | tee "$work/report.md"
