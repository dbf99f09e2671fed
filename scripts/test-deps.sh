#!/usr/bin/env bash
# What the test command needs beyond Rust and the models, installed when missing, or named in
# one clear error when this machine cannot install it (not root, no apt-get):
#   cargo-nextest          the test runner
#   openai (PyPI, pinned)  tests/e2e/*.py, driven by tests/e2e_server.rs and tests/openai_surface.rs
#   jsonschema (pinned)    validates structured outputs and OpenAI's spec (tests/e2e/conformance.py)
#   openai-agents, langchain-openai (pinned)  the agent frameworks of tests/agents.rs
#   promtool               Debian's `prometheus`: checks a metrics scrape (tests/metrics.rs)
#   haproxy, curl          the one-host fleet of scripts/fleet-check.py (scripts/fleet.sh)
#   chromium + its driver  Debian's headless browser for the playground test (tests/playground.rs)
# scripts/check-k8s.sh installs its own (PyPI and npm). Called by scripts/test.sh and .ci/run.
set -euo pipefail
openai_pin="openai==3.63.0"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
if ! python3 -c "import openai, sys; sys.exit(openai.__version__ != '${openai_pin#openai==}')" 2>/dev/null; then
  echo "installing $openai_pin" >&2
  python3 -m pip install --quiet --disable-pip-version-check "$openai_pin"
fi
jsonschema_pin="jsonschema==4.26.0"
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('jsonschema') != '${jsonschema_pin#jsonschema==}')" 2>/dev/null; then
  echo "installing $jsonschema_pin" >&2
  python3 -m pip install --quiet --disable-pip-version-check "$jsonschema_pin"
fi
# The agent frameworks (they keep the pinned `openai`: checked after installing).
frameworks=("openai-agents==0.24.0" "langchain-openai==1.8.1")
for pin in "${frameworks[@]}"; do
  if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('${pin%%==*}') != '${pin#*==}')" 2>/dev/null; then
    echo "installing $pin" >&2
    python3 -m pip install --quiet --disable-pip-version-check "$pin" "$openai_pin"
  fi
done
packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v haproxy >/dev/null 2>&1 || packages+=(haproxy)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v chromium >/dev/null 2>&1 || packages+=(chromium fonts-liberation)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${packages[*]} (apt-get)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "the tests need the Debian packages ${packages[*]} (promtool comes in \`prometheus\`); install them, e.g. sudo apt-get install ${packages[*]}" >&2
    exit 1
  fi
fi
