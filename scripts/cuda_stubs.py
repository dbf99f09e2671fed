#!/usr/bin/env python3
"""Link-time stubs of the CUDA libraries the CUDA build links against, for a machine without them.

candle-core turns on cudarc's `dynamic-linking`, so the binary names libcuda, cuBLAS, cuBLASLt,
cuRAND and NVRTC as needed libraries, and the linker wants them. The driver's libcuda only
exists where a GPU driver is installed, and the others are wheels of hundreds of megabytes that
the binary never carries (it uses the GPU machine's own, by soname). So, as NVIDIA's toolkit
does with its `lib/stubs/libcuda.so`, this writes one stub shared library per library: every
function cudarc declares for it (read from cudarc's own bindings), under the real library's
soname. At run time the dynamic loader resolves those sonames to the GPU machine's real
libraries. On a machine with no driver, putting the stubs on LD_LIBRARY_PATH lets the binary
start (CPU work, `export-tokenizer`, and `--device cuda` failing cleanly): like NVIDIA's stub,
every function returns an error code (CUDA_ERROR_STUB_LIBRARY from the driver's), so `cuInit`
fails and loraplex reports CUDA as unavailable.

Usage: cuda_stubs.py CUDARC_SRC_DIR OUT_DIR CUDA_MAJOR
"""

import os
import re
import subprocess
import sys
import tempfile

src, out, major = sys.argv[1], sys.argv[2], sys.argv[3]
# cudarc module -> (library, soname, the error every stub function returns). cuRAND's soname
# major is 10 on CUDA 11, 12 and 13.
LIBS = {
    "driver": ("cuda", "libcuda.so.1", 34),  # CUDA_ERROR_STUB_LIBRARY
    "cublas": ("cublas", f"libcublas.so.{major}", 1),  # CUBLAS_STATUS_NOT_INITIALIZED
    "cublaslt": ("cublasLt", f"libcublasLt.so.{major}", 1),  # CUBLAS_STATUS_NOT_INITIALIZED
    "curand": ("curand", "libcurand.so.10", 203),  # CURAND_STATUS_INITIALIZATION_FAILED
    "nvrtc": ("nvrtc", f"libnvrtc.so.{major}", 11),  # NVRTC_ERROR_INTERNAL_ERROR
}
os.makedirs(out, exist_ok=True)
for module, (lib, soname, code) in LIBS.items():
    with open(os.path.join(src, module, "sys", "mod.rs")) as f:
        # Every version's declarations: a superset of what this build calls, which is harmless.
        names = sorted(set(re.findall(r"^pub unsafe fn (\w+)\(", f.read(), re.M)))
    if not names:
        sys.exit(f"no functions found in cudarc's {module} bindings: has its layout changed?")
    body = [f"int {n}(void) {{ return {code}; }}" for n in names]
    with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as c:
        c.write("\n".join(body) + "\n")
    target = os.path.join(out, f"lib{lib}.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{soname}", "-o", target, c.name], check=True)
    os.unlink(c.name)
    link = os.path.join(out, soname)  # the name the dynamic loader looks for
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.basename(target), link)
    print(f"{target}: {len(names)} functions, soname {soname}", file=sys.stderr)
