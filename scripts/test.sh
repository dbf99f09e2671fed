#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/test-deps.sh), fetches the default
# model and Gemma-3-270m (tests/gemma_real.rs) if needed, then runs every test with nextest.
# Tests build in the release profile: the binary the end-to-end tests drive is the release
# binary, and the dependencies are compiled once for both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/test-deps.sh
scripts/fetch-model.sh
scripts/fetch-gemma.sh
cargo nextest run --release --locked --no-fail-fast "$@"
# The Kubernetes manifests, against the published schemas (no cluster here).
scripts/check-k8s.sh
# The one-host fleet behind HAProxy (3 replicas, 30 adapters: affinity, drain, crash); it
# drives the release binary the tests just built.
python3 scripts/fleet-check.py
# Benches are not run here (they are measurements), but they must keep compiling.
cargo test --release --locked --benches --no-run --quiet
