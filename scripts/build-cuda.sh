#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU (or checks that it compiles).
#
#   scripts/build-cuda.sh            release build; prints the stripped binary's path last
#   scripts/build-cuda.sh --check    `cargo check --features cuda` only (what CI runs)
#
# NVIDIA's compiler and headers come from PyPI into the git-ignored .cuda/: CUDA 13.0
# (nvidia-cuda-nvcc, -crt, -runtime, -cccl and nvidia-nvvm; CUDA 12's PyPI wheels
# carry no nvcc).
# Kernels are compiled for CUDA_COMPUTE_CAP (default 90, Hopper: H100/H200; 80 for A100, 89 for
# L4/L40, 100 for B200). It builds in the same target folder as the CPU build, so every
# dependency the `cuda` feature leaves unchanged is compiled once for both; the CUDA binary is
# copied to target/cuda/dist and the CPU release binary put back in target/release (a no-op
# build when it is up to date). The binary is linked against stubs of libcuda, cuBLAS, cuBLASLt, cuRAND and NVRTC (scripts/cuda_stubs.py)
# and loads the real ones (CUDA 13 sonames) from the GPU machine; it needs a driver for CUDA 13
# (R580 or later). libcudart.so.13 is copied beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-build}"
root="$PWD/.cuda"
# The caller's environment, for the CPU build at the end.
if [ -n "${LIBRARY_PATH:-}" ]; then cpu_env=(env "PATH=$PATH" "LIBRARY_PATH=$LIBRARY_PATH"); else cpu_env=(env -u LIBRARY_PATH "PATH=$PATH"); fi
cuda="$root/nvidia/cu13"
pins=("nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-nvvm==13.0.88")
if [ ! -x "$cuda/bin/nvcc" ] || [ "$(cat "$root/pins" 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf "$root" && mkdir -p "$root/whl"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$root/whl" "${pins[@]}"
  python3 - "$root" <<'PY'
import glob, os, sys, zipfile
root = sys.argv[1]
for whl in glob.glob(os.path.join(root, "whl", "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.filename.startswith("nvidia/"):
                path = z.extract(info, root)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(path, mode)
PY
  rm -rf "$root/whl"
  echo "${pins[*]}" >"$root/pins"
fi
ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda" CUDA_TOOLKIT_ROOT_DIR="$cuda" PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -1 >&2
if [ "$mode" = --check ]; then
  cargo check --locked --features cuda
  echo "cargo check --features cuda: ok (compute capability $CUDA_COMPUTE_CAP)"
  exit 0
fi
# Link-time stubs for libcuda, cuBLAS(Lt), cuRAND and NVRTC (see scripts/cuda_stubs.py): the
# binary names their sonames and finds the real ones on the GPU machine.
cudarc="$(cargo metadata --locked --format-version 1 --features cuda | python3 -c '
import json, os, sys
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
python3 scripts/cuda_stubs.py "$cudarc/src" "$root/stubs" 13
export LIBRARY_PATH="$root/stubs:$LIBRARY_PATH"
cargo build --release --locked --features cuda
out=target/cuda/dist
mkdir -p "$out"
strip -o "$out/loraplex" target/release/loraplex
# The CPU binary back in target/release (the end-to-end tests drive it), in the caller's
# environment.
"${cpu_env[@]}" cargo build --release --locked
cp "$cuda/lib/libcudart.so.13" "$out/"
rm -rf "$out/stubs" && cp -P -r "$root/stubs" "$out/stubs"
# This machine has no driver: the stubs let the binary start (they are never on the GPU
# machine's library path). The default model's tokenizer as a Hugging Face folder, for
# scripts/gpu-check.sh's models:
scripts/fetch-model.sh >/dev/null
nogpu=(env LD_LIBRARY_PATH="$out:$out/stubs" "$out/loraplex")
"${nogpu[@]}" export-tokenizer --out "$out/tokenizer" >/dev/null
# Without a usable driver or GPU, --device cuda is one error naming CUDA, exit status 1.
set +e
err="$("${nogpu[@]}" serve --device cuda --port 0 2>&1 >/dev/null)"
rc=$?
set -e
if [ "$rc" -ne 1 ] || ! grep -q "CUDA device 0 is unavailable" <<<"$err" || grep -qi panick <<<"$err"; then
  echo "serve --device cuda without a GPU: expected exit 1 and a CUDA error, got $rc: $err" >&2
  exit 1
fi
echo "serve --device cuda without a GPU: exit 1, $(grep -m1 CUDA <<<"$err")" >&2
cp scripts/gpu-check.sh scripts/gpu_check.py "$out/"
echo "$PWD/$out/loraplex"
