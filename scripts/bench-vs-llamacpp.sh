#!/usr/bin/env bash
# loraplex against llama.cpp's llama-server on the same GGUF, both with 2 threads, in one run,
# alternating: the table of docs/BENCHMARKS.md (f).
#
#   scripts/bench-vs-llamacpp.sh [SECONDS_PER_ROW] [ROUNDS]      (defaults: 20, 2)
#
# Rows (64 generated tokens per request, EOS ignored, ~30-token prompt, no prompt caching on
# either side): 1 client on the base model; 8 clients with 8 different rank-8 q/v adapters
# (client i always uses adapter i); 32 clients with 32 different adapters (llama.cpp: base
# only, 32 slots, since it cannot batch different LoRA sets); then prefill of a 512-token
# prompt at batch 1 (prompt tokens / time to first token). Each system's best round is
# reported. llama.cpp is built, when missing, from the source vendored in the PyPI sdist
# llama-cpp-python==0.3.36 (CMake Release, every ISA extension of the CPU but AMX) into target/llama.cpp (git-ignored; set
# LLAMA_CPP_DIR to use another build). The synthetic adapters are converted to llama.cpp's
# GGUF LoRA format with `loraplex export-lora` (Q/K rows permuted as llama.cpp's converter
# permutes the base weights). Measure on an otherwise idle machine: the load average is printed
# before every row.
#
# `LORAPLEX_BENCH_ISA=avx2` measures what an AVX2-only host (no AVX-512, no VNNI) gets, on a
# host that has more: loraplex runs with `LORAPLEX_ISA=avx2` (its integer kernels on AVX2
# `vpmaddubsw`; the f32 kernels on AVX2 + FMA through `LORAPLEX_SIMD=avx2`), and llama.cpp is
# built with AVX, AVX2, FMA and F16C only, into target/llama.cpp-avx2.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
rounds="${2:-2}"
threads="${LORAPLEX_BENCH_THREADS:-2}"
work=target/vs-llamacpp
bench_isa="${LORAPLEX_BENCH_ISA:-native}"
case "$bench_isa" in
  native) llama="${LLAMA_CPP_DIR:-target/llama.cpp}" ;;
  avx2) llama="${LLAMA_CPP_DIR:-target/llama.cpp-avx2}"; export LORAPLEX_ISA=avx2 LORAPLEX_SIMD=avx2; work=target/vs-llamacpp-avx2 ;;
  *) echo "LORAPLEX_BENCH_ISA must be native or avx2, not '$bench_isa'" >&2; exit 2 ;;
esac
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/loraplex
sdist_version=0.3.36

build_llama() {
  if [ -x "$llama/build/bin/llama-server" ] && [ -x "$llama/build/bin/llama-bench" ]; then return; fi
  command -v cmake >/dev/null || { apt-get install -y -q cmake >/dev/null 2>&1 || python3 -m pip install --quiet cmake; }
  mkdir -p "$llama"
  local tgz="$llama/llama_cpp_python-$sdist_version.tar.gz"
  if [ ! -f "$tgz" ]; then
    # The sdist's address and sha256 from PyPI's simple index.
    local link
    link=$(curl -fsSL "https://pypi.org/simple/llama-cpp-python/" | grep -o "href=\"[^\"]*llama_cpp_python-$sdist_version.tar.gz#sha256=[0-9a-f]*\"" | head -1 | sed 's/^href="//; s/"$//')
    [ -n "$link" ] || { echo "llama-cpp-python $sdist_version sdist not found on PyPI" >&2; exit 1; }
    curl -fsSL -o "$tgz.part" "${link%%#*}"
    echo "${link##*sha256=}  $tgz.part" | sha256sum --check --status || { echo "sha256 mismatch for the sdist" >&2; exit 1; }
    mv "$tgz.part" "$tgz"
  fi
  tar -xzf "$tgz" -C "$llama"
  local src="$llama/llama_cpp_python-$sdist_version/vendor/llama.cpp"
  # Native, except AMX: some VMs advertise AMX in cpuid without enabling its register state,
  # and ggml's AMX kernels then die with SIGILL. Every other extension the CPU has is on.
  local isa=()
  local flags
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  local wanted="avx avx2 fma f16c avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI"
  local allowed="$wanted"
  [ "$bench_isa" = avx2 ] && allowed="avx avx2 fma f16c"
  for f in $wanted; do
    local flag="${f%%:*}" opt="${f#*:}"
    [ "$opt" = "$f" ] && opt=$(echo "$flag" | tr a-z A-Z)
    if grep -qw "$flag" <<<"$flags" && grep -qw -- "$f" <<<"$allowed"; then isa+=("-DGGML_$opt=ON"); else isa+=("-DGGML_$opt=OFF"); fi
  done
  cmake -S "$src" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa[@]}" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$llama/build" --target llama-server llama-bench -j"$(nproc)" >/dev/null
}

scripts/fetch-model.sh >/dev/null
build_llama
[ "${1:-}" = "--build-only" ] && exit 0
cargo build --release --quiet
rm -rf "$work" && mkdir -p "$work/adapters" "$work/gguf"
"$bin" bench --make-adapters "$work/adapters" --adapter-count 32 >/dev/null
adapters=()
for i in $(seq 0 31); do adapters+=("$work/adapters/synth-$i"); done
"$bin" export-lora --model "$model" --out "$work/gguf" "${adapters[@]}" >/dev/null

port=8211
server=""
stop_server() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; fi; }
trap stop_server EXIT
wait_ready() { for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/$1" >/dev/null && return 0; sleep 0.1; done; echo "server did not start" >&2; exit 1; }

start_loraplex() {
  LORAPLEX_LOG=warn RAYON_NUM_THREADS="$threads" "$bin" serve --model "$model" --adapters "$work/adapters" --port "$port" \
    --max-batch-size 32 >"$work/loraplex.log" 2>&1 &
  server=$!
  wait_ready ready
}

# $1 = slots, $2 = number of LoRA files to load (applied per request, scale 0 by default).
start_llama() {
  local loras=()
  if [ "$2" -gt 0 ]; then
    loras=(--lora "$(for i in $(seq 0 $(($2 - 1))); do echo "$work/gguf/synth-$i.gguf"; done | paste -sd,)" --lora-init-without-apply)
  fi
  "$llama/build/bin/llama-server" -m "$model" -t "$threads" -tb "$threads" -np "$1" -c $(($1 * 640)) --port "$port" \
    --no-webui "${loras[@]}" >"$work/llama.log" 2>&1 &
  server=$!
  wait_ready health
}

# One load row against the running server; prints output tok/s (or prefill tok/s with "prefill").
measure() {
  local api=$1 label=$2; shift 2
  echo "  $(date +%T) load $(cut -d' ' -f1 /proc/loadavg) $label" >&2
  rm -f "$work/row.json"
  "$bin" bench --url "http://127.0.0.1:$port" --api "$api" --duration-secs "$secs" --json-out "$work/row.json" --label "$label" "$@" >/dev/null
  cat "$work/row.json" >>"$work/results.jsonl"
  cat "$work/row.json"
}
tok_s() { python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); assert r["errors"]==0, r; print(round(r["output_tokens_per_s"],1))'; }
prefill_s() { python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); assert r["errors"]==0, r; print(round(520/(r["ttft_ms"]["p50"]/1000),1))'; }

declare -A best
keep() { # name value: keeps the larger
  local old="${best[$1]:-0}"
  if python3 -c "import sys; sys.exit(0 if float('$2') > float('$old') else 1)"; then best[$1]=$2; fi
}

run_loraplex() {
  start_loraplex
  "$bin" bench --url "http://127.0.0.1:$port" --duration-secs 3 --concurrency 8 --adapter-count 32 >/dev/null # warm-up
  keep lp_c1 "$(measure loraplex "loraplex c=1 base" --concurrency 1 --max-tokens 64 --prompt-tokens 28 | tok_s)"
  keep lp_c8 "$(measure loraplex "loraplex c=8 8 adapters" --concurrency 8 --adapter-count 8 --distribution per-client --max-tokens 64 --prompt-tokens 28 | tok_s)"
  keep lp_c32 "$(measure loraplex "loraplex c=32 32 adapters" --concurrency 32 --adapter-count 32 --distribution per-client --max-tokens 64 --prompt-tokens 28 | tok_s)"
  keep lp_c32b "$(measure loraplex "loraplex c=32 base" --concurrency 32 --max-tokens 64 --prompt-tokens 28 | tok_s)"
  keep lp_pp "$(measure loraplex "loraplex prefill 520" --concurrency 1 --max-tokens 1 --prompt-tokens 520 | prefill_s)"
  stop_server
}

run_llama() {
  start_llama 1 0
  keep ll_c1 "$(measure llamacpp "llama.cpp c=1 base" --concurrency 1 --max-tokens 64 --prompt-tokens 28 | tok_s)"
  keep ll_pp "$(measure llamacpp "llama.cpp prefill 520" --concurrency 1 --max-tokens 1 --prompt-tokens 520 | prefill_s)"
  stop_server
  start_llama 8 8
  keep ll_c8 "$(measure llamacpp "llama.cpp c=8 8 adapters" --concurrency 8 --adapter-count 8 --distribution per-client --max-tokens 64 --prompt-tokens 28 | tok_s)"
  stop_server
  start_llama 32 0
  keep ll_c32 "$(measure llamacpp "llama.cpp c=32 base" --concurrency 32 --max-tokens 64 --prompt-tokens 28 | tok_s)"
  stop_server
}

for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds" >&2
  if [ $((r % 2)) -eq 1 ]; then run_loraplex; run_llama; else run_llama; run_loraplex; fi
done

ratio() { python3 -c "print(f'{float(\"$1\")/float(\"$2\"):.2f}')"; }
echo
echo "| load | loraplex | llama.cpp | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| 1 client, base | ${best[lp_c1]} tok/s | ${best[ll_c1]} | **$(ratio "${best[lp_c1]}" "${best[ll_c1]}")** | ≥ 1.0 |"
echo "| 8 clients, 8 different rank-8 q/v adapters | ${best[lp_c8]} | ${best[ll_c8]} | **$(ratio "${best[lp_c8]}" "${best[ll_c8]}")** | ≥ 2.0 |"
echo "| 32 clients, 32 different adapters (llama.cpp: base only, 32 slots) | ${best[lp_c32]} | ${best[ll_c32]} | **$(ratio "${best[lp_c32]}" "${best[ll_c32]}")** | ≥ 1.0 |"
echo "| prefill, 520-token prompt, batch 1 (prompt tok/s) | ${best[lp_pp]} | ${best[ll_pp]} | **$(ratio "${best[lp_pp]}" "${best[ll_pp]}")** | ≥ 1.0 |"
echo
echo "LoRA overhead at 32 clients (loraplex, 32 distinct adapters vs base): $(python3 -c "print(f'{(1 - float(\"${best[lp_c32]}\")/float(\"${best[lp_c32b]}\"))*100:.1f} %')") (base ${best[lp_c32b]} tok/s)"
echo "Best of $rounds alternating rounds, $secs s per row, $threads threads each; raw results in $work/results.jsonl"
