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
# The binary is linked against libcuda.so.1, libcublas.so.13 and libcurand.so.10: the system's,
# or the ones torch's pip wheels carry (site-packages/nvidia/*/lib, torch/lib).
pylibs="$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))) + glob.glob(os.path.join(sp, "torch", "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)"
export LD_LIBRARY_PATH="$dist${pylibs:+:$pylibs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
# The real libraries must resolve (never DIST_DIR/stubs, the link-time stand-ins).
missing="$(ldd "$dist/loraplex" | grep "not found" || true)"
if [ -n "$missing" ]; then
  echo "loraplex needs CUDA 13 libraries this machine's library path lacks (torch's cu13 wheels or a CUDA 13 install carry them):" >&2
  echo "$missing" >&2
  exit 1
fi
# The kernels are PTX from CUDA 13.0: the driver must run CUDA 13 (R580 or later).
driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1 || true)"
if [ -n "$driver_cuda" ] && [ "$driver_cuda" -lt 13 ]; then
  echo "warning: the driver supports CUDA $driver_cuda; loraplex's kernels need CUDA 13 (driver R580+)" >&2
fi
timeout 480 python3 "$here/gpu_check.py" "$dist/loraplex" "$dist/tokenizer" "$work" | tee "$work/report.md"
