#!/usr/bin/env python3
"""Validates deploy/k8s without a cluster (run by scripts/check-k8s.sh, which CI runs).

- Kubernetes' own kinds (Deployment, Service, PVC, ConfigMap, RBAC): strict validation against
  the API's OpenAPI schemas for the Kubernetes version given (kubernetes-validate, PyPI).
- HTTPRoute: the Gateway API's published schemas (@kubernetes-models/gateway-api, npm), through
  scripts/check-httproute.mjs.
- InferencePool and the endpoint picker's EndpointPickerConfig (inside its ConfigMap): the JSON
  schemas in deploy/k8s/schemas (no registry carries these CRDs).
- How the pieces fit: the pool selects the Deployment's pods on the container's port, names the
  picker's Service and port, the route targets the pool, the picker's profile enables the LoRA
  affinity, queue and KV-cache scorers, the pods export the gateway metrics, have the probes,
  drain within the grace period and share a ReadWriteMany adapters volume, and kustomization
  lists every file.

`--self-test` also checks that broken copies are rejected (each by the check meant to catch
it), so the validation itself cannot pass vacuously.
"""

import copy
import glob
import json
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy/k8s")
K8S_VERSION = os.environ.get("K8S_VERSION", "1.33.0")
REQUIRED_SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"}
CORE_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1"}


def load():
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml")) + glob.glob(os.path.join(K8S, "tools", "*.yaml"))):
        for d in yaml.safe_load_all(open(path)):
            if d:
                docs.append((os.path.relpath(path, K8S), d))
    return docs


def schema(name):
    with open(os.path.join(K8S, "schemas", name)) as f:
        return json.load(f)


def find(docs, kind, name=None):
    return [d for _, d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def httproute_errors(routes):
    if not routes:
        return []
    node_path = os.environ.get("LORAPLEX_NODE_PATH")
    if not node_path:
        return ["LORAPLEX_NODE_PATH is not set (scripts/check-k8s.sh installs the Gateway API schemas there)"]
    out = subprocess.run(["node", os.path.join(ROOT, "scripts/check-httproute.mjs")], input=json.dumps(routes), text=True,
                         capture_output=True, env=dict(os.environ, NODE_PATH=node_path))
    return [l for l in (out.stdout + out.stderr).splitlines() if not l.startswith("ok ")] or ([] if out.returncode == 0 else ["node failed"])


def check(docs):
    """Every problem found, as text."""
    errors = []
    files = {f for f, _ in docs}
    kust = [d for _, d in docs if d.get("kind") == "Kustomization"]
    if len(kust) != 1:
        errors.append("kustomization.yaml: expected one Kustomization")
    else:
        listed = set(kust[0].get("resources", []))
        missing = {f for f in files if not f.startswith("tools/")} - listed - {"kustomization.yaml"}
        absent = {r for r in listed if not os.path.exists(os.path.join(K8S, r))}
        if missing or absent:
            errors.append(f"kustomization.yaml: not listed {sorted(missing)}, listed but absent {sorted(absent)}")
    # Schemas, document by document.
    for f, d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        where = f"{f}: {kind}/{d.get('metadata', {}).get('name')}"
        try:
            if kind == "Kustomization":
                continue
            if api in CORE_GROUPS:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            elif kind == "InferencePool":
                jsonschema.validate(d, schema("inferencepool-v1.json"))
            elif kind != "HTTPRoute":
                errors.append(f"{where}: no schema for {api} {kind}")
        except (jsonschema.ValidationError, kubernetes_validate.utils.ValidationError) as e:
            errors.append(f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    errors += [f"HTTPRoute: {e}" for e in httproute_errors(find(docs, "HTTPRoute"))]
    if errors:
        return errors  # the cross-checks below assume well-formed documents

    # How the pieces fit.
    dep = find(docs, "Deployment", "loraplex")[0]
    pod = dep["spec"]["template"]
    server = pod["spec"]["containers"][0]
    pool = find(docs, "InferencePool")[0]
    labels = pod["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in pool["spec"]["selector"]["matchLabels"].items()):
        errors.append("InferencePool selector does not match the loraplex pods' labels")
    ports = {p["containerPort"] for p in server.get("ports", [])}
    if any(p["number"] not in ports for p in pool["spec"]["targetPorts"]):
        errors.append(f"InferencePool targetPorts {pool['spec']['targetPorts']} are not the server's ports {sorted(ports)}")
    args = server.get("args", [])
    if "--gateway-metrics" not in args:
        errors.append("the loraplex container does not export the gateway metrics (--gateway-metrics)")
    if server.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/ready":
        errors.append("the readiness probe must read /ready (503 while loading or draining)")
    if server.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/health":
        errors.append("the liveness probe must read /health")
    drain = next((int(e["value"]) for e in server.get("env", []) if e["name"] == "LORAPLEX_DRAIN_TIMEOUT_SECS"), 30)
    pause = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if pause + drain >= grace:
        errors.append(f"preStop {pause} s + drain {drain} s does not fit terminationGracePeriodSeconds {grace}")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    mount = next((m for m in server["volumeMounts"] if any(a == f"--adapters={m['mountPath']}" for a in args)), None)
    pvc = find(docs, "PersistentVolumeClaim", claims.get(mount["name"])) if mount else []
    if not pvc or "ReadWriteMany" not in pvc[0]["spec"]["accessModes"]:
        errors.append("the adapters folder must be a ReadWriteMany PersistentVolumeClaim shared by every replica")
    ref = pool["spec"]["endpointPickerRef"]
    svc = find(docs, "Service", ref["name"])
    if not svc or ref["port"]["number"] not in {p["port"] for p in svc[0]["spec"]["ports"]}:
        errors.append(f"endpointPickerRef {ref} names no Service port")
    for route in find(docs, "HTTPRoute"):
        targets = [b for r in route["spec"]["rules"] for b in r.get("backendRefs", [])]
        if not any(b.get("kind") == "InferencePool" and b.get("group") == "inference.networking.k8s.io" and b["name"] == pool["metadata"]["name"] for b in targets):
            errors.append(f"HTTPRoute {route['metadata']['name']} does not route to the InferencePool")
    # The picker's configuration.
    epp = find(docs, "Deployment", ref["name"])
    cm = [c for c in find(docs, "ConfigMap") if "epp-config.yaml" in c.get("data", {})]
    if not epp or not cm:
        errors.append("no endpoint picker Deployment named by the pool, or no ConfigMap with epp-config.yaml")
        return errors
    epp_args = epp[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    if f"--pool-name={pool['metadata']['name']}" not in epp_args:
        errors.append("the endpoint picker is not pointed at the pool (--pool-name)")
    cfg = yaml.safe_load(cm[0]["data"]["epp-config.yaml"])
    try:
        jsonschema.validate(cfg, schema("endpointpickerconfig.json"))
    except jsonschema.ValidationError as e:
        return errors + [f"epp-config.yaml: {'/'.join(map(str, e.absolute_path))}: {e.message}"]
    names = {p.get("name", p["type"]): p["type"] for p in cfg["plugins"]}
    for prof in cfg["schedulingProfiles"]:
        refs = {r["pluginRef"]: r.get("weight") for r in prof["plugins"]}
        unknown = set(refs) - set(names)
        if unknown:
            errors.append(f"epp-config.yaml: profile {prof['name']} refers to undefined plugins {sorted(unknown)}")
        enabled = {names[r] for r, w in refs.items() if r in names and (w or 0) > 0}
        if not REQUIRED_SCORERS <= enabled:
            errors.append(f"epp-config.yaml: profile {prof['name']} lacks weighted scorers {sorted(REQUIRED_SCORERS - enabled)}")
    return errors


def self_test(docs):
    """Broken copies, each expected to be rejected; returns the ones that were not (all, if
    the unbroken documents do not pass: a rejection would then prove nothing)."""
    if check(docs):
        return ["the unbroken documents (they must pass first)"]

    def mutate(f):
        d = copy.deepcopy(docs)
        f(d)
        return d

    def doc(d, kind, name=None):
        return next(x for _, x in d if x.get("kind") == kind and (name is None or x["metadata"]["name"] == name))

    def epp_cfg(d, edit):
        c = next(x for _, x in d if x.get("kind") == "ConfigMap")
        cfg = yaml.safe_load(c["data"]["epp-config.yaml"])
        edit(cfg)
        c["data"]["epp-config.yaml"] = yaml.safe_dump(cfg)

    cases = {
        "unknown Deployment field": lambda d: doc(d, "Deployment", "loraplex")["spec"].update(replica=3),
        "Service port not an integer": lambda d: doc(d, "Service", "loraplex")["spec"]["ports"][0].update(port="http"),
        "InferencePool without selector": lambda d: doc(d, "InferencePool")["spec"].pop("selector"),
        "InferencePool picker without port": lambda d: doc(d, "InferencePool")["spec"]["endpointPickerRef"].pop("port"),
        "InferencePool bad failureMode": lambda d: doc(d, "InferencePool")["spec"]["endpointPickerRef"].update(failureMode="Open"),
        "HTTPRoute parentRef without name": lambda d: doc(d, "HTTPRoute")["spec"]["parentRefs"][0].pop("name"),
        "pool selecting other pods": lambda d: doc(d, "InferencePool")["spec"]["selector"]["matchLabels"].update(app="other"),
        "no gateway metrics": lambda d: doc(d, "Deployment", "loraplex")["spec"]["template"]["spec"]["containers"][0]["args"].remove("--gateway-metrics"),
        "drain longer than the grace period": lambda d: doc(d, "Deployment", "loraplex")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20),
        "LoRA affinity not weighted": lambda d: epp_cfg(d, lambda c: c["schedulingProfiles"][0]["plugins"].__setitem__(0, {"pluginRef": "max-score-picker"})),
        "profile naming an undefined plugin": lambda d: epp_cfg(d, lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "nope"})),
    }
    return [name for name, f in cases.items() if not check(mutate(f))]


def main():
    docs = load()
    errors = check(docs)
    for e in errors:
        print("INVALID", e)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in docs if d.get("kind") != "Kustomization")
    if not errors:
        print(f"deploy/k8s valid (Kubernetes {K8S_VERSION} strict schemas, Gateway API HTTPRoute schema, InferencePool v1 and "
              f"EndpointPickerConfig schemas, cross-references): {', '.join(kinds)}")
    if "--self-test" in sys.argv:
        missed = self_test(docs)
        for m in missed:
            print("SELF-TEST: a broken copy passed:", m)
        if not missed:
            print("self-test: every broken copy was rejected")
        errors += missed
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
