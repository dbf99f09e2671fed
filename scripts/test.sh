#!/usr/bin/env bash
# The test command: fetches the default model and Gemma-3-270m (tests/gemma_real.rs) if needed,
# then runs every test with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
scripts/fetch-gemma.sh
cargo nextest run --no-fail-fast "$@"
# The Kubernetes manifests, against the published schemas (no cluster here).
scripts/check-k8s.sh
# The one-host fleet behind HAProxy (3 replicas, 30 adapters: affinity, drain, crash); it
# drives the release binary.
[ -x "${LORAPLEX_BIN:-target/release/loraplex}" ] || cargo build --release --quiet
python3 scripts/fleet-check.py
# Benches are not run here (they are measurements), but they must keep compiling.
cargo test --benches --no-run --quiet
