#!/usr/bin/env python3
"""The one-host fleet check (run by scripts/test.sh, so CI runs it): 3 loraplex replicas behind
HAProxy (scripts/fleet.sh) and 30 synthetic adapters under a skewed (Zipf) request mix.

(a) Affinity: after the mix, every adapter is resident on at most 2 replicas. Round-robin over
    the same replicas is the control; its residency is reported beside (it loads nearly every
    adapter everywhere) and must be clearly worse.
(b) Drain: a replica sent SIGTERM mid-run drains, HAProxy marks it down and sends it nothing
    more, and every request of the run completes: 0 lost, 0 5xx.
(c) Crash: a replica killed with SIGKILL mid-run loses at most the requests it held at that
    moment (the connections HAProxy had open to it, and those its socket still accepted while the
    kernel tore it down), and every request started after it was gone succeeds on the others:
    before the health checks mark it down, HAProxy retries the refused connections on a live
    replica.

Prints a report (loads and resident adapters per replica, outcomes, timings) and exits non-zero
on any violation. Standard library only. Usage: scripts/fleet-check.py [--port 18080]
[--requests 450] [--concurrency 12] [--keep] (leaves target/fleet-check for inspection).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LORAPLEX_BIN", os.path.join(ROOT, "target/release/loraplex"))
STATE = os.path.join(ROOT, "target/fleet-check")
ADAPTERS = os.path.join(STATE, "adapters")
N_ADAPTERS = 30
REPLICAS = 3
PREFIX = "fleet-"


def fleet(*args, env=None):
    cmd = [os.path.join(ROOT, "scripts/fleet.sh"), *args]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def replica_url(port, i):
    return f"http://127.0.0.1:{port + i}"


def residency(port, alive):
    """Per replica: (successful adapter loads, set of resident adapters)."""
    out = {}
    for i in alive:
        base = replica_url(port, i)
        loads = metric(get(base + "/metrics"), 'loraplex_adapter_loads_total{result="ok"}')
        data = json.loads(get(base + "/v1/adapters"))["data"]
        out[i] = (int(loads), {a["name"] for a in data if a["state"] == "loaded"})
    return out


def haproxy_servers(port, count="stot"):
    """name -> (status, `count`: total sessions, or `scur` current ones) from HAProxy's stats CSV."""
    rows = get(f"http://127.0.0.1:{port + 100}/stats;csv").splitlines()
    head = rows[0].lstrip("# ").split(",")
    col = {k: j for j, k in enumerate(head)}
    out = {}
    for r in rows[1:]:
        f = r.split(",")
        if len(f) > col["stot"] and f[0] == "replicas" and f[1].startswith("r"):
            out[f[1]] = (f[col["status"]], int(f[col[count]] or 0))
    return out


class Load:
    """Closed-loop clients sending a Zipf mix of non-streaming completions through HAProxy."""

    def __init__(self, port, requests, concurrency, seed):
        rng = random.Random(seed)
        weights = [1.0 / (k + 1) for k in range(N_ADAPTERS)]  # Zipf, s = 1
        self.models = rng.choices([f"{PREFIX}{k}" for k in range(N_ADAPTERS)], weights=weights, k=requests)
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        self.concurrency = concurrency
        self.next = 0
        self.lock = threading.Lock()
        self.results = []  # (index, model, started, ended, status or error text)

    def one(self, i, model):
        body = json.dumps({"model": model, "prompt": f"Request {i}: the capital of France is", "max_tokens": 8,
                           "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"content-type": "application/json"})
        started = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                payload = json.loads(r.read())
                status = r.status if payload.get("choices") else "no choices"
        except urllib.error.HTTPError as e:
            status = e.code
        except Exception as e:  # connection reset, timeout: the request is lost
            status = f"lost: {e}"
        return (i, model, started, time.monotonic(), status)

    def worker(self):
        while True:
            with self.lock:
                i = self.next
                if i >= len(self.models):
                    return
                self.next += 1
            r = self.one(i, self.models[i])
            with self.lock:
                self.results.append(r)

    def progress(self):
        with self.lock:
            return self.next / len(self.models)

    def run(self, during=None):
        threads = [threading.Thread(target=self.worker) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        if during:
            during(self)
        for t in threads:
            t.join()
        return self.results


def wait_progress(load, fraction):
    while load.progress() < fraction:
        time.sleep(0.02)


def summarize(results):
    ok = sum(1 for r in results if r[4] == 200)
    fivexx = [r for r in results if isinstance(r[4], int) and r[4] >= 500]
    lost = [r for r in results if isinstance(r[4], str)]
    return ok, fivexx, lost


def start_fleet(args, balance):
    env = dict(os.environ, LORAPLEX_THREADS="1", LORAPLEX_LOG="warn")
    fleet("start", "--replicas", str(REPLICAS), "--adapters", ADAPTERS, "--port", str(args.port), "--balance", balance,
          "--dir", os.path.join(STATE, balance), "--", "--kv-cache-bytes", "256MiB", "--max-batch-size", "16",
          "--drain-timeout-secs", "30", env=env)


def stop_fleet(args, balance):
    fleet("stop", "--dir", os.path.join(STATE, balance))


def pid(balance, i):
    with open(os.path.join(STATE, balance, f"r{i}.pid")) as f:
        return int(f.read())


def alive(p):
    """Whether process `p` runs (a zombie, unreaped by a minimal init, does not)."""
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_exit(p, secs):
    deadline = time.monotonic() + secs
    while alive(p):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_refused(port, secs):
    """The time at which a connection to `port` is first refused."""
    import socket
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic()
        except OSError:
            pass
        time.sleep(0.002)
    return time.monotonic()


def report_residency(title, res):
    print(f"  {title}:")
    holders = {}
    for i, (loads, resident) in sorted(res.items()):
        print(f"    r{i}: {loads} adapter loads, {len(resident)} resident")
        for a in resident:
            holders.setdefault(a, []).append(i)
    spread = [len(v) for v in holders.values()]
    print(f"    adapters seen {len(holders)}; replicas per adapter: max {max(spread)}, mean {sum(spread) / len(spread):.2f}; "
          f"total loads {sum(l for l, _ in res.values())}")
    return holders


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--requests", type=int, default=450)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    problems = []
    subprocess.run(["rm", "-rf", STATE], check=True)
    os.makedirs(STATE)
    subprocess.run([BIN, "bench", "--make-adapters", ADAPTERS, "--adapter-count", str(N_ADAPTERS), "--adapter-prefix", PREFIX],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"fleet check: {REPLICAS} replicas, {N_ADAPTERS} adapters, Zipf(1) mix of {args.requests} requests, "
          f"{args.concurrency} clients")

    # --- control: round-robin ---------------------------------------------------------------
    start_fleet(args, "roundrobin")
    try:
        ok, fivexx, lost = summarize(Load(args.port, args.requests, args.concurrency, seed=1).run())
        rr = report_residency("round-robin (control)", residency(args.port, range(1, REPLICAS + 1)))
    finally:
        stop_fleet(args, "roundrobin")
    rr_mean = sum(len(v) for v in rr.values()) / len(rr)

    # --- consistent hashing on `model`, bounded load ----------------------------------------
    start_fleet(args, "hash")
    try:
        # (a) the same mix, undisturbed.
        t0 = time.monotonic()
        results = Load(args.port, args.requests, args.concurrency, seed=1).run()
        secs = time.monotonic() - t0
        ok, fivexx, lost = summarize(results)
        sessions = {k: v[1] for k, v in sorted(haproxy_servers(args.port).items())}
        print(f"  (a) {ok}/{len(results)} ok in {secs:.1f} s; requests per replica (HAProxy sessions): {sessions}")
        holders = report_residency("consistent hash on model", residency(args.port, range(1, REPLICAS + 1)))
        worst = max(len(v) for v in holders.values())
        mean = sum(len(v) for v in holders.values()) / len(holders)
        if worst > 2:
            problems.append(f"(a) an adapter is resident on {worst} replicas: {[a for a, v in holders.items() if len(v) > 2]}")
        if not rr_mean > mean + 0.5:
            problems.append(f"(a) round-robin spreads adapters no more than hashing ({rr_mean:.2f} vs {mean:.2f} replicas each)")
        if fivexx or lost or ok != len(results):
            problems.append(f"(a) {len(fivexx)} 5xx, {len(lost)} lost of {len(results)}")

        # (b) SIGTERM to r2 at 30 % of a run.
        state = {}

        def drain_r2(load):
            wait_progress(load, 0.3)
            state["stot_before"] = haproxy_servers(args.port)["r2"][1]
            state["t"] = time.monotonic()
            os.kill(pid("hash", 2), signal.SIGTERM)
            while haproxy_servers(args.port)["r2"][0].startswith("UP"):
                time.sleep(0.05)
            state["down_after"] = time.monotonic() - state["t"]
            state["stot_down"] = haproxy_servers(args.port)["r2"][1]

        results = Load(args.port, args.requests, args.concurrency, seed=2).run(during=drain_r2)
        ok, fivexx, lost = summarize(results)
        end = haproxy_servers(args.port)["r2"]
        exited = wait_exit(pid("hash", 2), 10.0)
        print(f"  (b) SIGTERM r2 at 30 %: HAProxy marked it {end[0]} after {state['down_after']:.2f} s; sessions to it "
              f"{state['stot_before']} at SIGTERM, {state['stot_down']} when marked down, {end[1]} at the end; "
              f"run: {ok}/{len(results)} ok, {len(fivexx)} 5xx, {len(lost)} lost; r2 exited: {exited}")
        if fivexx or lost or ok != len(results):
            problems.append(f"(b) drain lost requests: {len(fivexx)} 5xx, {len(lost)} lost: {(fivexx + lost)[:3]}")
        if end[1] != state["stot_down"]:
            problems.append(f"(b) HAProxy sent r2 {end[1] - state['stot_down']} sessions after marking it down")
        if not exited:
            problems.append("(b) r2 did not exit after draining")

        # (c) SIGKILL to r3 at 30 % of a run (r1 and r3 serve).
        state = {}

        def kill_r3(load):
            wait_progress(load, 0.3)
            m = get(replica_url(args.port, 3) + "/metrics")
            state["held"] = int(metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting"))
            # HAProxy's count of connections open to r3, read just before the kill: what it can
            # lose (the engine's count above lags by the requests arriving meanwhile).
            state["open"] = haproxy_servers(args.port, "scur")["r3"][1]
            state["t"] = time.monotonic()
            os.kill(pid("hash", 3), signal.SIGKILL)
            # The kernel tears the process down after the signal (every thread must exit before
            # its files close): until then its listening socket still accepts connections,
            # which die with it. Gone = a connection is refused.
            state["gone"] = wait_refused(args.port + 3, 10.0)
            while haproxy_servers(args.port)["r3"][0].startswith("UP"):
                time.sleep(0.05)
            state["down_after"] = time.monotonic() - state["t"]

        results = Load(args.port, args.requests, args.concurrency, seed=3).run(during=kill_r3)
        ok, fivexx, lost = summarize(results)
        failed = fivexx + lost
        window = [r for r in results if state["t"] <= r[2] < state["gone"]]
        after = [r for r in failed if r[2] >= state["gone"]]
        print(f"  (c) SIGKILL r3 at 30 %: it held {state['held']} requests (engine) and {state['open']} connections (HAProxy); "
              f"gone {1000 * (state['gone'] - state['t']):.0f} ms after the signal ({len(window)} requests started meanwhile), "
              f"marked down after {state['down_after']:.2f} s; run: {ok}/{len(results)} ok, {len(failed)} failed "
              f"({len(fivexx)} 5xx, {len(lost)} lost), {len(after)} failures among requests started after it was gone")
        # One connection of slack: a request may reach r3 between the count and the kill.
        if len(failed) > state["open"] + len(window) + 1:
            problems.append(f"(c) {len(failed)} requests failed, more than the {state['open']} connections r3 had open "
                            f"and the {len(window)} started while it died")
        if after:
            problems.append(f"(c) {len(after)} requests started after r3 was gone failed (no retry to the live replica): {after[:3]}")
    finally:
        stop_fleet(args, "hash")
        if not args.keep:
            subprocess.run(["rm", "-rf", ADAPTERS])
    if problems:
        print("FLEET CHECK FAILED:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("fleet check passed")


if __name__ == "__main__":
    main()
