#!/usr/bin/env bash
# The test command: fetches the default model if needed, then runs every test with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo nextest run --no-fail-fast "$@"
# Benches are not run here (they are measurements), but they must keep compiling.
cargo test --benches --no-run --quiet
