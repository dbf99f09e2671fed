#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (request parsing + validation, adapter_config.json,
# the safetensors header check, the SQuAD parsers) for SECONDS each, two at a time (this
# machine has 2 cores), starting from the committed seeds. Needs the nightly toolchain
# (`rustup toolchain install nightly`) and installs cargo-fuzz when missing. A failing input
# lands in fuzz/artifacts/TARGET/: copy it into fuzz/regressions/TARGET/ and
# tests/fuzz_regressions.rs replays it from then on.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(request adapter_config safetensors_header squad)
scripts/fetch-model.sh >/dev/null
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd fuzz
# Release code with debug assertions (integer overflow panics); no sanitizer: the crate
# forbids `unsafe`, panics are what the targets look for, and it doubles the executions.
flags=(-O -a -s none)
cargo +nightly fuzz build "${flags[@]}"
mkdir -p logs
run() {
  local t=$1
  mkdir -p "corpus/$t"
  cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 \
    > "logs/$t.log" 2>&1 && echo "$t: $(grep -E '^Done [0-9]+ runs' "logs/$t.log")" || echo "$t: FAILED (see fuzz/logs/$t.log)"
}
i=0
for t in "${targets[@]}"; do
  run "$t" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
