#!/usr/bin/env bash
# Validates deploy/k8s offline (no cluster): installs the validators it needs, then runs
# scripts/check-k8s.py with its self-test. kubernetes-validate (PyPI) carries Kubernetes'
# schemas; @kubernetes-models/gateway-api (npm) the Gateway API's, in target/k8s-schemas.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" jsonschema pyyaml
js=target/k8s-schemas
if [ ! -d "$js/node_modules/@kubernetes-models/gateway-api" ]; then
  mkdir -p "$js"
  (cd "$js" && npm install --silent --no-audit --no-fund --no-save "@kubernetes-models/gateway-api@2.0.0" >/dev/null)
fi
LORAPLEX_NODE_PATH="$PWD/$js/node_modules" python3 scripts/check-k8s.py --self-test
