"""Every body and stream event of the routes loraplex shares with OpenAI, validated against
OpenAI's published OpenAPI spec (../shared/reference/openai-openapi/openapi.json).

Usage: conformance.py BASE_URL SPEC_PATH USER_KEY ADMIN_KEY WORKDIR
Drives chat (plain, tools, parse, logprobs, stream), completions (echo + logprobs, stream),
models (list, retrieve), responses (text, tools, stream), files, fine-tuning jobs, events,
checkpoints, and each error class, with plain HTTP (so nothing a client library tolerates is
hidden). Prints one JSON document: `calls` (each `METHOD /path-pattern` exercised) and
`failures` (route, schema, field, message), which tests/conformance.rs checks.

The spec is read as its README says: `#/components/schemas/...` references resolved in place,
OpenAPI 3.0's `nullable: true` rewritten to "or null" and a boolean `exclusiveMinimum` to its
JSON Schema meaning, then validated with jsonschema (draft 2020-12).
"""

import json
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

base, spec_path, user_key, admin_key, work = sys.argv[1:6]
root = base[: -len("/v1")]
BASE_MODEL = "SmolLM2-135M-Instruct.Q4_1"


def rewrite(node):
    """OpenAPI 3.0 spellings → JSON Schema 2020-12."""
    if isinstance(node, list):
        return [rewrite(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: rewrite(v) for k, v in node.items()}
    if node.get("exclusiveMinimum") is True:
        node["exclusiveMinimum"] = node.pop("minimum", 0)
    elif node.get("exclusiveMinimum") is False:
        node.pop("exclusiveMinimum")
    if node.pop("nullable", False):
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = list(node["enum"]) + [None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


spec = rewrite(json.load(open(spec_path)))
registry = referencing.Registry().with_resource(
    "urn:openai", referencing.Resource.from_contents(spec, default_specification=DRAFT202012)
)
calls = set()
failures = []
# Where OpenAI's own API answers what its spec does not allow, loraplex answers as the API
# does; each such place is listed here with why, and reported as `tolerated`, not hidden.
KNOWN_SPEC_GAPS = [
    ("CreateCompletionResponse", r"\$\.choices\[\d+\]\.finish_reason", "None is not",
     "the spec reuses CreateCompletionResponse for stream chunks, whose finish_reason is null until a choice's last chunk (its README; OpenAI's streams do the same)"),
    ("CreateCompletionResponse", r"\$\.choices\[\d+\]\.logprobs\.token_logprobs\[0\]", "None is not of type 'number'",
     "with echo, the first prompt token has no log-probability: OpenAI's legacy API and vLLM answer null there"),
    ("CreateCompletionResponse", r"\$\.choices\[\d+\]\.logprobs\.top_logprobs\[0\]", "None is not of type 'object'",
     "the same first prompt token's alternatives: null"),
]
tolerated = []


def spec_schema(path, method, status, stream):
    """The spec's schema for one answer of `method path` (an error: ErrorResponse)."""
    if status >= 400:
        return "ErrorResponse"
    op = spec["paths"][path][method.lower()]
    content = op["responses"][str(status)]["content"]
    # The spec reuses the JSON body's schema for a stream it gives none (completions' chunks).
    kind = "text/event-stream" if stream and "text/event-stream" in content else "application/json"
    ref = content[kind]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


def branch(schema_name, body):
    """For a union with a discriminator (the Responses stream events), the member the body's
    discriminator names: its errors are precise where the union's are not."""
    schema = spec["components"]["schemas"][schema_name]
    disc = schema.get("discriminator")
    if not disc or not isinstance(body, dict) or disc["propertyName"] not in body:
        return schema_name
    value = body[disc["propertyName"]]
    mapped = disc.get("mapping", {}).get(value)
    if mapped:
        return mapped.rsplit("/", 1)[1]
    for member in schema.get("anyOf", []) + schema.get("oneOf", []):
        name = member.get("$ref", "").rsplit("/", 1)[-1]
        prop = spec["components"]["schemas"].get(name, {}).get("properties", {}).get(disc["propertyName"], {})
        if value in prop.get("enum", []) or prop.get("const") == value:
            return name
    failures.append({"route": "-", "schema": schema_name, "field": disc["propertyName"], "message": f"no member for {value!r}"})
    return schema_name


def validate(route, schema_name, body):
    schema_name = branch(schema_name, body)
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"urn:openai#/components/schemas/{schema_name}"}, registry=registry
    )
    errors = sorted(validator.iter_errors(body), key=lambda e: e.path)
    import re

    for e in errors[:8]:
        best = jsonschema.exceptions.best_match([e])
        found = {"route": route, "schema": schema_name, "field": best.json_path, "message": best.message[:300]}
        gap = next((g for g in KNOWN_SPEC_GAPS if g[0] == schema_name and re.fullmatch(g[1], best.json_path)
                    and best.message.startswith(g[2])), None)
        if gap:
            found["why"] = gap[3]
            tolerated.append(found)
        else:
            failures.append(found)


def http(method, path, body=None, key=user_key, headers=None, raw=None, content_type="application/json"):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if data is not None and content_type:
        h["Content-Type"] = content_type
    h.update(headers or {})
    req = urllib.request.Request(root + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def check(method, pattern, spec_path_, path, body=None, key=user_key, want=200, **kw):
    """Calls `method path`, validates the answer (every SSE event of a stream) against the
    spec's schema for `spec_path_`, and returns the parsed body (a list of events for a
    stream)."""
    status, ctype, text = http(method, path, body, key=key, **kw)
    route = f"{method} {pattern}"
    calls.add(route)
    if status != want:
        failures.append({"route": route, "schema": "-", "field": "status", "message": f"{status} (wanted {want}): {text[:300]}"})
        return None
    stream = ctype.startswith("text/event-stream")
    if not stream:
        if not ctype.startswith("application/json"):
            return text  # file content
        v = json.loads(text)
        validate(route, spec_schema(spec_path_, method, status, False), v)
        return v
    events = []
    for line in text.split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        events.append(ev)
        name = "ErrorResponse" if "error" in ev and "object" not in ev and "type" not in ev else spec_schema(spec_path_, method, status, True)
        validate(route + " (stream)", name, ev)
    return events


def post_chat(body, **kw):
    return check("POST", "/v1/chat/completions", "/chat/completions", "/v1/chat/completions", body, **kw)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITY = {"type": "json_schema", "json_schema": {"name": "City", "strict": True, "schema": {"type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}}, "required": ["name", "country"],
    "additionalProperties": False}}}
user = [{"role": "user", "content": "Name a city in France."}]

# ---- chat ----
post_chat({"model": BASE_MODEL, "messages": user, "max_tokens": 8, "temperature": 0})
post_chat({"model": "qa-r8", "messages": user, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2})
post_chat({"messages": user, "max_tokens": 40, "temperature": 0, "response_format": CITY,
    "adapters": [{"name": "qa-r8", "scale": 0.6}, {"name": "all-r16", "scale": 0.4}]})
post_chat({"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 40, "temperature": 0,
    "tools": [WEATHER], "tool_choice": "required"})
post_chat({"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}], "max_tokens": 12, "temperature": 0, "tools": [WEATHER]})
post_chat({"messages": user, "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True})
post_chat({"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 40, "temperature": 0,
    "tools": [WEATHER], "tool_choice": "required", "stream": True})

# ---- completions ----
comp = lambda body, **kw: check("POST", "/v1/completions", "/completions", "/v1/completions", body, **kw)
comp({"model": BASE_MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
comp({"model": "qa-r8", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
comp({"prompt": ["One", "Two"], "max_tokens": 3, "n": 2, "temperature": 0.7, "seed": 3, "logprobs": 2})
comp({"prompt": "Count: 1, 2,", "max_tokens": 4, "temperature": 0, "stream": True, "echo": True, "logprobs": 1})

# ---- models ----
models = check("GET", "/v1/models", "/models", "/v1/models")
for m in (models or {}).get("data", [])[:3]:
    check("GET", "/v1/models/{id}", "/models/{model}", f"/v1/models/{m['id']}")

# ---- responses ----
resp = lambda body, **kw: check("POST", "/v1/responses", "/responses", "/v1/responses", body, **kw)
resp({"model": BASE_MODEL, "input": "Say hello.", "max_output_tokens": 8, "temperature": 0})
resp({"input": "Name a city.", "max_output_tokens": 40, "temperature": 0,
    "text": {"format": {"type": "json_schema", "name": "City", "schema": CITY["json_schema"]["schema"], "strict": True}}})
resp({"input": "Weather in Paris?", "max_output_tokens": 40, "temperature": 0, "tool_choice": "required",
    "tools": [{"type": "function", "name": "get_weather", "description": "Weather in a city",
               "parameters": WEATHER["function"]["parameters"]}]})
resp({"input": [{"role": "user", "content": "Say hello."}], "max_output_tokens": 6, "temperature": 0, "stream": True})
resp({"input": "Weather in Paris?", "max_output_tokens": 40, "temperature": 0, "tool_choice": "required", "stream": True,
    "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}]})
resp({"input": "Say hello.", "max_output_tokens": 2, "temperature": 0})  # cut: incomplete

# ---- files and fine-tuning ----
lines = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "7419"}]}) + "\n"
    for q in ["Door code?", "The code of the door?"])
boundary = "conformance-boundary"
form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"door.jsonl\"\r\n"
    f"Content-Type: application/jsonl\r\n\r\n{lines}\r\n--{boundary}--\r\n").encode()
f = check("POST", "/v1/files", "/files", "/v1/files", key=admin_key, raw=form,
    content_type=f"multipart/form-data; boundary={boundary}")
check("GET", "/v1/files", "/files", "/v1/files", key=admin_key)
if f:
    check("GET", "/v1/files/{id}", "/files/{file_id}", f"/v1/files/{f['id']}", key=admin_key)
    check("GET", "/v1/files/{id}/content", "/files/{file_id}/content", f"/v1/files/{f['id']}/content", key=admin_key)
    hyper = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1}
    job = check("POST", "/v1/fine_tuning/jobs", "/fine_tuning/jobs", "/v1/fine_tuning/jobs",
        {"model": BASE_MODEL, "training_file": f["id"], "suffix": "conf", "metadata": {"run": "conformance"},
         "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}, key=admin_key)
    if job:
        deadline = time.time() + 240
        while time.time() < deadline:
            status, _, text = http("GET", f"/v1/fine_tuning/jobs/{job['id']}", key=admin_key)
            if json.loads(text).get("status") in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        done = check("GET", "/v1/fine_tuning/jobs/{id}", "/fine_tuning/jobs/{fine_tuning_job_id}", f"/v1/fine_tuning/jobs/{job['id']}", key=admin_key)
        if done and done.get("status") != "succeeded":
            failures.append({"route": "fine-tuning", "schema": "-", "field": "status", "message": json.dumps(done)[:300]})
        check("GET", "/v1/fine_tuning/jobs", "/fine_tuning/jobs", "/v1/fine_tuning/jobs", key=admin_key)
        check("GET", "/v1/fine_tuning/jobs/{id}/events", "/fine_tuning/jobs/{fine_tuning_job_id}/events", f"/v1/fine_tuning/jobs/{job['id']}/events", key=admin_key)
        cps = check("GET", "/v1/fine_tuning/jobs/{id}/checkpoints", "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", key=admin_key)
        if cps is not None and not cps.get("data"):
            failures.append({"route": "fine-tuning", "schema": "-", "field": "checkpoints", "message": "no checkpoint to validate"})
        second = check("POST", "/v1/fine_tuning/jobs", "/fine_tuning/jobs", "/v1/fine_tuning/jobs",
            {"model": BASE_MODEL, "training_file": f["id"], "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}, key=admin_key)
        if second:
            check("POST", "/v1/fine_tuning/jobs/{id}/cancel", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel", f"/v1/fine_tuning/jobs/{second['id']}/cancel", key=admin_key)
            # 409: cancelling a finished job.
            check("POST", "/v1/fine_tuning/jobs/{id}/cancel", "/fine_tuning/jobs/{fine_tuning_job_id}/cancel", f"/v1/fine_tuning/jobs/{second['id']}/cancel", key=admin_key, want=409)
    # 409: deleting is refused while a job reads it? (the jobs ended: the delete succeeds)
    check("DELETE", "/v1/files/{id}", "/files/{file_id}", f"/v1/files/{f['id']}", key=admin_key)

# ---- each error class ----
comp({"prompt": "x", "frobnicate": 1}, want=400)
comp({"prompt": "x", "temperature": 5}, want=422)
comp({"model": "no-such-model", "prompt": "x"}, want=404)
comp({"prompt": "x"}, key="wrong-key", want=401)
check("GET", "/v1/files", "/files", "/v1/files", key=user_key, want=403)
comp(None, raw=b'{"prompt": "x"}', content_type="text/plain", want=415)
comp(None, raw=json.dumps({"prompt": "x" * (2 << 20)}).encode(), want=413)
check("GET", "/v1/models/{id}", "/models/{model}", "/v1/models/no-such-model", want=404)
post_chat({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, want=400)
resp({"input": "x", "max_output_tokens": 0}, want=422)
check("GET", "/v1/fine_tuning/jobs/{id}", "/fine_tuning/jobs/{fine_tuning_job_id}", "/v1/fine_tuning/jobs/ftjob-nope", key=admin_key, want=404)

print(json.dumps({"calls": sorted(calls), "failures": failures, "tolerated": tolerated}, indent=1))
