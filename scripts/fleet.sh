#!/usr/bin/env bash
# A one-host fleet: N `loraplex serve` replicas on one adapters folder, behind HAProxy
# (deploy/haproxy/haproxy.cfg: consistent hashing on the body's `model` with bounded load,
# health checks on /ready, retries of requests that never reached a replica).
#
#   scripts/fleet.sh start [--replicas N] [--adapters DIR] [--port PORT] [--balance hash|roundrobin]
#                          [--dir STATE_DIR] [-- extra `serve` options]
#   scripts/fleet.sh stop  [--dir STATE_DIR]
#
# Replicas listen on PORT+1 … PORT+N, HAProxy on PORT (default 8080) with its stats page on
# PORT+100 (/stats, /stats;csv). `--balance roundrobin`
# is the control that ignores the model. STATE_DIR (default target/fleet) holds each replica's
# pid and log (r1.pid, r1.log, …), haproxy.cfg, haproxy.pid and haproxy.log. LORAPLEX_BIN
# picks the binary (default target/release/loraplex, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"
[ $# -gt 0 ] && shift
replicas=3 adapters=adapters port=8080 balance=hash dir=target/fleet extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --adapters) adapters="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --balance) balance="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "fleet.sh: unknown option \`$1\`" >&2; exit 2 ;;
  esac
done
bin="${LORAPLEX_BIN:-target/release/loraplex}"

stop() {
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "$cmd" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: scripts/fleet.sh start|stop [options]" >&2; exit 2 ;;
esac
case "$balance" in hash|roundrobin) ;; *) echo "fleet.sh: --balance must be hash or roundrobin, got \`$balance\`" >&2; exit 2 ;; esac
command -v haproxy >/dev/null || { echo "fleet.sh: haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
[ -x "$bin" ] || cargo build --release --quiet
stop
mkdir -p "$dir"
for i in $(seq 1 "$replicas"); do
  "$bin" serve --adapters "$adapters" --port $((port + i)) --gateway-metrics "${extra[@]}" >"$dir/r$i.log" 2>&1 &
  echo $! >"$dir/r$i.pid"
done
# The shipped config, with this fleet's servers (and, for the control, round-robin).
{
  if [ "$balance" = roundrobin ]; then
    sed -e 's/^    balance hash .*/    balance roundrobin/' -e '/^    hash-type /d' -e '/^    hash-balance-factor /d' -e '/^    server /d' deploy/haproxy/haproxy.cfg
  else
    sed -e '/^    server /d' deploy/haproxy/haproxy.cfg
  fi
  for i in $(seq 1 "$replicas"); do echo "    server r$i 127.0.0.1:$((port + i))"; done
} >"$dir/haproxy.cfg"
export LORAPLEX_FLEET_BIND="127.0.0.1:$port" LORAPLEX_FLEET_STATS_BIND="127.0.0.1:$((port + 100))"
haproxy -c -q -f "$dir/haproxy.cfg"
haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
echo $! >"$dir/haproxy.pid"
deadline=$((SECONDS + 180))
for i in $(seq 1 "$replicas"); do
  until curl -sf "http://127.0.0.1:$((port + i))/ready" >/dev/null; do
    if ! kill -0 "$(cat "$dir/r$i.pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      echo "fleet.sh: replica r$i did not become ready; its log:" >&2
      tail -20 "$dir/r$i.log" >&2
      stop
      exit 1
    fi
    sleep 0.2
  done
done
# HAProxy marks a server up after `rise` good checks: wait until it reports every one UP.
until [ "$(curl -sf "http://127.0.0.1:$((port + 100))/stats;csv" | awk -F, '$1 == "replicas" && $18 == "UP"' | wc -l)" -eq "$replicas" ]; do
  [ $SECONDS -lt $deadline ] || { echo "fleet.sh: haproxy did not see every replica up" >&2; stop; exit 1; }
  sleep 0.2
done
echo "fleet up: http://127.0.0.1:$port ($replicas replicas, balance $balance, state in $dir)"
